"""Token-budget retraining on general text: logit distillation from the unpruned model (`kd`) or continued
pre-training (`cpt`), the two regimes the depth-vs-width verdict now turns on (Minitron: width ahead of depth once
both are distilled; Shortened LLaMA v2: CPT recovers aggressive depth pruning).

    python -m bench method=depth_ppl ratio=0.2 retrain=kd retrain.tokens=65536
    python -m bench method=flap ratio=0.2 retrain=cpt retrain.params=lora
    torchrun --nproc-per-node=2 -m bench model=tiny-llama-gqa method=depth_ppl ratio=0.25 retrain=kd \\
        retrain.tokens=8192 eval=quick eval.stages=[ppl]

What one run does (conf/retrain/_tokens_.yaml holds the keys):
    data       packed sequences of seq_len + 1 tokens from the data root's corpus/ (46 Gutenberg books, the
               val_books with the lowest ids held out whole) or a streamed hub dataset; books joined by EOS; a
               seeded permutation of the sequences, a new one each pass
    budget     training stops at exactly `tokens` target tokens: every step takes micro_batch x grad_accum
               sequences of seq_len targets, the last one only what the budget has left
    loss       kd: forward KL(teacher || student) of the next-token distributions at temperature T, times T^2, mean
               over the global batch's targets (+ hidden_weight x the MSE of RMS-normalized residual streams, each
               student layer against the teacher layer it came from); cpt: the next-token cross-entropy
    optimizer  AdamW, linear warm-up over warmup_frac of the steps, cosine decay to min_lr, gradients clipped to
               max_grad_norm; bf16 autocast on CUDA
    params     full (every weight) or lora (adapters on lora.target_modules, merged at the end: the evaluated model
               has exactly the pruned parameter count)
    held out   LM loss and KL to the teacher on val_sequences held-out sequences, before the first step and at
               `evals` points along the run; retrain.json keeps every curve against tokens seen
    resume     a checkpoint (weights, optimizer, schedule, step = data position, RNG) every checkpoint_s seconds
               of training, written atomically into the cell directory; a killed run resumes from it and its
               curves continue the interrupted ones
    many GPUs  under torchrun (WORLD_SIZE > 1): DDP, each rank the sequences i % world == rank of every global
               batch, the loss scaled so the averaged gradient equals the single-process one; rank 0 alone writes

The model evaluated is the last one, not the one with the lowest held-out loss: the comparison is at an equal
token budget, which the cosine schedule spends to its end, and the held-out books are not for model selection.
"""

from __future__ import annotations

import csv
import gzip
import io
import logging
import math
import os
import random
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

from bench import BenchError
from bench.models import weight_sums
from bench.progress import bar
from bench.records import fingerprint, is_writer, write_atomic

log = logging.getLogger("bench.distill")
CHECKPOINT = "retrain_ckpt.pt"


# ---------------------------------------------------------------- data


def corpus_books(data_root) -> list[tuple[int, Path]]:
    """(Gutenberg id, path) of every book of `<data_root>/corpus/`, by id (MANIFEST.tsv)."""
    root = Path(data_root) / "corpus"
    manifest = root / "MANIFEST.tsv"
    if not manifest.is_file():
        raise BenchError(f"retrain.data=corpus: missing {manifest}; set data_root (env BENCH_DATA) to a directory "
                         f"laid out as shared/data, or retrain.data=hub:<dataset>[:<config>] on a node with internet")
    with open(manifest, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f, delimiter="\t"))
    return sorted((int(r["pg_id"]), root / r["file"]) for r in rows)


def tokenizer_key(tokenizer) -> str:
    return fingerprint(type(tokenizer).__name__, sorted(tokenizer.get_vocab().items()), tokenizer.eos_token_id)


def _join(tokenizer, texts) -> torch.Tensor:
    """The texts' token ids (no special tokens), each followed by EOS, as one LongTensor."""
    eos = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else 0
    ids: list[int] = []
    for text in texts:
        ids += tokenizer(text, add_special_tokens=False)["input_ids"] + [eos]
    return torch.tensor(ids, dtype=torch.long)


