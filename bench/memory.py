"""Memory of one cell: where the weights live, each stage's measured peak, and the peak predicted from the
architecture alone.

The plan (issue: a 7B cell on one GPU). On a CUDA device the process keeps the base model parked in host memory and
each cell works on its own copy on the accelerator (`device_copy`), so one full copy of the weights sits there
while a cell scores, prunes and evaluates quality. The speed stage's dense reference is kept only where it fits
(`eval.speed.reference`, resolved by `speed_reference`):

    resident   the dense base on the accelerator beside the pruned model during the speed stage (interleaved)
    cpu        the dense base parked in host memory; each round moves the model it times onto the accelerator and
               the other one off it, so one copy is there at a time (interleaved, plus the transfers)
    reload     the dense model measured alone, in the same process, before the cell prunes (the cell's own copy
               before surgery); the speedups pair its rounds with the pruned model's (not interleaved)

On the CPU the accelerator is the host: the base stays where it is and `auto` is resident.

Every stage of a cell (load, score, prune, retrain, ppl, zeroshot, speed) records its peak accelerator memory
(`torch.cuda.max_memory_allocated`, reset at the stage's start) and its peak host RSS (VmHWM, reset through
/proc/self/clear_refs), in MiB: rows with stage `memory` and task = the stage; `tables/memory.md` shows them. Nested
resets (the speed stage resets the peak around each generate) fold into the open stage's peak first.

    python -m bench.memory model=llama-7b          # the predicted peak of each stage, from the config alone
    python -m bench.memory model=llama-13b method=llm_pruner
"""

from __future__ import annotations

import copy
import ctypes
import logging
import re
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

log = logging.getLogger("bench.memory")
MIB = 2**20
REFERENCES = ("auto", "resident", "cpu", "reload")


# --- measuring ---------------------------------------------------------------------------------------------------

def _status_kib(field_name: str) -> int | None:
    try:
        text = Path("/proc/self/status").read_text()
    except OSError:
        return None
    m = re.search(rf"^{field_name}:\s+(\d+) kB", text, re.M)
    return int(m.group(1)) if m else None


def rss_bytes() -> int | None:
    """The process's resident set now (VmRSS), or None where /proc has none."""
    kib = _status_kib("VmRSS")
    return None if kib is None else kib * 1024


def hwm_bytes() -> int | None:
    """The process's peak resident set since the last `reset_peaks` (VmHWM), or None where /proc has none."""
    kib = _status_kib("VmHWM")
    return None if kib is None else kib * 1024


