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
larger batches at that length.

Runtimes: `eager` (plain generate with the dynamic KV cache, what the paper measured) and `compiled` (static KV
cache with torch.compile; CUDA graphs through mode reduce-overhead on a GPU).

    python -m bench method=depth_ppl eval.stages=[speed] eval.speed.batch_sizes=[1,4,16] eval.speed.new_tokens=[32]
"""

from __future__ import annotations

import ctypes
import gc
import logging
import math
import re
import statistics
import time
from pathlib import Path

import torch
from omegaconf import OmegaConf

from bench.progress import bar
from bench.records import Progress

log = logging.getLogger("bench.speed")

RUNTIMES = ("eager", "compiled")
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


def _proc_status_kib(field: str) -> int:
    return int(re.search(rf"^{field}:\s+(\d+) kB", Path("/proc/self/status").read_text(), re.M).group(1))


def _malloc_trim() -> None:
    """Hand the C heap's free pages back to the OS, so that RSS is live memory and a run's peak RSS above it is
    what the run allocated (glibc otherwise keeps earlier runs' freed buffers resident and reuses them)."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


class PeakMemory:
    """Peak bytes allocated above the level at entry: CUDA allocator, or process RSS on the CPU."""

    def __init__(self, device: torch.device):
        self.device, self.extra_bytes = device, 0

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            self.before = torch.cuda.memory_allocated(self.device)
        else:
            _malloc_trim()
            Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
            self.before = _proc_status_kib("VmRSS") * 1024
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            peak = torch.cuda.max_memory_allocated(self.device)
        else:
            peak = _proc_status_kib("VmHWM") * 1024
        self.extra_bytes = max(0, peak - self.before)
        return False


def is_oom(exc: BaseException) -> bool:
    return isinstance(exc, (torch.OutOfMemoryError, MemoryError)) or "out of memory" in str(exc).lower()


def weight_bytes(model) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


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

def measure(models: dict, ids: torch.Tensor, scfg, reference: str | None = None) -> list[dict]:
    """Interleaved speed and memory of `models` ({label: model}) at every runtime x output length x batch
    size. Returns one row per label x runtime x length x batch x metric; `reference` names the model the
    others' speedups are against. A bar counts the points (runtime x length x batch), each one's warm-up and
    interleaved rounds of every model."""
    rows = []
    n_points = len(scfg.runtimes) * len(scfg.new_tokens) * len(scfg.batch_sizes)
    with bar(total=n_points, desc="speed", unit="point") as points:
        for runtime in scfg.runtimes:
            if runtime not in RUNTIMES:
                from bench import BenchError

                raise BenchError(f"eval.speed.runtimes: {runtime!r}; allowed values are {', '.join(RUNTIMES)}")
            for new_tokens in scfg.new_tokens:
                alive = dict(models)
                for batch in sorted(scfg.batch_sizes):
                    points.set_postfix_str(f"{runtime} bs={batch} out={new_tokens}", refresh=False)
                    rows += _measure_point(alive, ids, int(batch), int(new_tokens), runtime, scfg, reference)
                    points.update()
    return rows


def warmup_tokens(runtime: str, device: torch.device, new_tokens: int, scfg) -> int:
    """New tokens per warm-up generate. A compiled runtime warms at the measured shape (a static cache of another
    length would recompile); so does a GPU, where the first generate through each new KV length pays one-time
    costs (on an H200, llama-7b's first 128-token run after a 2-token warm-up took up to 3.4x as long as the next).
    Eager on the CPU warms with `warmup_tokens`, which saves minutes per sweep."""
    if runtime == "compiled" or device.type == "cuda":
        return new_tokens
    return min(new_tokens, int(scfg.warmup_tokens))


def _measure_point(alive: dict, ids, batch: int, new_tokens: int, runtime: str, scfg, reference) -> list[dict]:
    device, x = ids.device, ids.repeat(batch, 1)
    point = {"batch_size": batch, "new_tokens": new_tokens, "prompt_tokens": ids.shape[1], "runtime": runtime}
    lat = {k: [] for k in alive}
    pre = {k: [] for k in alive}
    mem = {k: 0 for k in alive}
    failed = {}
    warm_tokens = warmup_tokens(runtime, device, new_tokens, scfg)
    for label, model in list(alive.items()):
        try:
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
        order = [k for k in alive if k not in failed]
        if not order:
            break
        for label in order if rounds % 2 == 0 else order[::-1]:
            model = alive[label]
            try:
                pre[label].append(timed(lambda: generate(model, x, 1, runtime), device))
                with PeakMemory(device) as peak:
                    lat[label].append(timed(lambda: generate(model, x, new_tokens, runtime), device))
                mem[label] = max(mem[label], peak.extra_bytes)
            except Exception as exc:  # noqa: BLE001
                if not is_oom(exc):
                    raise
                failed[label] = exc
        rounds += 1
    rows = []
    for label, model in list(alive.items()):
        base = {"model_label": label} | point
        if label in failed:
            log.warning("%s: out of memory at batch %d, %d new tokens: larger batches skipped", label, batch,
                        new_tokens)
            rows.append(base | {"metric": "latency_s", "value": None, "status": "oom",
                                "error": str(failed[label]).splitlines()[0][:200]})
            del alive[label]
            _release(device)
            continue
        rows += _point_rows(base, model, lat, pre, mem[label], reference, label, batch, new_tokens, device)
    return rows


def _point_rows(base, model, lat, pre, extra_bytes, reference, label, batch, new_tokens, device) -> list[dict]:
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

def evaluate(model, tokenizer, cfg, dense=None, progress: Progress | None = None) -> list[dict]:
    """The cell's model, interleaved with the dense base model (`dense()`, when the cell prunes) for speedups;
    returns the cell's rows only (the dense figures measured alongside are in its `speedup` rows). The whole
    stage is one resumable unit of the cell (bench.records.Progress)."""
    config = OmegaConf.to_container(cfg.eval.speed, resolve=True) | {"seed": int(cfg.seed)}
    return (progress or Progress()).run("speed", config, lambda: _measure_cell(model, tokenizer, cfg, dense))


def _measure_cell(model, tokenizer, cfg, dense) -> list[dict]:
    scfg = cfg.eval.speed
    if "compiled" in scfg.runtimes:
        _compile_limits()
    torch.manual_seed(int(cfg.seed))
    ids = prompt_ids(tokenizer, scfg, model, model.device)
    models = {"model": model}
    if dense is not None and scfg.interleave_dense:
        models["dense"] = dense()
    rows = measure(models, ids, scfg, reference="dense" if "dense" in models else None)
    out = []
    for row in rows:
        if row.pop("model_label") != "model":
            continue
        out.append({"stage": "speed", "task": "generate", "unit": row.pop("unit", "")} | row)
        if row["metric"] in ("throughput_tok_s", "speedup") and row.get("value") is not None:
            log.info("%s bs=%d out=%d: %s %.3f", row["runtime"], row["batch_size"], row["new_tokens"],
                     row["metric"], row["value"])
    return out
