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


def _tiny_llama(cfg_for):
    from bench.models import load_model

    cfg = cfg_for("model=tiny-llama")
    return load_model(cfg.model, cfg.cache_dir, "cpu", "float32")


def test_native_loss_is_the_mean_of_micro_batch_means(cfg_for):
    """native: each micro-batch's mean token loss, averaged over the micro-batches (HF Trainer 4.40.1 under
    gradient accumulation); matched: the mean over all the global batch's label tokens."""
    from bench.retrain import _batch, _loss_sum, accumulate

    model, _ = _tiny_llama(cfg_for)
    model.eval()
    g = torch.Generator().manual_seed(0)
    micro = []
    for n_label in (3, 20):  # label-token counts differ: the two averages differ
        ids = torch.randint(3, 200, (24,), generator=g).tolist()
        micro.append(_batch([{"input_ids": ids, "labels": [-100] * (24 - n_label) + ids[24 - n_label:]}], 0, "cpu"))
    with torch.no_grad():
        (s1, n1), (s2, n2) = (_loss_sum(model, b) for b in micro)
    per_micro, per_token = (float(s1) / n1 + float(s2) / n2) / 2, float(s1 + s2) / (n1 + n2)
    assert abs(per_micro - per_token) > 1e-3
    assert accumulate(model, micro, native=True) == pytest.approx(per_micro, rel=1e-5)
    native_grad = model.lm_head.weight.grad.clone()
    model.zero_grad()
    assert accumulate(model, micro, native=False) == pytest.approx(per_token, rel=1e-5)
    model.zero_grad()
    ((_loss_sum(model, micro[0])[0] / n1 + _loss_sum(model, micro[1])[0] / n2) / 2).backward()
    assert torch.allclose(native_grad, model.lm_head.weight.grad, atol=1e-6)


def test_native_split_is_train_test_split():
    from datasets import Dataset
    from bench.retrain import split
    import random

    want = Dataset.from_dict({"i": list(range(50))}).train_test_split(test_size=7, shuffle=True, seed=42)
    val, train = split(50, 7, True, random.Random(42))
    assert val == want["test"]["i"] and train == want["train"]["i"]


def test_native_cadence(cfg_for):
    """native: evaluated every eval_steps and not at an off-cadence last step; only save steps are candidates,
    and the one kept has the highest validation loss (4.40.1's greater_is_better for '<data>_loss')."""
    model, tok = _tiny_llama(cfg_for)
    quick = [o for o in QUICK if not o.startswith(("lora.max_steps", "lora.eval_steps"))]
    cfg = cfg_for(*quick, "lora.max_steps=5", "lora.eval_steps=2", "lora.save_steps=2", "protocol=native")
    _, summary = lora_retrain(copy.deepcopy(model), tok, cfg)
    assert summary["protocol"] == "native" and summary["rules"]["save_steps"] == 2 and summary["departures"]
    assert [v["step"] for v in summary["val_loss"]] == [2, 4]  # step 5, the last, is off the cadence
    saved = {v["step"]: v["loss"] for v in summary["val_loss"]}
    assert summary["selected_step"] == max(saved, key=saved.get)
    _, matched = lora_retrain(copy.deepcopy(model), tok, cfg_for(*quick, "lora.max_steps=5", "lora.eval_steps=2"))
    assert matched["protocol"] == "matched" and [v["step"] for v in matched["val_loss"]] == [2, 4, 5]
    with pytest.raises(BenchError, match="lora.save_steps=3"):
        lora_retrain(model, tok, cfg_for(*quick, "lora.eval_steps=2", "lora.save_steps=3", "protocol=native"))
