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
"""

from __future__ import annotations

import json
import logging
import math
import random
import time
from pathlib import Path

import torch

from bench import BenchError
from bench.progress import bar

log = logging.getLogger("bench.retrain")

RETRAIN = ("none", "lora")
LOCAL_ALPACA = "alpaca/alpaca_cleaned_first5000.json"
PROMPT_INPUT = ("Below is an instruction that describes a task, paired with an input that provides further context. "
                "Write a response that appropriately completes the request.\n\n"
                "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n")
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
def _val_loss(model, val: list[dict], micro_batch: int, pad_id: int) -> float:
    model.eval()
    total, count = 0.0, 0
    for i in range(0, len(val), micro_batch):
        loss, n = _loss_sum(model, _batch(val[i:i + micro_batch], pad_id, model.device))
        total, count = total + float(loss), count + n
    model.train()
    return total / max(count, 1)


def lora_retrain(model, tokenizer, cfg) -> tuple[torch.nn.Module, dict]:
    """Train LoRA adapters on `model` (in place) and merge them. Returns (merged model, summary); the summary
    holds the loss curve, the selected step and the wall time."""
    from peft import LoraConfig, get_peft_model
    from transformers import get_linear_schedule_with_warmup

    lc = cfg.lora
    records, source = alpaca_records(cfg.get("data_root") or None)
    if lc.get("n_records"):
        records = records[:int(lc.n_records)]
    rng = random.Random(42)  # the official train_test_split(test_size=2000, seed=42), in our own shuffle
    order = list(range(len(records)))
    rng.shuffle(order)
    n_val = min(int(lc.val_size), len(records) // 2)
    val = [encode(tokenizer, records[i], lc.cutoff_len) for i in order[:n_val]]
    train = [encode(tokenizer, records[i], lc.cutoff_len) for i in order[n_val:]]
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0

    peft_model = get_peft_model(model, LoraConfig(r=lc.r, lora_alpha=lc.alpha, lora_dropout=lc.dropout, bias="none",
                                                  target_modules=list(lc.target_modules), task_type="CAUSAL_LM"))
    batch = lc.micro_batch * lc.grad_accum
    steps_per_epoch = math.ceil(len(train) / batch)
    steps = int(lc.max_steps) if lc.get("max_steps") else int(lc.epochs * steps_per_epoch)
    params = [p for p in peft_model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lc.lr, weight_decay=0.0)
    sched = get_linear_schedule_with_warmup(opt, min(lc.warmup_steps, steps // 10), steps)
    peft_model.train()
    torch.manual_seed(int(cfg.seed))
    t0, losses, val_losses, best = time.perf_counter(), [], [], None
    epoch_order = []
    for step in bar(range(steps), desc="lora", unit="step"):
        if len(epoch_order) < batch:
            shuffled = list(range(len(train)))
            rng.shuffle(shuffled)
            epoch_order += shuffled
        idx, epoch_order = epoch_order[:batch], epoch_order[batch:]
        micro = [[train[i] for i in idx[j:j + lc.micro_batch]] for j in range(0, batch, lc.micro_batch)]
        encoded = [_batch(m, pad_id, peft_model.device) for m in micro]
        n_tokens = sum(int((b["labels"][:, 1:] != -100).sum()) for b in encoded)
        total = 0.0
        for b in encoded:
            loss, _ = _loss_sum(peft_model, b)
            (loss / max(n_tokens, 1)).backward()
            total += float(loss.detach())
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        losses.append(total / max(n_tokens, 1))
        last = step + 1 == steps
        if val and lc.eval_steps and ((step + 1) % lc.eval_steps == 0 or last):
            v = _val_loss(peft_model, val, lc.micro_batch, pad_id)
            val_losses.append({"step": step + 1, "loss": v})
            if best is None or v < best[0]:
                best = (v, step + 1, {k: t.detach().clone() for k, t in peft_model.state_dict().items()
                                      if "lora_" in k})
            log.info("lora step %d/%d: train %.4f, val %.4f", step + 1, steps, losses[-1], v)
        elif (step + 1) % 10 == 0 or last:
            log.info("lora step %d/%d: train %.4f", step + 1, steps, losses[-1])
    if best is not None and best[1] != steps:
        peft_model.load_state_dict(best[2], strict=False)
    merged = peft_model.merge_and_unload()
    merged.eval()
    for p in merged.parameters():
        p.requires_grad_(False)
    summary = {"retrain": "lora", "data_source": source, "train_records": len(train), "val_records": len(val),
               "steps": steps, "global_batch": batch, "train_loss": losses, "val_loss": val_losses,
               "selected_step": best[1] if best else steps, "train_s": time.perf_counter() - t0}
    return merged, summary


def retrain(model, tokenizer, cfg) -> tuple[torch.nn.Module, dict | None]:
    """The `retrain` stage: none (one-shot) or lora."""
    if cfg.retrain not in RETRAIN:
        raise BenchError(f"retrain={cfg.retrain!r}: allowed values are {', '.join(RETRAIN)}")
    if cfg.retrain == "none":
        return model, None
    return lora_retrain(model, tokenizer, cfg)
