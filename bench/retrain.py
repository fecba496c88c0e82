"""LoRA retraining of a pruned model (Shortened LLaMA v1 = LLM-Pruner's recipe, ../shared/docs/methods.md 1.9).

    python -m bench method=depth_ppl ratio=0.2 retrain=lora                       # the paper's recipe
    python -m bench method=depth_ppl ratio=0.2 retrain=lora lora.max_steps=30    # a short CPU run

peft LoRA (r 8, alpha 16, dropout 0.05 on q, k, v, o, gate, up, down) trained on Alpaca-cleaned with the Alpaca
prompt template, the loss masked on the prompt (train_on_inputs=False), cutoff 256 tokens with EOS appended; AdamW,
lr 1e-4, linear warm-up then decay, global batch = micro_batch x grad_accum (4 x 16); a validation split (2000
records, seed 42) scored every `eval_steps` and the best adapter kept (load_best_model_at_end). The adapter is then
merged into the weights (merge_and_unload), so the evaluated model has exactly the pruned model's parameters.

Data: the hub's yahma/alpaca-cleaned, or offline the first 5000 records of the same file in the data root
(alpaca/alpaca_cleaned_first5000.json).

`protocol` (the run's top-level key) picks how the loop follows Shortened LLaMA's src/lora_retrain.py, which runs
the HF Trainer of its pinned transformers==4.40.1 (requirement.txt); the loop stays hand-written under both:

    matched  (default) the loss of a global batch is the mean over all its label tokens (every token weighs the
             same); the validation split is our own seeded shuffle; the validation loss is evaluated every
             `eval_steps` and at the last step, and the adapter with the lowest one is kept
    native   as lora_retrain.py under 4.40.1 (NATIVE_RULES): each micro-batch's mean token loss / grad_accum,
             summed (accelerate's backward under the Trainer: the mean over micro-batches, whatever their token
             counts; 4.46 later moved to num_items_in_batch); the split of train_test_split(test_size=val_size,
             shuffle=True, seed=42), i.e. numpy's default_rng(42).permutation; micro-batches from a per-epoch
             shuffle, accumulated across epoch boundaries, floor(micro-batches / grad_accum) steps per epoch;
             warm-up lora.warmup_steps uncapped; gradients clipped to norm 1.0 (max_grad_norm); fp16 weights get
             a GradScaler (fp16=True); validation loss (batches of 8, per_device_eval_batch_size) every
             `eval_steps`, a checkpoint every `save_steps` (200), and load_best_model_at_end keeps the saved
             checkpoint with the HIGHEST validation loss: metric_for_best_model="yahma/alpaca-cleaned_loss" is
             not "loss"/"eval_loss", so 4.40.1 sets greater_is_better=True (fixed later by transformers PR
             #31142). No saved checkpoint evaluated (a run under save_steps): the last adapter.

retrain.json records the protocol, the rules that ran (`rules`) and, under native, what still departs.
"""

from __future__ import annotations

import json
import logging
import math
import random
import time
from pathlib import Path

import numpy as np
import torch

from bench import BenchError
from bench.progress import bar

log = logging.getLogger("bench.retrain")

RETRAIN = ("none", "lora", "kd", "cpt")
LOCAL_ALPACA = "alpaca/alpaca_cleaned_first5000.json"
PROMPT_INPUT = ("Below is an instruction that describes a task, paired with an input that provides further context. "
                "Write a response that appropriately completes the request.\n\n"
                "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n")
# What lora_retrain.py's TrainingArguments leave at transformers 4.40.1's defaults, and what its choices imply.
NATIVE_RULES = {"loss_average": "per micro-batch (mean of micro-batch token means)", "max_grad_norm": 1.0,
                "eval_batch": 8, "eval_at_last_step": False, "candidates": "evaluated steps that are save steps",
                "keep": "highest validation loss (4.40.1 greater_is_better=True for 'yahma/alpaca-cleaned_loss')",
                "split": "numpy default_rng(42).permutation: first val_size = validation",
                "steps_per_epoch": "floor(ceil(train / micro_batch) / grad_accum)", "warmup": "warmup_steps"}
MATCHED_RULES = {"loss_average": "per token (mean over all label tokens of the global batch)", "max_grad_norm": None,
                 "eval_batch": "micro_batch", "eval_at_last_step": True, "candidates": "every evaluated step",
                 "keep": "lowest validation loss", "split": "random.Random(42).shuffle: first val_size = validation",
                 "steps_per_epoch": "ceil(train / global batch)", "warmup": "min(warmup_steps, steps // 10)"}
