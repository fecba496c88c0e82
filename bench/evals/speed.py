"""Latency, throughput and peak memory of batched generation (the official protocol, methods.md section 2.3).

One fixed prompt replicated over the batch; exactly N new tokens per row (min_new_tokens = max_new_tokens, so
EOS cannot end a row early); sampling as the official script (top_k 50, top_p 0.95). For every output length and
batch size: warm-up runs, then rounds until at least `repeats` rounds and `min_time_s` seconds. Timing is CUDA
events around `generate` plus a synchronize on a GPU, perf_counter on the CPU.

    latency_s        one batched generate (prefill + N - 1 decode steps)
    throughput_tok_s batch x N / latency (generated tokens only, as the paper)
    prefill_s        a generate of one new token; decode_s = latency - prefill (means)
    decode_tok_s     batch x (N - 1) / decode_s
    peak_mem_mib     this model's weights + the peak allocation above them during generate: CUDA
                     max_memory_allocated (reset before each run), or peak RSS on the CPU (VmHWM, reset through
                     /proc/self/clear_refs). With one model loaded this is the official figure.
    speedup          dense latency / this model's latency, from interleaved runs
    roofline_frac    (batch 1) decode tokens/s over the bandwidth bound: measured copy bandwidth / bytes read per
                     decode step (weights + KV cache at the mean context length)

Several models are measured *interleaved*: each round runs every model once, the order reversed every other
round (A B, B A, ...), so the drift of a shared machine (about 10% here) falls on all of them alike; a speedup is
the mean of per-round ratios, with their spread. Running out of memory is recorded (status oom) and skips the
larger batches at that length. Before a point runs, each model's peak above its weights is predicted
(bench.memory.speed_point_bytes) and compared with the free memory (bench.memory.free_bytes: MemAvailable on the
CPU, the CUDA free memory on a GPU); a model predicted not to fit is not run there but recorded (status
skipped_memory, predicted_bytes, free_bytes), as is the dense reference of a point whose pruned model is skipped,
and the stage goes on (without this, eval.speed.batch_sizes=[100000] grew until the kernel killed the process).

Runtimes: `eager` (plain generate with the dynamic KV cache, what the paper measured) and `compiled` (static KV
cache with torch.compile; CUDA graphs through mode reduce-overhead on a GPU).

    python -m bench method=depth_ppl eval.stages=[speed] eval.speed.batch_sizes=[1,4,16] eval.speed.new_tokens=[32]
"""

from __future__ import annotations

import gc
import logging
import math
import statistics
import time
from dataclasses import dataclass
from typing import Callable

import torch
from omegaconf import OmegaConf

from bench import memory
from bench.memory import hwm_bytes, reset_peaks, rss_bytes, weight_bytes
from bench.progress import bar
from bench.records import Progress

log = logging.getLogger("bench.speed")

HF_RUNTIMES = ("eager", "compiled")  # measured here, through HF generate
RUNTIMES = HF_RUNTIMES + ("llamacpp",)  # llamacpp: the GGUF exports in llama.cpp (bench/evals/llamacpp.py)
MIB = 2**20


# --- measuring primitives ---------------------------------------------------------------------------------------

def generate(model, ids: torch.Tensor, new_tokens: int, runtime: str) -> None:
    """One batched generate of exactly `new_tokens` tokens per row (the unit every figure is made of)."""
    kwargs = {}
    if runtime == "compiled":
        from transformers import CompileConfig

        compile_config = CompileConfig(mode="reduce-overhead" if ids.device.type == "cuda" else "default")
        compile_config._compile_all_devices = True  # transformers compiles only on accelerators by default
        kwargs = {"cache_implementation": "static", "compile_config": compile_config}
    with torch.inference_mode():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=True, top_k=50, top_p=0.95,
                             temperature=1.0, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                             pad_token_id=0, **kwargs)
    if out.shape[1] != ids.shape[1] + new_tokens:
        raise RuntimeError(f"generate returned {out.shape[1] - ids.shape[1]} new tokens, not {new_tokens}")