def malloc_trim() -> None:
    """Hand the C heap's free pages back to the OS, so that RSS is live memory (glibc otherwise keeps freed
    buffers resident and a later peak measures the earlier one)."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


_OPEN: list["StagePeak"] = []  # the stage trackers open now (outermost first)


def reset_peaks(device: torch.device) -> None:
    """Reset the CUDA peak (device) and the host high-water mark, after folding the peaks so far into every open
    `StagePeak`: the one way to reset them (bench.evals.speed resets around each generate)."""
    for tracker in _OPEN:
        tracker.fold()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    malloc_trim()
    try:
        Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
    except OSError:
        pass


@dataclass
class StagePeak:
    """Peak accelerator memory and host RSS over a `with` block (a cell's stage), in bytes, and its wall time.

        with StagePeak(model.device) as peak:
            score(...)
        peak.row("score")
    """
    device: torch.device
    accel_bytes: int | None = None
    host_bytes: int | None = None
    wall_s: float = 0.0
    _t0: float = field(default=0.0, repr=False)

    def fold(self) -> None:
        if self.device.type == "cuda":
            self.accel_bytes = max(self.accel_bytes or 0, torch.cuda.max_memory_allocated(self.device))
        hwm = hwm_bytes()
        if hwm is not None:
            self.host_bytes = max(self.host_bytes or 0, hwm)

    def __enter__(self):
        reset_peaks(self.device)
        _OPEN.append(self)
        self._t0 = time.perf_counter()
        return self

    def __exit__(self, *exc):
        self.wall_s = time.perf_counter() - self._t0
        self.fold()
        _OPEN.remove(self)
        return False

    def rows(self, stage: str, **extra) -> list[dict]:
        """The memory rows of this stage: peak_accel_mib (None on a CPU device) and peak_host_rss_mib."""
        base = {"stage": "memory", "task": stage, "unit": "MiB", "wall_s": self.wall_s} | extra
        accel = None if self.accel_bytes is None else self.accel_bytes / MIB
        host = None if self.host_bytes is None else self.host_bytes / MIB
        log.info("stage %s: %.1f s, peak %s accelerator, %s host RSS", stage, self.wall_s,
                 "-" if accel is None else f"{accel:.0f} MiB", "-" if host is None else f"{host:.0f} MiB")
        return [base | {"metric": "peak_accel_mib", "value": accel},
                base | {"metric": "peak_host_rss_mib", "value": host}]


# --- where the weights live --------------------------------------------------------------------------------------

def weight_bytes(model) -> int:
    """Bytes of the model's parameters (what a copy moves and a decode step reads; buffers are a few KiB)."""
    return sum(p.numel() * p.element_size() for p in model.parameters())


def device_copy(model, device: torch.device):
    """A deep copy of `model` whose tensors are created directly on `device`: parking the base on the host costs
    no second host copy when a cell takes its own copy onto the accelerator."""
    memo = {}
    for p in model.parameters():
        memo[id(p)] = torch.nn.Parameter(p.detach().to(device, copy=True), requires_grad=p.requires_grad)
    for b in model.buffers():
        memo[id(b)] = b.detach().to(device, copy=True)
    compiled = model.__dict__.get("_compiled_call")
    if compiled is not None:
        memo[id(compiled)] = None
    clone = copy.deepcopy(model, memo)
    # transformers keeps `torch.compile(self.__call__)` on a model that generated with the compiled runtime: bound
    # to the original, a copy would run the original's weights (and graphs). The copy compiles its own.
    clone.__dict__.pop("_compiled_call", None)
    return clone


def host_available_bytes() -> int | None:
    """The host's available memory (/proc/meminfo MemAvailable), or None where /proc has none."""
    try:
        text = Path("/proc/meminfo").read_text()
    except OSError:
        return None
    m = re.search(r"^MemAvailable:\s+(\d+) kB", text, re.M)
    return int(m.group(1)) * 1024 if m else None


def accel_free_bytes(device: torch.device) -> int | None:
    """Free accelerator memory (torch.cuda.mem_get_info) plus what the caching allocator holds unused; None off
    CUDA."""
    if device.type != "cuda":
        return None
    free, _total = torch.cuda.mem_get_info(device)
    # memory the caching allocator holds but does not use is free for our tensors too
    return free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)


def speed_reference(requested: str, device: torch.device, dense_bytes: int, speed_bytes: int,
                    host_parked: bool) -> str:
    """The speed stage's dense reference mode. `auto`: resident when the accelerator's free memory (the pruned
    model already there) holds the dense weights plus the speed stage's own peak (`speed_bytes`: KV cache and
    logits at the largest batch); else cpu when the base is parked in host memory; else reload."""
    if requested not in REFERENCES:
        from bench import BenchError

        raise BenchError(f"eval.speed.reference={requested!r}: allowed values are {', '.join(REFERENCES)}")
    if requested != "auto":
        return requested
    if device.type != "cuda":
        return "resident"
    if accel_free_bytes(device) >= dense_bytes + speed_bytes:
        return "resident"
    return "cpu" if host_parked else "reload"


# --- prediction --------------------------------------------------------------------------------------------------

GRADIENT_METHODS = ("depth_taylor", "llm_pruner")  # scored through a backward


