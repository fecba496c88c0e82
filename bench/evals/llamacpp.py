"""The llama.cpp speed runtime: the cell's model and the dense model exported to GGUF (bench.export) and timed in
llama.cpp through llama-cpp-python's bindings, interleaved, at every quantization x output length x batch size.

    python -m bench model=smollm2-135m method=depth_ppl ratio=0.2 eval.stages=[speed] \
        eval.speed.runtimes=[eager,llamacpp] +eval.speed.quants=[f16,q4_k_m]
    make sweep SWEEP=edge          # the deployment sweep: speed only, in llama.cpp, f16 and q4_k_m

Needs llama-cpp-python (`make setup-llamacpp`: `pip install .[llamacpp]`, built from source with cmake); without
it the stage stops with one line naming that target. What one run does, per point (quant, new tokens N, batch B):
the prompt's L tokens go in as B sequences in one llama_decode (prefill), then N - 1 decode steps of B tokens,
each token the argmax of the previous step's logits (greedy: llama.cpp's speed does not depend on which token
is fed; sampling here would time numpy), with every core as a thread (n_threads = n_threads_batch) and
llama.cpp's defaults otherwise (f16 KV cache, flash attention auto). Warm-up and rounds follow the other runtimes
(`eval.speed.warmup` runs of `warmup_tokens` new tokens per model, then rounds until `repeats` and
`min_time_s`, the order reversed every other round). Rows, besides the HF runtimes' fields, carry `runtime:
llamacpp`, `quant`, `gguf_arch`, `gguf_mib`, `gguf_types` (the tensor types after llama.cpp's fallbacks) and
`llamacpp_threads`:

    latency_s, throughput_tok_s   one run: prefill + N - 1 decode steps; B x N / latency
    prefill_s, prefill_tok_s      the prefill llama_decode (and the first argmax), measured inside the run; B x L / s
    decode_s, decode_tok_s        mean latency - mean prefill; B x (N - 1) / decode_s
    speedup, decode_speedup       dense / this model, latency and decode time, per interleaved round
    roofline_frac                 (batch 1) decode tok/s over measured copy bandwidth / bytes one step reads: every
                                  tensor of the GGUF file except the token-embedding table (one row is looked up;
                                  a tied table is read whole as the output head) + the f16 KV cache at the mean
                                  context length
"""

from __future__ import annotations

import collections
import ctypes
import logging
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

from bench import BenchError

log = logging.getLogger("bench.llamacpp")

RUNTIME = "llamacpp"
MISSING = "llama-cpp-python is not installed; run `make setup-llamacpp` (pip install .[llamacpp])"
DEFAULT_QUANTS = ("f16", "q4_k_m")
KV_BYTES = 2  # llama.cpp's default K and V cache type: f16
MIB = 2**20

_LIB = {}
_LOG: collections.deque = collections.deque(maxlen=40)  # llama.cpp's recent warnings and errors


def available() -> bool:
    try:
        llama_cpp_lib()
        return True
    except BenchError:
        return False


def llama_cpp_lib():
    """The llama_cpp bindings module, its backend initialised once and its log kept in `_LOG` (warnings and
    errors, for error messages) instead of stderr; a one-line BenchError naming the make target if missing."""
    if "lib" not in _LIB:
        try:
            import llama_cpp
        except ImportError:
            raise BenchError(f"eval.speed.runtimes={RUNTIME}: {MISSING}") from None

        @llama_cpp.llama_log_callback
        def keep(level, text, _user):
            if level in (3, 4) and text:  # GGML_LOG_LEVEL_WARN, ERROR
                _LOG.append(text.decode(errors="replace").rstrip())

        _LIB["callback"] = keep  # kept alive: llama.cpp holds the pointer
        llama_cpp.llama_log_set(keep, ctypes.c_void_p(0))
        llama_cpp.llama_backend_init()
        _LIB["lib"] = llama_cpp
    return _LIB["lib"]


def cores() -> int:
    return len(os.sched_getaffinity(0))


def last_error() -> str:
    return next((line for line in reversed(_LOG) if line.strip()), "no message")


