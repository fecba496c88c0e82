"""Perplexity with the official protocol (shortened-llm src/eval_ppl.py, src/dataset.py::process_data).

Rows joined with "\\n\\n", tokenized without special tokens, cut into non-overlapping seq_len-token windows
(remainder dropped), PPL = exp(mean next-token NLL over all windows). Two BOS modes, both reported:

    once   (metric `ppl`,     the official ppl.csv):     one BOS before the whole stream, so only window 0 starts
                                                          with it; seq_len inputs, seq_len - 1 targets per window
    every  (metric `ppl_bos`, the official ppl_bos.csv): a BOS before every window; seq_len + 1 inputs,
                                                          seq_len targets per window

`max_windows` keeps the first N windows for quick runs (null = the full pass). Each corpus x BOS mode is one
resumable unit of the cell (bench.records.Progress). The stderr is that of the mean
NLL over windows, carried to PPL by the delta method (PPL x stderr of mean NLL).

    python -m bench method=dense eval.ppl.max_windows=64
"""

from __future__ import annotations

import logging
import math
import time
from pathlib import Path

import torch

from bench.data import text_rows
from bench.progress import bar
from bench.records import Progress, examples_dir, write_examples

log = logging.getLogger("bench.ppl")

METRIC = {"once": "ppl", "every": "ppl_bos"}


def windows(ids: torch.Tensor, seq_len: int, bos_id: int | None, bos: str) -> torch.Tensor:
    """[n_windows, seq_len (+1 if bos == "every")] windows of a 1-D token stream."""
    if bos not in METRIC:
        raise ValueError(f"bos={bos!r}: allowed values are {', '.join(METRIC)}")
    if bos_id is None:
        raise ValueError("the tokenizer has no BOS token; the official protocol needs one")
    bos_t = torch.tensor([bos_id], dtype=ids.dtype)
    if bos == "once":
        ids = torch.cat([bos_t, ids])
    n = ids.numel() // seq_len
    out = ids[: n * seq_len].view(n, seq_len)
    if bos == "every":
        out = torch.cat([bos_t.expand(n, 1), out], dim=1)
    return out


def token_nll(model, ids: torch.Tensor, inputs_embeds: torch.Tensor | None = None) -> torch.Tensor:
    """Next-token NLL at every position but the last ([B, T-1], fp32). The head runs on the T-1 positions that
    have a target only (`logits_to_keep`), so no [B, T, V] logits are built and then sliced."""
    keep = torch.arange(ids.shape[1] - 1, device=ids.device)
    inputs = {"input_ids": ids} if inputs_embeds is None else {"inputs_embeds": inputs_embeds}
    logits = model(**inputs, logits_to_keep=keep, use_cache=False).logits.float()
    return torch.nn.functional.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten(),
                                             reduction="none").view(ids.shape[0], -1)


@torch.no_grad()
def window_nll(model, wins: torch.Tensor, batch_size: int, desc: str = "ppl") -> torch.Tensor:
    """Mean next-token NLL of each window ([n_windows] fp64), with a progress bar over the window batches."""
    return torch.cat([token_nll(model, b.to(model.device)).double().mean(dim=1).cpu()
                      for b in bar(wins.split(batch_size), desc=desc, unit="batch")])


def perplexity(model, wins: torch.Tensor, batch_size: int, desc: str = "ppl") -> tuple[float, float]:
    """(PPL, stderr). Windows have equal length, so the mean of window means is the token mean."""
    return _ppl_stderr(window_nll(model, wins, batch_size, desc))


def _ppl_stderr(nll: torch.Tensor) -> tuple[float, float]:
    """(PPL, stderr) from the per-window mean NLLs."""
    mean = nll.mean().item()
    se = nll.std().item() / math.sqrt(len(nll)) if len(nll) > 1 else float("nan")
    return math.exp(mean), math.exp(mean) * se


def evaluate(model, tokenizer, cfg, dense=None, progress: Progress | None = None) -> list[dict]:
    pcfg, progress = cfg.eval.ppl, progress or Progress()
    bos_modes = list(pcfg.bos_modes)
    if cfg.model.get("ppl_bos_every") and "every" not in bos_modes:
        bos_modes.append("every")  # Gemma without a BOS per window is catastrophic (methods.md section 2.1)
    settings = {k: pcfg.get(k) for k in ("seq_len", "batch_size", "max_windows")}
    rows, examples = [], examples_dir(progress)
    for name in pcfg.datasets:
        text_rows_, source = text_rows(name, cfg.get("data_root") or None)
        ids = tokenizer("\n\n".join(text_rows_), return_tensors="pt", add_special_tokens=False).input_ids[0]
        for bos in bos_modes:
            rows += progress.run(f"ppl/{name}/{bos}", settings | {"source": source, "bos": bos},
                                 lambda: [_corpus_row(model, tokenizer, ids, pcfg, name, bos, source, examples)])
    return rows


def _corpus_row(model, tokenizer, ids: torch.Tensor, pcfg, name: str, bos: str, source: str,
                examples: Path | None = None) -> dict:
    """The corpus x BOS mode row. With an `examples` folder, also `ppl_<corpus>_<metric>.jsonl.gz` there: per
    window its NLL sum and target count (PPL = exp(sum of sums / sum of counts)), for paired bootstraps over
    windows; the row names it (`examples`, relative to the cell directory)."""
    t0 = time.perf_counter()
    wins = windows(ids, pcfg.seq_len, tokenizer.bos_token_id, bos)
    if pcfg.get("max_windows"):
        wins = wins[: pcfg.max_windows]
    nll = window_nll(model, wins, pcfg.batch_size, f"ppl {name} {METRIC[bos]}")
    ppl, se = _ppl_stderr(nll)
    elapsed = time.perf_counter() - t0
    log.info("%s %s: %.3f +- %.3f (%d windows, %.1f s)", name, METRIC[bos], ppl, se, len(wins), elapsed)
    row = {"stage": "ppl", "task": name, "metric": METRIC[bos], "value": ppl, "stderr": se, "n": len(wins),
           "unit": "", "seq_len": pcfg.seq_len, "data_source": source, "elapsed_s": elapsed}
    if examples is not None:
        file, targets = f"ppl_{name}_{METRIC[bos]}.jsonl.gz", wins.shape[1] - 1  # every window scores T-1 tokens
        write_examples(examples / file, [{"window": i, "nll_sum": m * targets, "tokens": targets}
                                         for i, m in enumerate(nll.tolist())])
        row["examples"] = f"{examples.name}/{file}"
    return row