def corpus_tokens(tokenizer, data_root, cache_dir, val_books: int) -> tuple[torch.Tensor, torch.Tensor, str]:
    """(train ids, held-out ids, source) of the local corpus; tokenized once per tokenizer and cached (the 8.8M
    tokens of the 46 books take about a minute to tokenize on 2 cores)."""
    books = corpus_books(data_root)
    if not 0 < val_books < len(books):
        raise BenchError(f"retrain.val_books={val_books}: must be in [1, {len(books) - 1}] (the corpus has "
                         f"{len(books)} books)")
    held = {pg for pg, _ in books[:val_books]}
    source = f"local:corpus ({len(books) - val_books} books; held out: {', '.join(map(str, sorted(held)))})"
    path = Path(cache_dir) / "corpus" / f"{fingerprint(tokenizer_key(tokenizer), [str(p) for _, p in books], val_books)[:20]}.pt"
    if path.is_file():
        try:
            stored = torch.load(path, weights_only=True)
            return stored["train"], stored["val"], source
        except Exception as e:  # noqa: BLE001 (a cut or garbled cache: tokenize again)
            log.warning("token cache %s is damaged (%s): tokenizing the corpus again", path, type(e).__name__)

    def read(p: Path) -> str:
        with gzip.open(p, "rt", encoding="utf-8") as f:
            return f.read()

    t0 = time.perf_counter()
    train = _join(tokenizer, (read(p) for pg, p in books if pg not in held))
    val = _join(tokenizer, (read(p) for pg, p in books if pg in held))
    log.info("corpus: %d training and %d held-out tokens, tokenized in %.0f s", len(train), len(val),
             time.perf_counter() - t0)
    buf = io.BytesIO()
    torch.save({"train": train, "val": val}, buf)
    write_atomic(path, buf.getvalue())
    return train, val, source


def hub_tokens(tokenizer, spec: str, need_train: int, need_val: int) -> tuple[torch.Tensor, torch.Tensor, str]:
    """`hub:<dataset>[:<config>]` streamed: the first documents fill the held-out tokens, the next the training
    tokens (the budget's worth; no second pass)."""
    from datasets import load_dataset

    name, _, config = spec.removeprefix("hub:").partition(":")
    stream = load_dataset(name, config or None, split="train", streaming=True)
    eos = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else 0
    val: list[int] = []
    train: list[int] = []
    for doc in stream:
        ids = tokenizer(doc["text"], add_special_tokens=False)["input_ids"] + [eos]
        (val if len(val) < need_val else train).extend(ids)
        if len(train) >= need_train:
            break
    return torch.tensor(train), torch.tensor(val), f"hub:{name}" + (f":{config}" if config else "")


class Packed:
    """Sequences of seq_len + 1 tokens cut from one token stream at stride seq_len, in a seeded permutation per
    pass: `sequence(k)` is the k-th of the endless stream, so a step's sequences follow from its index alone."""

    def __init__(self, ids: torch.Tensor, seq_len: int, seed: int):
        self.ids, self.seq_len, self.seed = ids, seq_len, seed
        self.n = (len(ids) - 1) // seq_len
        if self.n < 1:
            raise BenchError(f"retrain.seq_len={seq_len}: longer than the {len(ids)} tokens of the training text")
        self._orders: dict[int, torch.Tensor] = {}

    def sequence(self, k: int) -> torch.Tensor:
        epoch, i = divmod(k, self.n)
        if epoch not in self._orders:
            self._orders = {epoch: torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed + epoch))}
        start = int(self._orders[epoch][i]) * self.seq_len
        return self.ids[start:start + self.seq_len + 1]


def step_sequences(step: int, global_batch: int, seq_len: int, tokens: int) -> list[tuple[int, int]]:
    """(stream index, targets) of each sequence of optimizer step `step` under a budget of `tokens` targets: full
    sequences of seq_len targets, the last step only what is left (its last sequence cut short)."""
    left = tokens - step * global_batch * seq_len
    out = []
    for j in range(global_batch):
        if left <= 0:
            break
        out.append((step * global_batch + j, min(seq_len, left)))
        left -= seq_len
    return out


