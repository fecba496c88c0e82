"""About how long an evaluation will take on a CPU, said before it starts.

`cost_notice(cfg, model, device)` returns one line for a CPU cell whose evaluation has a stage at full size
(every perplexity window, every zero-shot example, or the paper's speed grid), e.g.

    eval=full on cpu: every perplexity window, every zero-shot example and the speed grid (batch 1-256 x 128, 512
    new tokens), about 9.7 hours for smollm2-135m (perplexity 0.6 h, zero-shot 3.5 h, speed 5.7 h); eval=quick
    for a smoke run

and None for anything smaller (the quick preset, the showcase's 512 windows and 200 examples) or off the CPU.

The estimate is counts times measured rates, nothing fitted to the answer:

* Work. Perplexity: the windows of each corpus (`CORPUS_TOKENS` // seq_len, at most max_windows) x seq_len x
  the BOS modes. Zero-shot: per task, the documents (at most `limit`) x the tokens lm-eval forwards per document
  (`ZEROSHOT_DOCS`: every request's context + continuation - 1, requests lm-eval answers with one forward counted
  once). Speed: per runtime, output length and batch size, the warm-up and measured decode steps
  (warmup x (warmup_tokens + 1) + rounds x (new_tokens + 1)), for the cell's model and, in a pruning cell, the
  dense model measured alongside. Token counts are SmolLM2's tokenizer on ../shared/data (the hub sets' texts);
  another tokenizer moves them by some tens of percent.
* Rates, measured on the 2-core AMD EPYC VM with smollm2-135m (134.5M parameters) in fp32 (results/reference):
  perplexity forwards 400 tokens/s (the dense showcase cell: 512 x 128 tokens per corpus in 153-173 s);
  zero-shot 340 tokens/s (the zeroshot_full cells: about 400 tokens/s on the 113.3M-parameter pruned models,
  every task, scaled to 134.5M); a decode step takes STEP_S + (batch - 1) x ROW_S seconds (a line through the
  dense showcase cell's steps: 0.067 / 0.104 / 0.153 s at batch 1 / 4 / 16; beyond 16 it is an extrapolation,
  more likely long than short).
* Scaling: time grows with the parameter count and shrinks with the threads (linear in both: a rough rule;
  bandwidth stops it short of linear on many cores).
"""

from __future__ import annotations

import math

import torch

REF_PARAMS = 134_515_008  # smollm2-135m, the model every rate below was measured on
REF_THREADS = 2
PPL_TOK_S = 400.0
ZEROSHOT_TOK_S = 340.0
STEP_S, ROW_S = 0.071, 0.0053
CORPUS_TOKENS = {"wikitext2": 304_986, "ptb": 93_459}  # "\n\n"-joined rows, SmolLM2's tokenizer
ZEROSHOT_DOCS = {"boolq": (3270, 151.4), "piqa": (1838, 70.4), "hellaswag": (10042, 312.0),
                 "winogrande": (1267, 43.0), "arc_easy": (2376, 104.9), "arc_challenge": (1172, 133.2),
                 "openbookqa": (500, 44.0)}  # (documents, forwarded tokens per document)


def full_stages(cfg) -> list[str]:
    """The stages of cfg.eval that run at full size, as the notice names them. Speed counts as full when its
    grid reaches the paper's long outputs (128 new tokens or more) or large batches (64 or more)."""
    e, out = cfg.eval, []
    if "ppl" in e.stages and not e.ppl.get("max_windows"):
        out.append("every perplexity window")
    if "zeroshot" in e.stages and e.zeroshot.get("limit") is None:
        out.append("every zero-shot example")
    s = e.speed
    if "speed" in e.stages and (max(s.new_tokens) >= 128 or max(s.batch_sizes) >= 64):
        out.append(f"the speed grid (batch {min(s.batch_sizes)}-{max(s.batch_sizes)} x "
                   f"{', '.join(str(n) for n in s.new_tokens)} new tokens)")
    return out


def stage_seconds(cfg, params: int, threads: int) -> dict[str, float]:
    """Estimated seconds of each stage in cfg.eval.stages (the module docstring gives the basis); names of
    corpora or tasks without a count add nothing."""
    e, scale = cfg.eval, params / REF_PARAMS * REF_THREADS / max(threads, 1)
    out = {}
    if "ppl" in e.stages:
        p = e.ppl
        windows = [min(CORPUS_TOKENS.get(c, 0) // p.seq_len, p.get("max_windows") or math.inf) for c in p.datasets]
        out["perplexity"] = sum(windows) * p.seq_len * len(p.bos_modes) / PPL_TOK_S * scale
    if "zeroshot" in e.stages:
        limit = e.zeroshot.get("limit")
        tokens = sum(min(docs, limit or docs) * per for docs, per in
                     (ZEROSHOT_DOCS.get(t, (0, 0.0)) for t in e.zeroshot.tasks))
        out["zero-shot"] = tokens / ZEROSHOT_TOK_S * scale
    if "speed" in e.stages:
        s = e.speed
        models = 2 if s.get("interleave_dense") and cfg.method.get("impl") != "dense" else 1
        seconds = 0.0
        for n in s.new_tokens:
            for b in s.batch_sizes:
                step = (STEP_S + (b - 1) * ROW_S) * scale
                round_s = models * (n + 1) * step
                rounds = max(int(s.repeats), math.ceil(float(s.min_time_s) / round_s))
                seconds += models * int(s.warmup) * (min(n, int(s.warmup_tokens)) + 1) * step + rounds * round_s
        out["speed"] = seconds * len(s.runtimes)
    return out


def cost_notice(cfg, model, device) -> str | None:
    """One line saying what a full-size evaluation on a CPU costs, or None (not a CPU, nothing at full size).
    `model` is the loaded model or its parameter count."""
    if torch.device(device).type != "cpu":
        return None
    full = full_stages(cfg)
    if not full:
        return None
    params = model if isinstance(model, int) else sum(p.numel() for p in model.parameters())
    parts = stage_seconds(cfg, params, torch.get_num_threads())
    detail = ", ".join(f"{name} {s / 3600:.1f} h" for name, s in parts.items())
    what = ", ".join(full[:-1]) + " and " + full[-1] if len(full) > 1 else full[0]
    return (f"eval={cfg.eval.get('preset') or 'custom'} on cpu: {what}, about {sum(parts.values()) / 3600:.1f} "
            f"hours for {cfg.model.name} ({detail}); eval=quick for a smoke run")