@dataclass(frozen=True)
class Shape:
    """What the prediction needs of an architecture (a LLaMA-style decoder)."""
    layers: int
    hidden: int
    heads: int
    kv_heads: int
    intermediate: int
    vocab: int
    tied: bool
    qkv_bias: bool = False  # Qwen2: biases on q, k and v_proj

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    @property
    def params(self) -> int:
        kv = self.kv_heads * self.head_dim
        block = 2 * self.hidden * self.hidden + 2 * self.hidden * kv + 3 * self.hidden * self.intermediate \
            + 2 * self.hidden + ((self.hidden + 2 * kv) if self.qkv_bias else 0)
        return self.layers * block + self.vocab * self.hidden * (1 if self.tied else 2) + self.hidden

    @classmethod
    def of(cls, config) -> "Shape":
        return cls(layers=config.num_hidden_layers, hidden=config.hidden_size, heads=config.num_attention_heads,
                   kv_heads=getattr(config, "num_key_value_heads", None) or config.num_attention_heads,
                   intermediate=config.intermediate_size, vocab=config.vocab_size,
                   tied=bool(getattr(config, "tie_word_embeddings", False)),
                   qkv_bias=bool(getattr(config, "attention_bias", config.model_type == "qwen2")))


def predict(shape: Shape, method: str = "depth_taylor", ratio: float = 0.2, dtype_bytes: int = 2,
            calib_batch: int = 10, calib_len: int = 128, ppl_batch: int = 8, ppl_len: int = 128,
            zs_batch: int = 8, zs_len: int = 256, speed_batch: int = 256, speed_len: int = 11 + 512,
            score_fp32: bool = False, reference: str = "resident") -> dict[str, dict[str, float]]:
    """Predicted peak accelerator bytes of each stage, split into weights, gradients (or folded scores),
    activations and logits: the model's own arithmetic, no measurement. Defaults: the full evaluation preset
    (ppl 8 x 128, zero-shot batch 8 of contexts up to 256 tokens, speed up to batch 256 x (11 + 512) tokens) and
    the paper's calibration (10 x 128). Activations count what autograd keeps per block for a backward (LLaMA
    block with SDPA attention: norms, q/k/v, attention output, gate/up/act/product) or, without a backward, one
    block's working set; logits are the LM head's output and its fp32 log-softmax. Gradients never pile up: the
    Taylor criteria fold each one into per-unit sums as it is accumulated (bench/methods/grads.py), so the
    `gradients` part is one matrix's gradient in flight plus the sums (LLM-Pruner's own code keeps them all: one
    more copy of the weights, in fp32 under its protocol)."""
    W = shape.params * dtype_bytes
    kv_dim = shape.kv_heads * shape.head_dim
    embed_W = shape.vocab * shape.hidden * dtype_bytes * (1 if shape.tied else 2)  # embedding + head: never pruned
    pruned_W = (1 - ratio) * (W - embed_W) + embed_W

    def block_saved(tokens: int, b: int) -> float:  # bytes autograd keeps per block for its backward
        return tokens * (6 * shape.hidden + 2 * kv_dim + 4 * shape.intermediate) * b + tokens * 2 * shape.hidden * 4

    def block_working(tokens: int, b: int) -> float:  # a forward's live set inside one block
        return tokens * (3 * shape.hidden + 2 * kv_dim + 3 * shape.intermediate) * b

    def logits(tokens: int) -> float:  # LM head output (model dtype) + fp32 upcast + log-softmax
        return tokens * shape.vocab * (dtype_bytes + 2 * 4)

    calib_tokens = calib_batch * calib_len
    score_bytes = 4 if score_fp32 else dtype_bytes
    Ws = shape.params * score_bytes
    out: dict[str, dict[str, float]] = {"load": {"weights": W}}
    if method in GRADIENT_METHODS:  # gradients folded into per-unit sums as they arrive (bench/methods/grads.py):
        # one block matrix's gradient at a time, plus the sums
        largest = max(shape.hidden * shape.intermediate, shape.hidden * shape.hidden) * score_bytes
        out["score"] = {"weights": Ws, "gradients": 2 * largest + shape.layers * (shape.hidden + shape.intermediate) * 8,
                        "activations": shape.layers * block_saved(calib_tokens, score_bytes),
                        "logits": logits(calib_tokens) + calib_tokens * shape.vocab * 4}
    else:  # forward-only statistics: per-channel sums, per-block outputs, or covariances (SliceGPT, fp64 h x h)
        folded = 2 * shape.hidden * shape.hidden * 8 if method == "slicegpt" else \
            shape.layers * (shape.hidden + shape.intermediate) * 4 * 4
        out["score"] = {"weights": Ws, "gradients": folded,
                        "activations": block_working(calib_tokens, score_bytes) +
                        (shape.layers + 1) * calib_tokens * shape.hidden * score_bytes,
                        "logits": logits(calib_tokens)}
    out["prune"] = {"weights": W, "activations": 2 * shape.hidden * max(shape.intermediate, shape.hidden) *
                    dtype_bytes}  # one layer's matrices rebuilt at a time
    out["ppl"] = {"weights": pruned_W, "activations": block_working(ppl_batch * ppl_len, dtype_bytes),
                  "logits": logits(ppl_batch * ppl_len)}
    out["zeroshot"] = {"weights": pruned_W, "activations": block_working(zs_batch * zs_len, dtype_bytes),
                       "logits": logits(zs_batch * zs_len)}
    # The speed stage's peak is the dense model's turn (it has the longer KV cache): its weights and KV cache at
    # the largest batch and length, plus the pruned weights where the reference is resident beside it.
    dense_kv = 2 * shape.layers * speed_batch * speed_len * kv_dim * dtype_bytes
    out["speed"] = {"weights": W + (pruned_W if reference == "resident" else 0), "activations": dense_kv,
                    "logits": speed_batch * shape.vocab * (dtype_bytes + 4 * 2)}
    return {stage: parts | {"total": sum(parts.values())} for stage, parts in out.items()}