def timed(fn, device: torch.device) -> float:
    """Seconds `fn` takes: CUDA events + synchronize on a GPU, perf_counter on the CPU."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize(device)
        return start.elapsed_time(end) / 1e3
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


class PeakMemory:
    """Peak bytes allocated above the level at entry: CUDA allocator, or process RSS on the CPU."""

    def __init__(self, device: torch.device):
        self.device, self.extra_bytes = device, 0

    def __enter__(self):
        reset_peaks(self.device)  # folds the peak so far into the open stage's (bench.memory.StagePeak) first
        if self.device.type == "cuda":
            self.before = torch.cuda.memory_allocated(self.device)
        else:
            self.before = rss_bytes()
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            peak = torch.cuda.max_memory_allocated(self.device)
        else:
            peak = hwm_bytes()
        self.extra_bytes = max(0, peak - self.before)
        return False


def is_oom(exc: BaseException) -> bool:
    return isinstance(exc, (torch.OutOfMemoryError, MemoryError)) or "out of memory" in str(exc).lower()


def decode_bytes(model, context_len: float) -> float:
    """Bytes one batch-1 decode step reads: every weight except the input embedding table (a lookup reads one
    row; a tied table is read in full as the LM head), plus the KV cache of `context_len` tokens."""
    embed = model.get_input_embeddings().weight
    tied = model.get_output_embeddings().weight is embed
    weights = weight_bytes(model) - (0 if tied else embed.numel() * embed.element_size())
    kv = sum(2 * layer.self_attn.k_proj.out_features * context_len * embed.element_size()
             for layer in model.model.layers)
    return weights + kv


_BANDWIDTH: dict[str, float] = {}


def bandwidth_gb_s(device: torch.device) -> float:
    """Memory bandwidth from a large tensor copy (read + write bytes / best time of 10), once per process."""
    key = str(device)
    if key not in _BANDWIDTH:
        n = (1 << 30 if device.type == "cuda" else 1 << 29) // 4
        src = torch.ones(n, dtype=torch.float32, device=device)
        dst = torch.empty_like(src)
        dst.copy_(src)
        best = min(timed(lambda: dst.copy_(src), device) for _ in range(10))
        _BANDWIDTH[key] = 2 * src.numel() * 4 / best / 1e9
        del src, dst
    return _BANDWIDTH[key]


def summary(values: list[float]) -> dict:
    """mean, median, p90, population std (the official pstdev), stderr of the mean, raw values."""
    ordered = sorted(values)
    p90 = ordered[min(len(ordered) - 1, math.ceil(0.9 * len(ordered)) - 1)]
    std = statistics.pstdev(values) if len(values) > 1 else 0.0
    return {"value": statistics.fmean(values), "median": statistics.median(values), "p90": p90, "std": std,
            "stderr": std / math.sqrt(len(values) - 1) if len(values) > 1 else None, "n": len(values),
            "raw": [round(v, 6) for v in values]}


def prompt_ids(tokenizer, scfg, model, device: torch.device) -> torch.Tensor:
    """The official prompt's token ids [1, L]; without a tokenizer (shape-only), a fixed stand-in of
    `prompt_tokens` ids starting with BOS (speed depends on the length only)."""
    if tokenizer is not None:
        ids = tokenizer(scfg.prompt, return_tensors="pt").input_ids
    else:
        bos = model.config.bos_token_id if model.config.bos_token_id is not None else 1
        ids = torch.tensor([[bos] + [100 + i for i in range(int(scfg.prompt_tokens) - 1)]])
    return ids.to(device)


# --- the interleaved measurement ----------------------------------------------------------------------------

def measure(models: dict, ids: torch.Tensor, scfg, reference: str | None = None, prior: dict | None = None,
            park: bool = False) -> list[dict]:
    """Interleaved speed and memory of `models` ({label: model}) at every runtime x output length x batch
    size. Returns one row per label x runtime x length x batch x metric; `reference` names the model the
    others' speedups are against. A bar counts the points (runtime x length x batch), each one's warm-up and
    interleaved rounds of every model.

    `prior`: the reference's per-round latencies measured earlier ({(runtime, new_tokens, batch): [s, ...]},
    `prior_latencies`), when it is not among `models` (speed.reference=reload). `park`: only the model being timed
    is on the accelerator, the others wait in host memory (speed.reference=cpu); each model ends where it began."""
    home = {label: next(m.parameters()).device for label, m in models.items()}
    try:
        return _measure(models, ids, scfg, reference, prior, park)
    finally:
        if park:
            for label, m in models.items():
                m.to(home[label])


def _measure(models, ids, scfg, reference, prior, park) -> list[dict]:
    rows = []
    n_points = len(scfg.new_tokens) * sum(len(batch_sizes(scfg, runtime)) for runtime in scfg.runtimes)
    with bar(total=n_points, desc="speed", unit="point") as points:
        for runtime in scfg.runtimes:
            if runtime not in HF_RUNTIMES:
                from bench import BenchError

                where = " (llamacpp: bench.evals.llamacpp.measure, which the speed stage calls)" * (
                    runtime in RUNTIMES)
                raise BenchError(f"eval.speed.runtimes: {runtime!r}; allowed values here are "
                                 f"{', '.join(HF_RUNTIMES)}{where}")
            for new_tokens in scfg.new_tokens:
                alive = dict(models)
                for batch in sorted(batch_sizes(scfg, runtime)):
                    points.set_postfix_str(f"{runtime} bs={batch} out={new_tokens}", refresh=False)
                    rows += _measure_point(alive, ids, int(batch), int(new_tokens), runtime, scfg, reference,
                                           (prior or {}).get((runtime, int(new_tokens), int(batch))), park)
                    points.update()
    return rows


def batch_sizes(scfg, runtime: str) -> list[int]:
    """The batch sizes a runtime is measured at: `compiled_batch_sizes` for the compiled runtime where set (each
    batch is its own compiled graph: tens of seconds apiece on a 7B), else `batch_sizes`."""
    if runtime == "compiled" and scfg.get("compiled_batch_sizes"):
        return list(scfg.compiled_batch_sizes)
    return list(scfg.batch_sizes)


def warmup_tokens(runtime: str, device: torch.device, new_tokens: int, scfg) -> int:
    """New tokens per warm-up generate. A compiled runtime warms at the measured shape (a static cache of another
    length would recompile); so does a GPU, where the first generate through each new KV length pays one-time
    costs (on an H200, llama-7b's first 128-token run after a 2-token warm-up took up to 3.4x as long as the next).
    Eager on the CPU warms with `warmup_tokens`, which saves minutes per sweep."""
    if runtime == "compiled" or device.type == "cuda":
        return new_tokens
    return min(new_tokens, int(scfg.warmup_tokens))


def on_device(alive: dict, label: str, device: torch.device, park: bool):
    """alive[label], on `device`; with `park`, every other model moved to host memory first (one copy of the
    weights on the accelerator at a time). Interleaved rounds A B, B A time the same model back to back at each
    round's boundary, so a round moves each model at most once."""
    model = alive[label]
    if park:
        for other, m in alive.items():
            if other != label and next(m.parameters()).device != torch.device("cpu"):
                m.to("cpu")
        if next(model.parameters()).device != device:
            model.to(device)
    return model


def prior_latencies(rows: list[dict]) -> dict:
    """{(runtime, new_tokens, batch): per-round latencies} of a measurement's latency_s rows (the reference
    measured before pruning, speed.reference=reload)."""
    return {(r["runtime"], int(r["new_tokens"]), int(r["batch_size"])): r["raw"] for r in rows
            if r["metric"] == "latency_s" and r.get("status") == "ok"}


def _parked_room(alive: dict, label: str, device: torch.device) -> int:
    """Bytes the accelerator gains when `label` takes its turn with the others parked in host memory
    (speed.reference=cpu, `on_device`): the others' weights there now, less its own when it is not there yet."""
    on = {k for k, m in alive.items() if next(m.parameters()).device == device}
    return sum(weight_bytes(m) for k, m in alive.items() if k != label and k in on) \
        - (0 if label in on else weight_bytes(alive[label]))


def memory_skips(alive: dict, device: torch.device, batch: int, prompt_tokens: int, new_tokens: int,
                 reference: str | None = None, park: bool = False) -> dict[str, dict]:
    """{label: skip fields} of the models not to run at this point: those whose predicted peak above the weights
    (bench.memory.speed_point_bytes) exceeds the free memory (bench.memory.free_bytes, plus what parking the others
    frees), and the reference when every model it is the reference of is skipped (a speedup needs both). Empty
    where the free memory cannot be read; a model without a prediction (no LLaMA-style decoder) is never skipped."""
    free_now = memory.free_bytes(device)
    if free_now is None:
        return {}
    skips, checked = {}, {}
    for label, model in alive.items():
        free = free_now + (_parked_room(alive, label, device) if park else 0)
        predicted = memory.speed_point_bytes(model, batch, prompt_tokens, new_tokens)
        checked[label] = {"predicted_bytes": predicted, "free_bytes": free}
        if predicted is not None and predicted > free:
            skips[label] = checked[label] | {"error": f"predicted {predicted / MIB:.0f} MiB above the weights, "
                                                      f"{free / MIB:.0f} MiB free"}
    others = [k for k in alive if k != reference]
    if reference in alive and reference not in skips and others and all(k in skips for k in others):
        skips[reference] = checked[reference] | {"error": f"reference of skipped models ({', '.join(others)})"}
    return skips


def _measure_point(alive: dict, ids, batch: int, new_tokens: int, runtime: str, scfg, reference,
                   prior: list[float] | None = None, park: bool = False) -> list[dict]:
    device = ids.device
    point = {"batch_size": batch, "new_tokens": new_tokens, "prompt_tokens": ids.shape[1], "runtime": runtime}
    skips = memory_skips(alive, device, batch, ids.shape[1], new_tokens, reference, park)
    if skips:
        log.warning("batch %d, %d new tokens, %s: skipped %s", batch, new_tokens, runtime,
                    "; ".join(f"{label} ({fields['error']})" for label, fields in skips.items()))
    rows = []
    for label, fields in skips.items():
        rows.append({"model_label": label} | point | {"metric": "latency_s", "value": None, "stderr": None, "n": 0,
                                                     "status": "skipped_memory"} | fields)
    run = {k: m for k, m in alive.items() if k not in skips}
    if not run:
        return rows
    x = ids.repeat(batch, 1)
    lat = {k: [] for k in run}
    pre = {k: [] for k in run}
    mem = {k: 0 for k in run}
    failed = {}
    warm_tokens = warmup_tokens(runtime, device, new_tokens, scfg)
    for label in list(run):
        try:
            model = on_device(alive, label, device, park)
            for _ in range(int(scfg.warmup)):
                generate(model, x, warm_tokens, runtime)
                generate(model, x, 1, runtime)
        except Exception as exc:  # noqa: BLE001 (only OOM is caught; anything else re-raises)
            if not is_oom(exc):
                raise
            failed[label] = exc
    _release(device)  # once per point: a gc pass costs ~0.2 s, as much as a tiny model's whole run
    t0, rounds = time.perf_counter(), 0
    while rounds < int(scfg.repeats) or time.perf_counter() - t0 < float(scfg.min_time_s):
        order = [k for k in run if k not in failed]
        if not order:
            break
        for label in order if rounds % 2 == 0 else order[::-1]:
            try:
                model = on_device(alive, label, device, park)
                pre[label].append(timed(lambda: generate(model, x, 1, runtime), device))
                with PeakMemory(device) as peak:
                    lat[label].append(timed(lambda: generate(model, x, new_tokens, runtime), device))
                mem[label] = max(mem[label], peak.extra_bytes)
            except Exception as exc:  # noqa: BLE001
                if not is_oom(exc):
                    raise
                failed[label] = exc
        rounds += 1
    for label, model in run.items():
        base = {"model_label": label} | point
        if label in failed:
            log.warning("%s: out of memory at batch %d, %d new tokens: larger batches skipped", label, batch,
                        new_tokens)
            rows.append(base | {"metric": "latency_s", "value": None, "status": "oom",
                                "error": str(failed[label]).splitlines()[0][:200]})
            del alive[label]
            _release(device)
            continue
        rows += _point_rows(base, model, lat, pre, mem[label], reference, label, batch, new_tokens, device, prior)
    return rows


def _point_rows(base, model, lat, pre, extra_bytes, reference, label, batch, new_tokens, device,
                prior=None) -> list[dict]:
    latency, prefill = lat[label], pre[label]
    decode_s = statistics.fmean(latency) - statistics.fmean(prefill)
    ok = base | {"status": "ok"}
    rows = [ok | {"metric": "latency_s", "unit": "s"} | summary(latency),
            ok | {"metric": "throughput_tok_s", "unit": "tok/s"} | summary([batch * new_tokens / t for t in latency]),
            ok | {"metric": "prefill_s", "unit": "s"} | summary(prefill),
            ok | {"metric": "decode_s", "unit": "s", "value": decode_s, "n": len(latency)},
            ok | {"metric": "decode_tok_s", "unit": "tok/s",
                  "value": batch * (new_tokens - 1) / decode_s if decode_s > 0 and new_tokens > 1 else None,
                  "n": len(latency)},
            ok | {"metric": "peak_mem_mib", "unit": "MiB", "value": (weight_bytes(model) + extra_bytes) / MIB,
                  "weights_mib": weight_bytes(model) / MIB, "mem_source": "cuda_allocated" if device.type == "cuda"
                  else "rss", "n": len(latency)}]
    if reference and label != reference and reference in lat and lat[reference]:
        ratios = [r / p for r, p in zip(lat[reference], latency)]  # round by round: each pair ran back to back
        rows.append(ok | {"metric": "speedup", "unit": "x", "reference": reference} | summary(ratios))
    elif reference and label != reference and prior:
        ratios = [r / p for r, p in zip(prior, latency)]  # round i of each, measured apart (not interleaved)
        rows.append(ok | {"metric": "speedup", "unit": "x", "reference": reference, "interleaved": False}
                    | summary(ratios))
    if batch == 1 and new_tokens > 1 and decode_s > 0:
        bw, step_bytes = bandwidth_gb_s(device), decode_bytes(model, base["prompt_tokens"] + new_tokens / 2)
        bound = bw * 1e9 / step_bytes
        rows.append(ok | {"metric": "roofline_frac", "unit": "", "value": (new_tokens - 1) / decode_s / bound,
                          "bound_tok_s": bound, "bandwidth_gb_s": bw, "bytes_per_step": step_bytes,
                          "n": len(latency)})
    return rows


def _release(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _compile_limits() -> None:
    """Every model x batch x length is its own compiled graph: lift dynamo's recompile limit (default 8), past
    which it would silently fall back to eager."""
    import torch._dynamo

    for name in ("recompile_limit", "cache_size_limit"):
        if hasattr(torch._dynamo.config, name):
            setattr(torch._dynamo.config, name, max(getattr(torch._dynamo.config, name), 256))


# --- the stage --------------------------------------------------------------------------------------------------

@dataclass
class Reference:
    """The dense reference of a pruning cell's speedups (bench.memory: where it is kept). `mode`: resident (the
    dense model on the accelerator beside the pruned one), cpu (parked in host memory, moved in for its turns),
    reload (measured alone before the cell pruned: `prior`, per-round latencies by point). `model()` gives the
    dense model for resident and cpu."""
    mode: str
    model: Callable | None = None
    prior: dict | None = None


def evaluate(model, tokenizer, cfg, dense: Reference | None = None, progress: Progress | None = None) -> list[dict]:
    """The cell's model, interleaved with the dense base model (`dense`, when the cell prunes) for speedups;
    returns the cell's rows only (the dense figures measured alongside are in its `speedup` rows), each with
    `speed_reference` (the mode). The whole stage is one resumable unit of the cell (bench.records.Progress)."""
    config = OmegaConf.to_container(cfg.eval.speed, resolve=True) | {"seed": int(cfg.seed)}
    return (progress or Progress()).run("speed", config, lambda: _measure_cell(model, tokenizer, cfg, dense))


def reference_latencies(model, tokenizer, cfg) -> dict:
    """speed.reference=reload: the dense model measured alone, at every point of the stage, before the cell
    prunes it; the per-round latencies (`prior_latencies`) the pruned model's speedups are paired with."""
    scfg = cfg.eval.speed
    if "compiled" in scfg.runtimes:
        _compile_limits()
    torch.manual_seed(int(cfg.seed))
    return prior_latencies(measure({"dense": model}, prompt_ids(tokenizer, scfg, model, model.device), scfg))


def _measure_cell(model, tokenizer, cfg, dense) -> list[dict]:
    scfg = cfg.eval.speed
    if "compiled" in scfg.runtimes:
        _compile_limits()
    torch.manual_seed(int(cfg.seed))
    ids = prompt_ids(tokenizer, scfg, model, model.device)
    models, mode = {"model": model}, None
    if dense is not None and scfg.interleave_dense:
        mode = dense.mode
        if mode != "reload":
            models["dense"] = dense.model()
    hf = [r for r in scfg.runtimes if r in HF_RUNTIMES]
    rows = measure(models, ids, OmegaConf.merge(scfg, {"runtimes": hf}), reference="dense" if mode else None,
                   prior=dense.prior if mode == "reload" else None, park=mode == "cpu") if hf else []
    if "llamacpp" in scfg.runtimes:  # the GGUF exports of the same models, timed in llama.cpp
        from bench.evals import llamacpp

        if mode == "reload":
            from bench import BenchError

            raise BenchError("eval.speed.runtimes=[llamacpp] exports the dense model beside the pruned one; "
                             "eval.speed.reference=reload keeps none; allowed: resident, cpu")
        rows += llamacpp.measure(models, ids, cfg, tokenizer, reference="dense" if mode else None)
    out = []
    for row in rows:
        if row.pop("model_label") != "model":
            continue
        out.append({"stage": "speed", "task": "generate", "unit": row.pop("unit", ""), "speed_reference": mode}
                   | row)
        if row["metric"] in ("throughput_tok_s", "speedup") and row.get("value") is not None:
            log.info("%s bs=%d out=%d: %s %.3f", row["runtime"], row["batch_size"], row["new_tokens"],
                     row["metric"], row["value"])
    return out