NATIVE_DEPARTURES = [
    "example order: our seeded shuffle per epoch, not the Trainer's RandomSampler (seed 42) over datasets' "
    "unseeded .shuffle() of the split; the validation examples in split order, not .shuffle()d",
    "padding: right padding to the longest in the micro-batch, not DataCollatorForSeq2Seq's left padding to a "
    "multiple of 8 (the same loss under RoPE and the attention mask, other rounding)",
    "LoRA: the installed peft (adapters in fp32 on a half-precision model), not the vendored PEFT 0.2 copy; no "
    "torch.autocast: the model trains in the cell's dtype, an fp16 one with a GradScaler",
    "an epoch shorter than one global batch is not stepped early (the Trainer's is_last_step_and_steps_less_than_"
    "grad_acc case)",
    "checkpoints are kept in memory (adapter weights), not written every save_steps"]
PROMPT_NO_INPUT = ("Below is an instruction that describes a task. Write a response that appropriately completes the "
                   "request.\n\n### Instruction:\n{instruction}\n\n### Response:\n")


def alpaca_records(data_root) -> tuple[list[dict], str]:
    """Alpaca-cleaned records (instruction, input, output) and their source."""
    if data_root:
        path = Path(data_root) / LOCAL_ALPACA
        if not path.is_file():
            raise BenchError(f"missing data file {path}: set data_root (env BENCH_DATA) to a directory laid out as "
                             f"shared/data, or data_root=null to use the HF hub")
        return json.loads(path.read_text(encoding="utf-8")), f"local:{LOCAL_ALPACA}"
    from datasets import load_dataset

    return list(load_dataset("yahma/alpaca-cleaned", split="train")), "hub:yahma/alpaca-cleaned"


def prompt(record: dict) -> str:
    template = PROMPT_INPUT if record.get("input") else PROMPT_NO_INPUT
    return template.format(instruction=record["instruction"], input=record.get("input", ""))


def encode(tokenizer, record: dict, cutoff_len: int) -> dict:
    """Token ids and labels of one record: prompt + response (+ EOS when it fits), labels -100 on the prompt."""
    def ids(text: str) -> list[int]:
        return tokenizer(text, truncation=True, max_length=cutoff_len)["input_ids"]

    user = ids(prompt(record))
    full = ids(prompt(record) + record["output"])
    if len(full) < cutoff_len and tokenizer.eos_token_id is not None and full[-1] != tokenizer.eos_token_id:
        full = full + [tokenizer.eos_token_id]
    n_prompt = min(len(user), len(full))
    return {"input_ids": full, "labels": [-100] * n_prompt + full[n_prompt:]}


def _batch(examples: list[dict], pad_id: int, device) -> dict:
    width = max(len(e["input_ids"]) for e in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), -100, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    for i, e in enumerate(examples):
        n = len(e["input_ids"])
        ids[i, :n], labels[i, :n], mask[i, :n] = torch.tensor(e["input_ids"]), torch.tensor(e["labels"]), 1
    return {"input_ids": ids.to(device), "labels": labels.to(device), "attention_mask": mask.to(device)}