def batch_of(packed: Packed, items: list[tuple[int, int]], device) -> dict[str, torch.Tensor]:
    """input_ids [b, seq_len] and labels (-100 past each sequence's targets) of (stream index, targets) items."""
    seqs = torch.stack([packed.sequence(k) for k, _ in items])
    labels = seqs[:, 1:].clone()
    for row, (_, n) in enumerate(items):
        labels[row, n:] = -100
    return {"input_ids": seqs[:, :-1].to(device), "labels": labels.to(device)}


# ---------------------------------------------------------------- losses


def kd_loss_sum(student_logits: torch.Tensor, teacher_logits: torch.Tensor, mask: torch.Tensor,
                temperature: float) -> torch.Tensor:
    """Sum over the masked positions of KL(teacher || student) = sum_v p_t (log p_t - log p_s) of the softmaxes
    at `temperature`, times temperature^2 (Hinton et al.: keeps the gradient's scale as T changes). Logits
    [b, t, V], mask [b, t] bool."""
    log_s = F.log_softmax(student_logits.float() / temperature, dim=-1)
    log_t = F.log_softmax(teacher_logits.float() / temperature, dim=-1)
    kl = F.kl_div(log_s, log_t, log_target=True, reduction="none").sum(-1)
    return (kl * mask).sum() * temperature ** 2


