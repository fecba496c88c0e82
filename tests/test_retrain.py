"""LoRA retraining: the Alpaca prompt masking, a falling loss, a merge back to the pruned model's exact size."""

from __future__ import annotations

import copy
import json

import pytest
import torch

from bench import BenchError
from bench.models import count_params
from bench.retrain import PROMPT_NO_INPUT, encode, lora_retrain, prompt
from bench.runner import run_cell

QUICK = ["lora.max_steps=12", "lora.micro_batch=2", "lora.grad_accum=1", "lora.lr=1e-2", "lora.val_size=4",
         "lora.eval_steps=4", "lora.n_records=12", "lora.warmup_steps=0"]


def test_prompt_is_masked(tiny):
    _, tok, _ = tiny
    record = {"instruction": "say hi", "input": "", "output": "hi there"}
    assert prompt(record) == PROMPT_NO_INPUT.format(instruction="say hi")
    enc = encode(tok, record, 256)
    n_prompt = len(tok(prompt(record))["input_ids"])
    assert enc["labels"][:n_prompt] == [-100] * n_prompt
    assert enc["labels"][n_prompt:] == enc["input_ids"][n_prompt:] and enc["input_ids"][-1] == tok.eos_token_id
    assert len(encode(tok, record, 16)["input_ids"]) == 16  # cut at cutoff_len, no EOS


def test_lora_loss_falls_and_merges(tiny, cfg_for):
    model, tok, _ = tiny
    cfg = cfg_for(*QUICK)
    pruned = copy.deepcopy(model)
    n_params = count_params(pruned)
    merged, summary = lora_retrain(pruned, tok, cfg)
    losses = summary["train_loss"]
    assert len(losses) == 12 and sum(losses[-3:]) / 3 < sum(losses[:3]) / 3
    assert summary["val_loss"] and summary["selected_step"] in {v["step"] for v in summary["val_loss"]}
    assert count_params(merged) == n_params
    assert not any("lora" in name for name, _ in merged.named_parameters())
    q_before, q_after = model.model.layers[0].self_attn.q_proj.weight, merged.model.layers[0].self_attn.q_proj.weight
    assert not torch.equal(q_before, q_after)
    assert merged.generate(torch.tensor([[1, 2, 3]]), max_new_tokens=3, do_sample=False).shape == (1, 6)


def test_lora_cell(cfg_for):
    out = run_cell(cfg_for("model=tiny-llama-gqa", "method=depth_magnitude", "ratio=0.25", "retrain=lora", *QUICK))
    assert out.parent.name == "depth_magnitude++lora"
    rows = [json.loads(line) for line in (out / "records.jsonl").read_text().splitlines()]
    plan = json.loads((out / "plan.json").read_text())
    assert {r["retrain"] for r in rows} == {"lora"} and {r["params"] for r in rows} == {plan["predicted_params"]}
    assert json.loads((out / "retrain.json").read_text())["steps"] == 12
    with pytest.raises(BenchError, match="retrain='qlora'"):
        run_cell(cfg_for("model=tiny-llama-gqa", "retrain=qlora"))


def test_missing_alpaca_is_a_clear_error(tiny, cfg_for, tmp_path):
    model, tok, _ = tiny
    cfg = cfg_for(*QUICK, f"data_root={tmp_path}")
    with pytest.raises(BenchError, match="alpaca_cleaned_first5000.json"):
        lora_retrain(copy.deepcopy(model), tok, cfg)