def predict_retrain(shape: Shape, regime: str = "kd", ratio: float = 0.2, gpus: int = 1, params: str = "full",
                    micro_batch: int = 1, seq_len: int = 4096, dtype_bytes: int = 2, lora_r: int = 8,
                    shard: bool = True) -> dict[str, float]:
    """Predicted peak bytes per GPU of token-budget retraining (bench/distill.py) of the model pruned at `ratio`,
    on `gpus` GPUs with FSDP full sharding (`shard`) or DDP (every rank a full copy), bf16 compute:
        states       full: 16 bytes a student parameter (fp32 master weights, fp32 gradients, AdamW's two fp32
                     moments), sharded over the GPUs; lora: the frozen bf16 student (sharded) + 16 bytes an
                     adapter parameter (r x (in + out) on q, k, v, o, gate, up, down)
        teacher      the unpruned model in bf16, sharded likewise (kept for cpt too: its held-out KL)
        gathered     FSDP: two blocks' bf16 weights gathered at a time (the one computing, the one prefetched)
        activations  what autograd keeps for the student's backward over micro_batch x seq_len tokens
        logits       the student's and (kd) the teacher's logits in bf16 + fp32 log-softmax, for the KL
    """
    pruned_blocks = round((1 - ratio) * shape.layers)
    block = (shape.params - shape.vocab * shape.hidden * (1 if shape.tied else 2) - shape.hidden) / shape.layers
    student = shape.params - (shape.layers - pruned_blocks) * block
    n = gpus if shard else 1
    tokens = micro_batch * seq_len
    kv_dim = shape.kv_heads * shape.head_dim
    saved = tokens * (6 * shape.hidden + 2 * kv_dim + 4 * shape.intermediate) * dtype_bytes + tokens * 2 * shape.hidden * 4
    if params == "full":
        states = 16 * student / n
    else:
        adapters = pruned_blocks * lora_r * (4 * shape.hidden + 2 * (shape.hidden + kv_dim) + 3 *
                                             (shape.hidden + shape.intermediate))
        states = dtype_bytes * student / n + 16 * adapters
    out = {"states": states, "teacher": dtype_bytes * shape.params / n,
           "gathered": 2 * block * dtype_bytes if shard and gpus > 1 else 0.0,
           "activations": pruned_blocks * saved,
           "logits": (2 if regime == "kd" else 1) * tokens * shape.vocab * (dtype_bytes + 2 * 4)}
    return out | {"total": sum(out.values())}