def _loss_sum(model, batch) -> tuple[torch.Tensor, int]:
    """Summed next-token loss over the unmasked labels, and their count (so accumulation weights tokens equally
    across micro-batches of different lengths)."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1].float()
    labels = batch["labels"][:, 1:]
    loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1),
                                             ignore_index=-100, reduction="sum")
    return loss, int((labels != -100).sum())


@torch.no_grad()
def _val_loss(model, val: list[dict], micro_batch: int, pad_id: int, per_batch: bool = False) -> float:
    """Validation loss: the mean over all label tokens, or (`per_batch`, the Trainer's evaluation_loop) each
    batch's mean token loss repeated once per example, averaged over the examples."""
    model.eval()
    total, count = 0.0, 0
    for i in range(0, len(val), micro_batch):
        rows = val[i:i + micro_batch]
        loss, n = _loss_sum(model, _batch(rows, pad_id, model.device))
        if per_batch:
            total, count = total + len(rows) * float(loss) / max(n, 1), count + len(rows)
        else:
            total, count = total + float(loss), count + n
    model.train()
    return total / max(count, 1)


def accumulate(model, encoded: list[dict], native: bool, scaler=None) -> float:
    """Backpropagate one global batch, given as its micro-batches, and return its loss. matched: the summed token
    loss over all the micro-batches' label tokens (every token weighs the same). native: each micro-batch's own
    mean token loss / the number of micro-batches, i.e. the mean of the micro-batch means (lora_retrain.py's
    Trainer under transformers 4.40.1: LlamaForCausalLM's mean loss, divided by grad_accum in accelerate's
    backward), so a short micro-batch's tokens weigh more; `scaler` (fp16) scales each part first."""
    n_tokens = sum(int((b["labels"][:, 1:] != -100).sum()) for b in encoded)
    total = 0.0
    for b in encoded:
        loss, n = _loss_sum(model, b)
        if native:
            part = loss / max(n, 1) / len(encoded)
            (scaler.scale(part) if scaler else part).backward()
            total += float(part.detach())
        else:
            (loss / max(n_tokens, 1)).backward()
            total += float(loss.detach())
    return total if native else total / max(n_tokens, 1)


def split(n: int, n_val: int, native: bool, rng: random.Random) -> tuple[list[int], list[int]]:
    """(validation, train) indices of n records. native: datasets 2.14.5's train_test_split(test_size=n_val,
    shuffle=True, seed=42) (arrow_dataset.py: np.random.default_rng(42).permutation(n), the first n_val are the
    test split); matched: a shuffle by `rng` (random.Random(42), which then draws the training order)."""
    if native:
        order = np.random.default_rng(42).permutation(n).tolist()
    else:
        order = list(range(n))
        rng.shuffle(order)
    return order[:n_val], order[n_val:]


def native_stream(n: int, micro_batch: int, rng: random.Random):
    """Micro-batches of train indices as the Trainer's dataloader yields them: every epoch a fresh shuffle cut
    into micro-batches (the last may be short), endlessly; 4.40.1 steps after every grad_accum-th micro-batch
    counted over the whole run (total_batched_samples), so a global batch can span an epoch boundary."""
    while True:
        order = list(range(n))
        rng.shuffle(order)
        yield from (order[i:i + micro_batch] for i in range(0, n, micro_batch))


def lora_retrain(model, tokenizer, cfg) -> tuple[torch.nn.Module, dict]:
    """Train LoRA adapters on `model` (in place) and merge them. Returns (merged model, summary); the summary
    holds the loss curve, the selected step and the wall time."""
    from peft import LoraConfig, get_peft_model
    from transformers import get_linear_schedule_with_warmup

    lc = cfg.lora
    native = cfg.get("protocol", "matched") == "native"
    records, source = alpaca_records(cfg.get("data_root") or None)
    if lc.get("n_records"):
        records = records[:int(lc.n_records)]
    rng = random.Random(42)  # matched: the split's shuffle, then the training order; native: the training order
    n_val = min(int(lc.val_size), len(records) // 2)
    val_idx, train_idx = split(len(records), n_val, native, rng)
    val = [encode(tokenizer, records[i], lc.cutoff_len) for i in val_idx]
    train = [encode(tokenizer, records[i], lc.cutoff_len) for i in train_idx]
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0

    peft_model = get_peft_model(model, LoraConfig(r=lc.r, lora_alpha=lc.alpha, lora_dropout=lc.dropout, bias="none",
                                                  target_modules=list(lc.target_modules), task_type="CAUSAL_LM"))
    batch = lc.micro_batch * lc.grad_accum
    if native:  # Trainer._inner_training_loop: len(dataloader) // grad_accum per epoch, ceil(epochs x that)
        steps_per_epoch = max(math.ceil(len(train) / lc.micro_batch) // lc.grad_accum, 1)
        epoch_steps = math.ceil(lc.epochs * steps_per_epoch)
    else:
        steps_per_epoch = math.ceil(len(train) / batch)
        epoch_steps = int(lc.epochs * steps_per_epoch)
    steps = int(lc.max_steps) if lc.get("max_steps") else epoch_steps
    budget = int(cfg.retrain.get("tokens") or 0)  # a token budget: stop once that many label tokens were trained on
    if budget:  # the schedule's length from the mean label tokens of a global batch; the loop stops at the budget
        per_record = sum(sum(1 for x in e["labels"][1:] if x != -100) for e in train) / max(len(train), 1)
        steps = max(math.ceil(budget / max(per_record * batch, 1)), 1)
    eval_steps, save_steps = int(lc.eval_steps or 0), int(lc.get("save_steps") or 0)
    if native and eval_steps and save_steps % eval_steps:
        raise BenchError(f"lora.save_steps={save_steps}: under protocol=native it must be a multiple of "
                         f"lora.eval_steps={eval_steps} (load_best_model_at_end requires it)")
    params = [p for p in peft_model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lc.lr, weight_decay=0.0)
    warmup = int(lc.warmup_steps) if native else min(lc.warmup_steps, steps // 10)
    sched = get_linear_schedule_with_warmup(opt, warmup, steps)
    fp16 = native and peft_model.device.type == "cuda" and any(p.dtype == torch.float16 for p in model.parameters())
    scaler = torch.amp.GradScaler("cuda") if fp16 else None
    peft_model.train()
    torch.manual_seed(int(cfg.seed))
    t0, losses, val_losses, best = time.perf_counter(), [], [], None
    epoch_order, stream = [], native_stream(len(train), lc.micro_batch, rng) if native else None
    tokens_seen = 0
    for step in bar(range(4 * steps if budget else steps), desc="lora", unit="step", total=steps):
        if native:
            micro = [[train[i] for i in next(stream)] for _ in range(lc.grad_accum)]
        else:
            if len(epoch_order) < batch:
                shuffled = list(range(len(train)))
                rng.shuffle(shuffled)
                epoch_order += shuffled
            idx, epoch_order = epoch_order[:batch], epoch_order[batch:]
            micro = [[train[i] for i in idx[j:j + lc.micro_batch]] for j in range(0, batch, lc.micro_batch)]
        batches = [_batch(m, pad_id, peft_model.device) for m in micro]
        tokens_seen += sum(int((b["labels"][:, 1:] != -100).sum()) for b in batches)
        loss = accumulate(peft_model, batches, native, scaler)
        if native:
            if scaler:
                scaler.unscale_(opt)
            torch.nn.utils.clip_grad_norm_(params, NATIVE_RULES["max_grad_norm"])
        if scaler:
            scaler.step(opt)
            scaler.update()
        else:
            opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss)
        done = step + 1
        last = tokens_seen >= budget if budget else done == steps
        evaluate = bool(val and eval_steps) and (done % eval_steps == 0 or (last and not native))
        if evaluate:
            v = _val_loss(peft_model, val, NATIVE_RULES["eval_batch"] if native else lc.micro_batch, pad_id,
                          per_batch=native)
            val_losses.append({"step": done, "loss": v})
            candidate = not native or (save_steps > 0 and done % save_steps == 0)
            better = best is None or (v > best[0] if native else v < best[0])
            if candidate and better:
                best = (v, done, {k: t.detach().clone() for k, t in peft_model.state_dict().items() if "lora_" in k})
            log.info("lora step %d/%d: train %.4f, val %.4f", done, steps, losses[-1], v)
        elif done % 10 == 0 or last:
            log.info("lora step %d/%d: train %.4f", done, steps, losses[-1])
        if last:
            break
    steps = done  # the steps taken (a token budget ends the run where it is reached)
    if best is not None and best[1] != steps:
        peft_model.load_state_dict(best[2], strict=False)
    merged = peft_model.merge_and_unload()
    merged.eval()
    for p in merged.parameters():
        p.requires_grad_(False)
    rules = dict(NATIVE_RULES if native else MATCHED_RULES, eval_steps=eval_steps or None,
                 save_steps=(save_steps or None) if native else None, warmup_steps=warmup)
    summary = {"retrain": "lora", "protocol": "native" if native else "matched", "rules": rules,
               "departures": list(NATIVE_DEPARTURES) if native else [], "data_source": source,
               "train_records": len(train), "val_records": len(val), "steps": steps, "global_batch": batch,
               "train_loss": losses, "val_loss": val_losses, "selected_step": best[1] if best else steps,
               "tokens": budget or None, "tokens_trained": tokens_seen, "train_s": time.perf_counter() - t0}
    return merged, summary


def retrain(model, tokenizer, cfg, teacher=None, plan=None, out=None) -> tuple[torch.nn.Module, dict | None]:
    """The `retrain` stage (conf/retrain/): none (one-shot), lora (Alpaca, this module), or kd / cpt (general text
    for a token budget, bench/distill.py: `teacher` is the unpruned model, `plan` maps the student's layers to its
    own, `out` holds the resumable checkpoint)."""
    name = cfg.retrain.name
    if name not in RETRAIN:
        raise BenchError(f"retrain={name!r}: allowed values are {', '.join(RETRAIN)}")
    if name == "none":
        return model, None
    if name == "lora":
        return lora_retrain(model, tokenizer, cfg)
    from bench.distill import train_tokens

    return train_tokens(model, tokenizer, cfg, teacher=teacher, plan=plan, out=out)