def lm_loss_sum(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Summed next-token cross-entropy over the labels that are not -100 (labels are already the targets)."""
    return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=-100,
                           reduction="sum")


def _rms_normed(h: torch.Tensor) -> torch.Tensor:
    h = h.float()
    return h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-6)


def hidden_loss_sum(student_states, teacher_states, layer_map: list[int], mask: torch.Tensor) -> torch.Tensor:
    """Mean over the mapped layers of the per-token MSE between RMS-normalized residual streams, summed over the
    masked tokens. `*_states`: HF output_hidden_states (embeddings, then each layer's output; the last one after
    the final norm, so the student's last layer is left out); student layer j is matched to teacher layer
    layer_map[j]."""
    pairs = [(student_states[j + 1], teacher_states[t + 1]) for j, t in enumerate(layer_map[:-1])]
    if not pairs:
        return torch.zeros((), device=mask.device)
    per_token = sum((_rms_normed(s) - _rms_normed(t)).pow(2).mean(-1) for s, t in pairs) / len(pairs)
    return (per_token * mask).sum()


def layer_map_of(plan, n_student: int, n_teacher: int) -> list[int]:
    """Student layer j came from teacher layer layer_map[j]: a depth plan's kept blocks, else the same layer."""
    keep = getattr(plan, "keep", None)
    if keep is not None and len(keep) == n_student:
        return [int(k) for k in keep]
    if n_student != n_teacher:
        raise BenchError(f"retrain.kd.hidden_weight: the student has {n_student} layers, the teacher {n_teacher}, "
                         f"and the plan (kind {plan.kind}) says not which came from which")
    return list(range(n_student))


# ---------------------------------------------------------------- distributed


def world() -> tuple[int, int]:
    """(rank, world size) under torchrun / accelerate launch (WORLD_SIZE, RANK), else (0, 1); joins the process
    group on first use (gloo on a CPU, nccl on CUDA)."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size <= 1:
        return 0, 1
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return dist.get_rank(), dist.get_world_size()


def agree(value):
    """Rank 0's `value` on every rank (broadcast), or `value` itself in one process: the ranks of a torchrun cell
    take the same decisions (skip a locked cell, resume the same checkpoint)."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return value
    import torch.distributed as dist

    world()
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def all_sum(values: list[float]) -> list[float]:
    """Element-wise sum over ranks (identity in one process)."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return values
    import torch.distributed as dist

    t = torch.tensor(values, dtype=torch.float64)
    dist.all_reduce(t)
    return t.tolist()


# ---------------------------------------------------------------- the loop


def lr_factor(step: int, steps: int, warmup: int, min_ratio: float) -> float:
    """Linear warm-up over `warmup` steps, then cosine from 1 to min_ratio at the last step."""
    if step < warmup:
        return (step + 1) / warmup
    span = max(steps - warmup, 1)
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * min(step - warmup, span) / span))


def autocast_dtype(rcfg, device: torch.device) -> torch.dtype | None:
    mode = rcfg.get("autocast", "auto")
    if mode == "bf16" or (mode == "auto" and device.type == "cuda" and torch.cuda.is_bf16_supported()):
        return torch.bfloat16
    return None


def _forward(model, input_ids, hidden: bool, dtype):
    with torch.autocast(input_ids.device.type, dtype=dtype, enabled=dtype is not None):
        return model(input_ids=input_ids, output_hidden_states=hidden, use_cache=False)


def _peak_mib(device: torch.device) -> float | None:
    from bench.memory import hwm_bytes

    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    peak = hwm_bytes()
    return None if peak is None else peak / 2**20


@torch.no_grad()
def held_out(model, teacher, val: Packed, rcfg, dtype) -> dict[str, float]:
    """LM loss and KL(teacher || student) per target token on the held-out sequences (at temperature 1)."""
    was = model.training
    model.eval()
    lm = kl = n = 0.0
    n_val = min(val.n, int(rcfg.val_sequences))
    for start in range(0, n_val, rcfg.micro_batch):
        items = [(k, val.seq_len) for k in range(start, min(start + rcfg.micro_batch, n_val))]
        batch = batch_of(val, items, next(model.parameters()).device)
        logits = _forward(model, batch["input_ids"], False, dtype).logits
        mask = batch["labels"] != -100
        lm += float(lm_loss_sum(logits, batch["labels"]))
        if teacher is not None:
            kl += float(kd_loss_sum(logits, _forward(teacher, batch["input_ids"], False, dtype).logits, mask, 1.0))
        n += float(mask.sum())
    model.train(was)
    return {"lm": lm / max(n, 1), **({"kl": kl / max(n, 1)} if teacher is not None else {})}


def train_tokens(model, tokenizer, cfg, teacher=None, plan=None, out: Path | None = None):
    """Retrain `model` (the pruned student, in place) for retrain.tokens target tokens: kd from `teacher`, or cpt.
    Returns (the model to evaluate, summary for retrain.json). `out`: the cell directory (checkpoints)."""
    rcfg, regime = cfg.retrain, cfg.retrain.name
    rank, size = world()
    device = next(model.parameters()).device
    dtype = autocast_dtype(rcfg, device)
    seed = int(cfg.seed)
    G, L, N = rcfg.micro_batch * rcfg.grad_accum, int(rcfg.seq_len), int(rcfg.tokens)
    steps = math.ceil(N / (G * L))
    warmup = math.ceil(rcfg.warmup_frac * steps)
    data_root = cfg.get("data_root") or None
    if rcfg.data == "corpus":
        if not data_root:
            raise BenchError("retrain.data=corpus needs data_root (env BENCH_DATA); on a node with internet use "
                             "retrain.data=hub:<dataset>[:<config>]")
        train_ids, val_ids, source = corpus_tokens(tokenizer, data_root, cfg.cache_dir, int(rcfg.val_books))
    elif str(rcfg.data).startswith("hub:"):
        train_ids, val_ids, source = hub_tokens(tokenizer, rcfg.data, N + L + 1, rcfg.val_sequences * (L + 1))
    else:
        raise BenchError(f"retrain.data={rcfg.data!r}: allowed values are corpus or hub:<dataset>[:<config>]")
    train, val = Packed(train_ids, L, seed), Packed(val_ids, L, seed)
    kd = regime == "kd"
    hidden_w = float(rcfg.kd.hidden_weight) if kd else 0.0
    temperature = float(rcfg.kd.temperature) if kd else 1.0
    layer_map = None
    if kd and hidden_w > 0:
        layer_map = layer_map_of(plan, model.config.num_hidden_layers, teacher.config.num_hidden_layers)
        if model.config.hidden_size != teacher.config.hidden_size:
            raise BenchError(f"retrain.kd.hidden_weight={hidden_w}: the student's hidden size "
                             f"{model.config.hidden_size} is not the teacher's {teacher.config.hidden_size}; "
                             f"allowed: 0 for a hidden-pruned student")
    if teacher is not None:
        teacher.eval()
        for p in teacher.parameters():
            p.requires_grad_(False)

    start_weights = weight_sums(model)  # the pruned model a checkpoint must have started from
    torch.manual_seed(seed)  # LoRA's initialization and dropout: the same in every run of this cell
    student = model
    if rcfg.params == "lora":
        from peft import LoraConfig, get_peft_model

        lc = cfg.lora
        student = get_peft_model(model, LoraConfig(r=lc.r, lora_alpha=lc.alpha, lora_dropout=lc.dropout, bias="none",
                                                   target_modules=list(lc.target_modules), task_type="CAUSAL_LM"))
    elif rcfg.params != "full":
        raise BenchError(f"retrain.params={rcfg.params!r}: allowed values are full, lora")
    else:
        for p in student.parameters():
            p.requires_grad_(True)
    student.train()
    params = [p for p in student.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=rcfg.lr, weight_decay=rcfg.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, steps, warmup, rcfg.min_lr / rcfg.lr))
    wrapped = student
    if size > 1:
        from torch.nn.parallel import DistributedDataParallel

        wrapped = DistributedDataParallel(student, device_ids=[device.index] if device.type == "cuda" else None)

    settings = {k: v for k, v in OmegaConf.to_container(rcfg, resolve=True).items() if k != "checkpoint_s"}
    key = fingerprint(regime, settings, OmegaConf.to_container(cfg.lora, resolve=True), seed, source, size,
                      start_weights)
    curves = {"tokens": [], "train_loss": [], "lr": [], "val": [], "tokens_per_s": []}
    start, trained_s = 0, 0.0
    ckpt = out / CHECKPOINT if out is not None else None
    if ckpt is not None and ckpt.is_file():
        start, trained_s, curves = _resume(ckpt, key, student, opt, sched, curves)
    evals = sorted({round(steps * i / rcfg.evals) for i in range(1, int(rcfg.evals) + 1)} | {steps})
    if start == 0 and not curves["val"]:
        curves["val"].append({"tokens": 0, **held_out(student, teacher, val, rcfg, dtype)})
    t_last_ckpt = time.perf_counter()
    log.info("%s: %d steps of %d x %d tokens (%d tokens), %s parameters, %s, from step %d", regime, steps, G, L, N,
             rcfg.params, source, start)
    for step in bar(range(start, steps), desc=regime, unit="step", initial=start, total=steps):
        t0 = time.perf_counter()
        items = step_sequences(step, G, L, N)
        targets = sum(n for _, n in items)
        mine = items[rank::size]
        # a rank without sequences in a short last step runs one with no targets: it still joins the reduction
        micro = [mine[i:i + rcfg.micro_batch] for i in range(0, len(mine), rcfg.micro_batch)] or [[(0, 0)]]
        loss_sum = 0.0
        for m, chunk in enumerate(micro):
            batch = batch_of(train, chunk, device)
            mask = batch["labels"] != -100
            out_s = _forward(wrapped, batch["input_ids"], layer_map is not None, dtype)
            if kd:
                with torch.no_grad():
                    out_t = _forward(teacher, batch["input_ids"], layer_map is not None, dtype)
                loss = kd_loss_sum(out_s.logits, out_t.logits, mask, temperature)
                if layer_map is not None:
                    loss = loss + hidden_w * hidden_loss_sum(out_s.hidden_states, out_t.hidden_states, layer_map,
                                                             mask)
            else:
                loss = lm_loss_sum(out_s.logits, batch["labels"])
            loss_sum += float(loss.detach())
            scaled = loss * size / targets  # DDP averages over ranks: the sum over ranks / all targets
            if size > 1 and m < len(micro) - 1:
                with wrapped.no_sync():
                    scaled.backward()
            else:
                scaled.backward()
        torch.nn.utils.clip_grad_norm_(params, rcfg.max_grad_norm)
        lr = opt.param_groups[0]["lr"]
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        (loss_total,) = all_sum([loss_sum])
        trained_s += time.perf_counter() - t0
        seen = min((step + 1) * G * L, N)
        curves["tokens"].append(seen)
        curves["train_loss"].append(loss_total / targets)
        curves["lr"].append(lr)
        curves["tokens_per_s"].append(targets / max(time.perf_counter() - t0, 1e-9))
        if step + 1 in evals:
            curves["val"].append({"tokens": seen, **held_out(student, teacher, val, rcfg, dtype)})
            log.info("%s step %d/%d (%d tokens): train %.4f, held-out %s", regime, step + 1, steps, seen,
                     curves["train_loss"][-1], {k: round(v, 4) for k, v in curves["val"][-1].items()})
        last = step + 1 == steps
        if ckpt is not None and (last or time.perf_counter() - t_last_ckpt >= rcfg.checkpoint_s):
            _checkpoint(ckpt, key, step + 1, trained_s, student, opt, sched, curves)
            t_last_ckpt = time.perf_counter()
    if rcfg.params == "lora":
        model = student.merge_and_unload()
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    summary = {"retrain": regime, "tokens": N, "tokens_trained": curves["tokens"][-1] if curves["tokens"] else 0,
               "steps": steps, "global_batch": G, "seq_len": L, "params": rcfg.params, "world_size": size,
               "data_source": source, "lr": rcfg.lr, "min_lr": rcfg.min_lr, "warmup_steps": warmup,
               "weight_decay": rcfg.weight_decay, "max_grad_norm": rcfg.max_grad_norm,
               "autocast": str(dtype).removeprefix("torch.") if dtype else None,
               "kd": {"temperature": temperature, "hidden_weight": hidden_w, "layer_map": layer_map} if kd else None,
               "evaluated": "last (an equal token budget spent to the end of the cosine schedule; the held-out books "
                            "are not used to select a model)",
               "train_s": trained_s, "tokens_per_s": (curves["tokens"][-1] / trained_s) if trained_s else None,
               "peak_mem_mib": _peak_mib(device), **curves}
    return model, summary


def _checkpoint(path: Path, key: str, step: int, trained_s: float, student, opt, sched, curves) -> None:
    """Everything a resumed run needs, written atomically by the writing rank: the trainable weights (all of them,
    or the LoRA adapters), AdamW's state, the schedule, the step (which fixes the data position) and the RNG."""
    if not is_writer():
        return
    trainable = {n: p.detach().cpu() for n, p in student.named_parameters() if p.requires_grad}
    state = {"key": key, "step": step, "trained_s": trained_s, "weights": trainable, "opt": opt.state_dict(),
             "sched": sched.state_dict(), "curves": curves, "torch_rng": torch.get_rng_state(),
             "python_rng": random.getstate()}
    buf = io.BytesIO()
    torch.save(state, buf)
    write_atomic(path, buf.getvalue())


def _resume(path: Path, key: str, student, opt, sched, curves) -> tuple[int, float, dict]:
    """(step, seconds trained, curves) of a checkpoint made with the same settings, its state loaded; (0, 0, the
    given curves) for one of other settings or one that does not load, with one warning line."""
    try:
        state = torch.load(path, weights_only=False)
        if state.get("key") != key:
            log.warning("%s: made with other settings or another model: training from step 0", path)
            return 0, 0.0, curves
        student.load_state_dict(state["weights"], strict=False)
        opt.load_state_dict(state["opt"])
        sched.load_state_dict(state["sched"])
        torch.set_rng_state(state["torch_rng"])
        random.setstate(state["python_rng"])
    except Exception as e:  # noqa: BLE001 (a damaged checkpoint is retrained, never half-used)
        log.warning("%s is damaged (%s: %s): training from step 0", path, type(e).__name__, str(e)[:120])
        return 0, 0.0, curves
    log.info("%s: resuming at step %d (%d tokens trained)", path, state["step"],
             state["curves"]["tokens"][-1] if state["curves"]["tokens"] else 0)
    return state["step"], state["trained_s"], state["curves"]