def retrain_table(shape: Shape, ratio: float, params: str, micro_batch: int, seq_len: int) -> str:
    """Per-GPU peaks of kd and cpt on 1, 2, 4 and 8 GPUs (FSDP full shard), GiB."""
    lines = ["| regime | params | " + " | ".join(f"{g} GPU{'s' if g > 1 else ''}" for g in (1, 2, 4, 8)) + " |",
             "|---|---|" + "---|" * 4]
    for regime in ("kd", "cpt"):
        cells = [predict_retrain(shape, regime, ratio, g, params, micro_batch, seq_len)["total"] / 2**30
                 for g in (1, 2, 4, 8)]
        lines.append(f"| {regime} | {params} | " + " | ".join(f"{c:.1f}" for c in cells) + " |")
    return "\n".join(lines)


SAMPLING_BYTES = 40  # per batch row x vocab entry: generate's fp32 copy of the last logits, top-k's mask and masked
# copy, top-p's sorted values (fp32) + int64 indices + softmax + cumsum + masks, the final softmax (as
# bench.evals.speed samples: top_k 50, top_p 0.95)


def _block_sizes(model) -> tuple[list[int], int, int, int, int]:
    """(per-block key width, largest query width, largest head count, largest MLP width, hidden width) of a loaded
    decoder, read from its modules so that a width-pruned model counts what it kept; a fused block (Phi-3's
    qkv_proj, gate_up_proj) counts the config's heads and half its gate_up_proj."""
    cfg = model.config
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    kv_heads = getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
    kv, q, mlp = [], [], []
    for layer in model.model.layers:
        attn, ff = layer.self_attn, layer.mlp
        kv.append(attn.k_proj.out_features if hasattr(attn, "k_proj") else kv_heads * head_dim)
        q.append(attn.q_proj.out_features if hasattr(attn, "q_proj") else cfg.num_attention_heads * head_dim)
        mlp.append(ff.gate_proj.out_features if hasattr(ff, "gate_proj") else ff.gate_up_proj.out_features // 2)
    hidden = model.get_input_embeddings().weight.shape[1]
    return kv or [0], max(q, default=0), max(q, default=0) // head_dim, max(mlp, default=0), hidden


def speed_point_bytes(model, batch: int, prompt_tokens: int, new_tokens: int) -> int | None:
    """Predicted peak bytes one speed point's generate allocates above `model`'s weights (batch rows of
    `prompt_tokens` + `new_tokens`), from the model's block sizes: the KV cache at full length plus one block's
    copy (the dynamic cache concatenates), the prefill's working set in one block (q/k/v, the attention scores of
    the CPU's math path, the MLP), one block's keys and values repeated to every query head (grouped-query
    attention), the sampling of the last logits (SAMPLING_BYTES per batch x vocab) and the token ids; within
    0.8-1.4x of the measured peak on tiny-llama, tiny-llama-gqa and smollm2-135m (fp32, CPU, batch 16-2048;
    tests/test_memory.py). The speed stage skips a point whose prediction exceeds the free memory (`free_bytes`) instead of
    growing until the kernel kills the process. None for a module that is no LLaMA-style decoder (no config or
    model.model.layers): nothing to predict from.

        python -m bench model=tiny-llama method=dense eval=quick eval.stages=[speed] eval.speed.batch_sizes=[100000]
    """
    if not hasattr(model, "config") or not hasattr(getattr(model, "model", None), "layers"):
        return None
    kv, q_width, heads, mlp_width, hidden = _block_sizes(model)
    dtype_bytes = next(model.parameters()).element_size()
    length = prompt_tokens + new_tokens
    cache = 2 * batch * length * dtype_bytes * (sum(kv) + max(kv) + q_width)
    prefill = batch * prompt_tokens * (3 * hidden + q_width + 2 * max(kv) + 3 * mlp_width) * dtype_bytes \
        + batch * heads * prompt_tokens ** 2 * 4
    sampling = batch * model.get_output_embeddings().weight.shape[0] * (dtype_bytes + SAMPLING_BYTES)
    ids = 2 * batch * length * 8
    return int(cache + prefill + sampling + ids)


def free_bytes(device: torch.device) -> int | None:
    """Memory a speed point may still allocate: the accelerator's free memory on CUDA (`accel_free_bytes`), the
    host's available memory (/proc/meminfo MemAvailable, `host_available_bytes`) on the CPU; None where neither
    can be read."""
    return accel_free_bytes(device) if device.type == "cuda" else host_available_bytes()


def predicted_speed_bytes(model, scfg) -> int:
    """The speed stage's own peak above the weights (`speed_point_bytes` at the largest batch and length) for
    `model` (a loaded module): what `speed_reference(auto)` must find free besides the dense weights."""
    batch = max(int(b) for b in scfg.batch_sizes)
    return speed_point_bytes(model, batch, int(scfg.get("prompt_tokens", 11)),
                             max(int(n) for n in scfg.new_tokens)) or 0


def table(predicted: dict[str, dict[str, float]]) -> str:
    parts = ("weights", "gradients", "activations", "logits", "total")
    head = "| stage | " + " | ".join(f"{p} GiB" for p in parts) + " |"
    lines = [head, "|" + "---|" * (len(parts) + 1)]
    for stage, v in predicted.items():
        lines.append(f"| {stage} | " + " | ".join(f"{v[p] / 2**30:.2f}" if p in v else "-" for p in parts) + " |")
    return "\n".join(lines)


def _main(argv: list[str]) -> None:
    from bench.config import compose
    from bench.models import hf_config

    cfg = compose(argv)
    shape = Shape.of(hf_config(cfg.model))
    method = cfg.method.get("name", "dense")
    fp32 = cfg.get("protocol") == "native" and method in GRADIENT_METHODS
    calib = cfg.shared_calib
    # dtype=auto: bf16, as a GPU node runs the cell (the plan is for the accelerator); dtype=float32 for a CPU run
    dtype = "bfloat16" if cfg.dtype == "auto" else str(cfg.dtype)
    dtype_bytes = 4 if dtype == "float32" else 2
    pred = predict(shape, method=method, ratio=float(cfg.ratio), calib_batch=int(calib.n_samples),
                   calib_len=int(calib.seq_len), ppl_batch=int(cfg.eval.ppl.batch_size),
                   ppl_len=int(cfg.eval.ppl.seq_len),
                   zs_batch=int(cfg.eval.zeroshot.batch_size) if str(cfg.eval.zeroshot.batch_size).isdigit() else 8,
                   speed_batch=max(int(b) for b in cfg.eval.speed.batch_sizes),
                   speed_len=int(cfg.eval.speed.prompt_tokens) + max(int(n) for n in cfg.eval.speed.new_tokens),
                   score_fp32=fp32, dtype_bytes=dtype_bytes)
    print(f"{cfg.model.name}: {shape.params:,} params, {dtype} weights {shape.params * dtype_bytes / 2**30:.2f} GiB; "
          f"method {method}, ratio {float(cfg.ratio):g}")
    print(table(pred))
    peak = max(v["total"] for v in pred.values())
    print(f"predicted peak: {peak / 2**30:.2f} GiB ({max(pred, key=lambda s: pred[s]['total'])})")
    rc = cfg.retrain
    if rc.name in ("kd", "cpt"):
        print(f"retraining per GPU, predicted for FSDP full sharding (bench.distill runs DDP today), bf16; "
              f"micro-batch {rc.micro_batch} x {rc.seq_len} tokens, {rc.params} parameters, GiB:")
        print(retrain_table(shape, float(cfg.ratio), rc.params, int(rc.micro_batch), int(rc.seq_len)))


if __name__ == "__main__":
    _main(sys.argv[1:])