class LlamaCpp:
    """One GGUF file in llama.cpp (CPU) with a context for `n_seq` parallel sequences of `n_ctx_seq` tokens.
    `exact`: f32 KV cache, no flash attention and logits at every position (the round-trip checks)."""

    def __init__(self, path, n_seq: int = 1, n_ctx_seq: int = 256, threads: int | None = None,
                 exact: bool = False, repack: bool = True):
        lib = self.lib = llama_cpp_lib()
        self.model = self.ctx = self.batch = None
        mparams = lib.llama_model_default_params()
        mparams.n_gpu_layers = 0
        mparams.use_extra_bufts = repack
        self.model = lib.llama_model_load_from_file(str(path).encode(), mparams)
        if not self.model:
            raise BenchError(f"llama.cpp cannot load {path}: {last_error()}")
        cparams = lib.llama_context_default_params()
        per_seq = -(-n_ctx_seq // 256) * 256
        cparams.n_ctx, cparams.n_seq_max = n_seq * per_seq, n_seq
        cparams.n_batch = max(512, n_seq * n_ctx_seq)
        cparams.n_threads = cparams.n_threads_batch = threads or cores()
        if exact:
            cparams.type_k = cparams.type_v = 0  # GGML_TYPE_F32
            cparams.flash_attn_type = 0  # LLAMA_FLASH_ATTN_TYPE_DISABLED
            cparams.n_outputs_max_per_seq = 0  # logits at every prompt position
        self.ctx = lib.llama_init_from_model(self.model, cparams)
        if not self.ctx:
            raise BenchError(f"llama.cpp cannot make a context for {path} ({n_seq} x {per_seq}): {last_error()}")
        self.n_vocab = lib.llama_vocab_n_tokens(lib.llama_model_get_vocab(self.model))
        self.memory = lib.llama_get_memory(self.ctx)
        self.capacity = int(cparams.n_batch)
        self.batch = lib.llama_batch_init(self.capacity, 0, n_seq)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False

    def close(self) -> None:
        if self.batch is not None:
            self.lib.llama_batch_free(self.batch)
        if self.ctx:
            self.lib.llama_free(self.ctx)
        if self.model:
            self.lib.llama_model_free(self.model)
        self.model = self.ctx = self.batch = None

    def _decode(self, tokens, positions, seqs, outputs) -> None:
        b = self.batch
        if len(tokens) > self.capacity:
            raise ValueError(f"{len(tokens)} tokens in one batch, the context holds {self.capacity}")
        for i, (token, pos, seq, out) in enumerate(zip(tokens, positions, seqs, outputs)):
            b.token[i], b.pos[i], b.n_seq_id[i], b.logits[i] = int(token), pos, 1, out
            b.seq_id[i][0] = seq
        b.n_tokens = len(tokens)
        rc = self.lib.llama_decode(self.ctx, b)
        if rc != 0:
            raise RuntimeError(f"llama_decode returned {rc}: {last_error()}")

    def _logits(self, n_out: int) -> np.ndarray:
        return np.ctypeslib.as_array(self.lib.llama_get_logits(self.ctx), shape=(n_out, self.n_vocab))

    def run(self, prompt: list[int], n_seq: int, new_tokens: int) -> tuple[float, float, list[list[int]]]:
        """Prefill `prompt` as `n_seq` sequences, then greedy decode to `new_tokens` tokens per sequence:
        (prefill_s, latency_s, tokens per sequence). The KV cache is cleared first."""
        self.lib.llama_memory_clear(self.memory, True)
        n = len(prompt)
        t0 = time.perf_counter()
        self._decode(prompt * n_seq, list(range(n)) * n_seq, [s for s in range(n_seq) for _ in range(n)],
                     [j == n - 1 for _ in range(n_seq) for j in range(n)])
        nxt = self._logits(n_seq).argmax(axis=1)
        t1 = time.perf_counter()
        out = [nxt]
        for step in range(new_tokens - 1):
            self._decode(nxt, [n + step] * n_seq, range(n_seq), [True] * n_seq)
            nxt = self._logits(n_seq).argmax(axis=1)
            out.append(nxt)
        t2 = time.perf_counter()
        return t1 - t0, t2 - t0, np.stack(out, axis=1).tolist()

    def greedy(self, prompt: list[int], new_tokens: int) -> list[int]:
        return self.run(prompt, 1, new_tokens)[2][0]

    def logits(self, prompt: list[int]) -> np.ndarray:
        """[len(prompt), vocab] next-token logits of one sequence (needs `exact`: every position an output)."""
        self.lib.llama_memory_clear(self.memory, True)
        self._decode(prompt, range(len(prompt)), [0] * len(prompt), [True] * len(prompt))
        return self._logits(len(prompt)).copy()


# --- the files: exports of the cell's model and of dense ------------------------------------------------------------

def step_bytes(path: Path, lay, context_len: float) -> float:
    """Bytes one batch-1 decode step reads from a GGUF file (see the module docstring) plus its KV cache."""
    import gguf

    sizes = {t.name: int(t.n_bytes) for t in gguf.GGUFReader(str(path)).tensors}
    weights = sum(sizes.values()) - (0 if "output.weight" not in sizes else sizes["token_embd.weight"])
    kv = sum(2 * kv * lay.head_dim * context_len * KV_BYTES for kv in lay.kv_heads)
    return weights + kv


def _export(model, path: Path, quant: str, cfg, tokenizer):
    from bench.export import export_gguf, tokenizer_source

    t0 = time.perf_counter()
    lay = export_gguf(model, path, quant, name=cfg.model.name, **tokenizer_source(cfg.model, cfg.cache_dir,
                                                                                    tokenizer))
    log.info("exported %s (%s, %.0f MiB) in %.1f s", path.name, lay.arch, path.stat().st_size / MIB,
             time.perf_counter() - t0)
    return lay


def dense_file(model, quant: str, cfg, tokenizer) -> tuple[Path, object]:
    """The dense model's export, made once and kept under <cache_dir>/gguf_exports/<model>/, keyed by its
    weights, the quant and the library versions (every pruning cell of a sweep times against the same file)."""
    from importlib import metadata

    from bench.export import layout
    from bench.models import weight_sums
    from bench.records import fingerprint

    key = fingerprint(weight_sums(model), quant, metadata.version("gguf"), metadata.version("llama_cpp_python"))
    path = Path(cfg.cache_dir) / "gguf_exports" / cfg.model.name / f"dense-{key[:16]}.{quant}.gguf"
    if not path.exists():
        _export(model, path, quant, cfg, tokenizer)
    return path, layout(model)


def quants(scfg) -> list[str]:
    """`eval.speed.quants` (default f16, q4_k_m), checked."""
    from bench.export import QUANTS

    chosen = list(scfg.get("quants") or DEFAULT_QUANTS)
    bad = [q for q in chosen if q not in QUANTS]
    if bad or not chosen:
        raise BenchError(f"eval.speed.quants={chosen!r}: allowed values are {', '.join(QUANTS)}")
    return chosen


def measure(models: dict, ids, cfg, tokenizer, reference: str | None = None) -> list[dict]:
    """Rows (with `model_label`) of every model in `models` ({label: HF model}; `reference` the dense one) in
    llama.cpp at every quant x output length x batch size. The cell's model is exported into a temporary folder,
    dense into the cache."""
    from importlib import metadata

    from bench.evals.speed import bandwidth_gb_s, batch_sizes, summary, warmup_tokens
    from bench.progress import bar

    import torch

    scfg = cfg.eval.speed
    chosen = quants(scfg)
    lib = llama_cpp_lib()
    if tokenizer is None:
        raise BenchError(f"eval.speed.runtimes={RUNTIME}: shape_only=true has no tokenizer for the GGUF's "
                         f"vocabulary; allowed with shape_only: eager, compiled")
    limit = int(lib.llama_max_parallel_sequences())
    if max(batch_sizes(scfg, RUNTIME)) > limit:
        raise BenchError(f"eval.speed.batch_sizes={batch_sizes(scfg, RUNTIME)}: llama.cpp decodes at most {limit} "
                         f"parallel sequences")
    prompt, threads = ids[0].tolist(), cores()
    info = {"runtime": RUNTIME, "llamacpp_threads": threads, "sampling": "greedy",
            "llama_cpp_python": metadata.version("llama_cpp_python")}
    rows = []
    n_points = len(chosen) * len(scfg.new_tokens) * len(batch_sizes(scfg, RUNTIME))
    with tempfile.TemporaryDirectory(dir=Path(cfg.cache_dir)) as tmp, \
            bar(total=n_points, desc="llama.cpp", unit="point") as points:
        for quant in chosen:
            files = {}
            for label, model in models.items():
                if label == reference:
                    files[label] = dense_file(model, quant, cfg, tokenizer)
                else:
                    path = Path(tmp) / f"{label}.{quant}.gguf"
                    files[label] = (path, _export(model, path, quant, cfg, tokenizer))
            facts = {label: _file_facts(path, lay) for label, (path, lay) in files.items()}
            for new_tokens in scfg.new_tokens:
                for batch in sorted(batch_sizes(scfg, RUNTIME)):
                    points.set_postfix_str(f"{quant} bs={batch} out={new_tokens}", refresh=False)
                    point = info | {"batch_size": int(batch), "new_tokens": int(new_tokens),
                                    "prompt_tokens": len(prompt), "quant": quant}
                    times = _rounds(files, prompt, int(batch), int(new_tokens), scfg, threads,
                                    warmup_tokens(RUNTIME, torch.device("cpu"), int(new_tokens), scfg))
                    for label, (path, lay) in files.items():
                        rows += _point_rows(point | {"model_label": label} | facts[label], times, label,
                                            reference, path, lay, bandwidth_gb_s(torch.device("cpu")), summary)
                    _log_point(rows, quant, int(batch), int(new_tokens))
                    points.update()
    return rows


def _log_point(rows: list[dict], quant: str, batch: int, new_tokens: int) -> None:
    """One line per point for the cell's model: decode tok/s, and the speedup where dense ran beside it."""
    got = {r["metric"]: r["value"] for r in rows if r["model_label"] == "model" and r["quant"] == quant
           and r["batch_size"] == batch and r["new_tokens"] == new_tokens}
    log.info("llamacpp %s bs=%d out=%d: decode %.1f tok/s%s", quant, batch, new_tokens, got.get("decode_tok_s") or 0,
             f", speedup {got['speedup']:.3f}" if "speedup" in got else "")


def _file_facts(path: Path, lay) -> dict:
    from bench.export import gguf_types

    return {"gguf_arch": lay.arch, "gguf_mib": path.stat().st_size / MIB, "gguf_types": gguf_types(path)}


def _rounds(files: dict, prompt: list[int], batch: int, new_tokens: int, scfg, threads: int,
            warm_tokens: int) -> dict:
    """{label: {"prefill": [s...], "latency": [s...]}}: warm-up, then interleaved rounds (A B, B A, ...)."""
    engines = {}
    try:
        for label, (path, _) in files.items():
            engines[label] = LlamaCpp(path, n_seq=batch, n_ctx_seq=len(prompt) + new_tokens, threads=threads)
            for _ in range(int(scfg.warmup)):
                engines[label].run(prompt, batch, warm_tokens)
        times = {label: {"prefill": [], "latency": []} for label in files}
        t0, rounds, order = time.perf_counter(), 0, list(files)
        while rounds < int(scfg.repeats) or time.perf_counter() - t0 < float(scfg.min_time_s):
            for label in order if rounds % 2 == 0 else order[::-1]:
                prefill_s, latency_s, _ = engines[label].run(prompt, batch, new_tokens)
                times[label]["prefill"].append(prefill_s)
                times[label]["latency"].append(latency_s)
            rounds += 1
        return times
    finally:
        for engine in engines.values():
            engine.close()


def _point_rows(base: dict, times: dict, label: str, reference, path: Path, lay, bandwidth: float,
                summary) -> list[dict]:
    latency, prefill = times[label]["latency"], times[label]["prefill"]
    batch, new_tokens, n = base["batch_size"], base["new_tokens"], len(latency)
    decode_s = statistics.fmean(latency) - statistics.fmean(prefill)
    decode_tok_s = batch * (new_tokens - 1) / decode_s if decode_s > 0 and new_tokens > 1 else None
    ok = base | {"status": "ok"}
    rows = [ok | {"metric": "latency_s", "unit": "s"} | summary(latency),
            ok | {"metric": "throughput_tok_s", "unit": "tok/s"} | summary([batch * new_tokens / t for t in latency]),
            ok | {"metric": "prefill_s", "unit": "s"} | summary(prefill),
            ok | {"metric": "prefill_tok_s", "unit": "tok/s"}
            | summary([batch * base["prompt_tokens"] / t for t in prefill]),
            ok | {"metric": "decode_s", "unit": "s", "value": decode_s, "n": n},
            ok | {"metric": "decode_tok_s", "unit": "tok/s", "value": decode_tok_s, "n": n}]
    if reference and label != reference:
        ref = times[reference]
        rows.append(ok | {"metric": "speedup", "unit": "x", "reference": reference}
                    | summary([r / p for r, p in zip(ref["latency"], latency)]))
        rows.append(ok | {"metric": "decode_speedup", "unit": "x", "reference": reference}
                    | summary([(rl - rp) / (ml - mp) for rl, rp, ml, mp
                               in zip(ref["latency"], ref["prefill"], latency, prefill)]))
    if batch == 1 and decode_tok_s:
        step = step_bytes(path, lay, base["prompt_tokens"] + new_tokens / 2)
        bound = bandwidth * 1e9 / step
        rows.append(ok | {"metric": "roofline_frac", "unit": "", "value": decode_tok_s / bound, "bound_tok_s": bound,
                          "bandwidth_gb_s": bandwidth, "bytes_per_step": step, "n": n})
    return rows
