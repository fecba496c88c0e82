"""Token-budget retraining (bench/distill.py): the KD loss against a hand-computed KL, a student equal to its teacher,
the budget stopping at exactly N target tokens, resume after a kill, full and LoRA parameters, whole cells per
regime and architecture, and two torchrun ranks against one process."""

from __future__ import annotations

import copy
import json
import math
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import bench.distill as distill
from bench.distill import Packed, kd_loss_sum, layer_map_of, step_sequences, train_tokens
from bench.models import count_params
from bench.runner import run_cell

SHORT = ["retrain.seq_len=16", "retrain.micro_batch=2", "retrain.grad_accum=2", "retrain.val_sequences=4",
         "retrain.evals=2", "retrain.lr=1e-3"]


def test_kd_loss_is_the_forward_kl_times_t_squared():
    torch.manual_seed(0)
    s, t = torch.randn(2, 3, 5), torch.randn(2, 3, 5)
    mask = torch.tensor([[True, True, False], [True, False, True]])
    for temperature in (1.0, 2.0):
        ps, pt = torch.softmax(s / temperature, -1), torch.softmax(t / temperature, -1)
        by_hand = sum(float((pt[b, i] * (pt[b, i].log() - ps[b, i].log())).sum())
                      for b in range(2) for i in range(3) if mask[b, i]) * temperature ** 2
        assert math.isclose(float(kd_loss_sum(s, t, mask, temperature)), by_hand, rel_tol=1e-5)
    assert float(kd_loss_sum(t, t, mask, 3.0)) == pytest.approx(0.0, abs=1e-6)


def test_step_sequences_spend_exactly_the_budget():
    for tokens in (1, 63, 64, 65, 1000):
        steps = math.ceil(tokens / (4 * 16))
        spent = [n for s in range(steps) for _, n in step_sequences(s, 4, 16, tokens)]
        assert sum(spent) == tokens and all(0 < n <= 16 for n in spent)
        assert step_sequences(steps, 4, 16, tokens) == []
    # the stream indices of consecutive steps follow one another
    assert [k for k, _ in step_sequences(1, 4, 16, 1000)] == [4, 5, 6, 7]


def test_packed_covers_every_sequence_once_per_pass():
    ids = torch.arange(101)
    packed = Packed(ids, 10, seed=3)
    starts = sorted(int(packed.sequence(k)[0]) for k in range(packed.n))
    assert packed.n == 10 and starts == list(range(0, 100, 10))
    assert all(len(packed.sequence(k)) == 11 for k in range(2 * packed.n))


def _pair(tiny):
    model, tok, cfg = tiny
    return copy.deepcopy(model), model, tok


def test_student_equal_to_its_teacher_has_zero_kd_loss(tiny, cfg_for):
    student, teacher, tok = _pair(tiny)
    cfg = cfg_for("retrain=kd", "retrain.tokens=64", "retrain.lr=1e-12", *SHORT[:-1])
    _, summary = train_tokens(student, tok, cfg, teacher=teacher)
    assert summary["train_loss"][0] == pytest.approx(0.0, abs=1e-6)
    assert summary["val"][0]["kl"] == pytest.approx(0.0, abs=1e-6)


@pytest.mark.parametrize("tokens", [100, 64])
def test_token_budget_stops_at_n_targets(tiny, cfg_for, tokens):
    student, teacher, tok = _pair(tiny)
    cfg = cfg_for("retrain=cpt", f"retrain.tokens={tokens}", *SHORT)
    _, summary = train_tokens(student, tok, cfg, teacher=teacher)
    assert summary["tokens_trained"] == tokens and summary["tokens"][-1] == tokens
    assert summary["steps"] == math.ceil(tokens / 64) == len(summary["train_loss"])
    assert [v["tokens"] for v in summary["val"]][0] == 0 and summary["val"][-1]["tokens"] == tokens


def test_kd_falls_and_full_parameters_all_move(tiny, cfg_for):
    student, teacher, tok = _pair(tiny)
    with torch.no_grad():  # a damaged copy of the teacher, which distillation should pull back
        for p in student.parameters():
            p.add_(0.05 * torch.randn_like(p))
    before = {n: p.clone() for n, p in student.named_parameters()}
    cfg = cfg_for("retrain=kd", "retrain.tokens=640", "retrain.lr=3e-3", "retrain.warmup_frac=0", *SHORT[:-1])
    out, summary = train_tokens(student, tok, cfg, teacher=teacher)
    assert summary["val"][-1]["kl"] < summary["val"][0]["kl"]
    assert all(not torch.equal(before[n], p) for n, p in out.named_parameters())
    assert not any(p.requires_grad for p in out.parameters())


def test_lora_parameters_merge_to_the_same_count(tiny, cfg_for):
    student, teacher, tok = _pair(tiny)
    n = count_params(student)
    cfg = cfg_for("retrain=cpt", "retrain.params=lora", "retrain.tokens=128", *SHORT)
    out, summary = train_tokens(student, tok, cfg, teacher=teacher)
    assert count_params(out) == n and not any("lora" in name for name, _ in out.named_parameters())
    assert summary["params"] == "lora"


def test_hidden_loss_maps_kept_blocks():
    """Depth: student layer j is the teacher's kept block keep[j]; states equal at the mapped layers give a zero
    hidden term, and a shifted map does not."""
    from types import SimpleNamespace

    from bench.distill import hidden_loss_sum

    assert layer_map_of(SimpleNamespace(keep=[0, 3, 5], kind="depth"), 3, 6) == [0, 3, 5]
    assert layer_map_of(SimpleNamespace(kind="width"), 4, 4) == [0, 1, 2, 3]
    torch.manual_seed(0)
    teacher = [torch.randn(1, 3, 8) for _ in range(7)]  # embeddings + 6 layers
    student = [teacher[0], teacher[1], teacher[4], teacher[6]]  # embeddings + kept blocks 0, 3, 5
    mask = torch.ones(1, 3, dtype=torch.bool)
    assert float(hidden_loss_sum(student, teacher, [0, 3, 5], mask)) == pytest.approx(0.0, abs=1e-6)
    assert float(hidden_loss_sum(student, teacher, [0, 2, 5], mask)) > 0.1


def kill_after(step_to_die: int, monkeypatch):
    """Make training die (as a SIGKILL would, after the checkpoint of `step_to_die` was written)."""
    real = distill._checkpoint

    def checkpoint(path, key, step, *args):
        real(path, key, step, *args)
        if step == step_to_die:
            raise KeyboardInterrupt("killed")

    monkeypatch.setattr(distill, "_checkpoint", checkpoint)


@pytest.mark.parametrize("params", ["full", "lora"])
def test_resume_after_a_kill_continues_the_curve(tiny, cfg_for, tmp_path, monkeypatch, params):
    model, tok, _ = tiny
    cfg = cfg_for("retrain=kd", "retrain.tokens=384", "retrain.checkpoint_s=0", f"retrain.params={params}", *SHORT)
    whole = train_tokens(copy.deepcopy(model), tok, cfg, teacher=model)[1]
    out = tmp_path / "cell"
    out.mkdir()
    kill_after(3, monkeypatch)
    with pytest.raises(KeyboardInterrupt):
        train_tokens(copy.deepcopy(model), tok, cfg, teacher=model, out=out)
    monkeypatch.undo()
    resumed = train_tokens(copy.deepcopy(model), tok, cfg, teacher=model, out=out)[1]
    assert len(resumed["train_loss"]) == len(whole["train_loss"]) == 6
    assert resumed["train_loss"] == pytest.approx(whole["train_loss"], rel=1e-5)
    assert [v["tokens"] for v in resumed["val"]] == [v["tokens"] for v in whole["val"]]


@pytest.mark.parametrize("regime", ["kd", "cpt"])
def test_cell_records_the_regime_and_its_tokens(cfg_for, regime):
    out = run_cell(cfg_for("model=tiny-llama-gqa", "method=depth_magnitude", "ratio=0.25", f"retrain={regime}",
                           "retrain.tokens=96", "eval.ppl.max_windows=1", "eval.ppl.bos_modes=[once]", *SHORT))
    assert out.parent.name == f"depth_magnitude++{regime}"
    rows = [json.loads(line) for line in (out / "records.jsonl").read_text().splitlines()]
    plan = json.loads((out / "plan.json").read_text())
    assert {r["retrain"] for r in rows} == {regime} and {r["retrain_tokens"] for r in rows} == {96}
    assert {r["params"] for r in rows} == {plan["predicted_params"]}
    summary = json.loads((out / "retrain.json").read_text())
    assert summary["tokens_trained"] == 96 and summary["data_source"].startswith("local:corpus")
    assert not (out / distill.CHECKPOINT).exists()


def test_torchrun_two_ranks_equal_one_process(tmp_path, data_root):
    """`torchrun --nproc-per-node=2` (gloo) writes one cell whose curves equal one process's with the same global
    batch: to 1e-4 relative or 1e-6 absolute (the same fp32 sums, reduced in another order and with one thread a
    rank: 32 steps of losses near 1e-3 differ by at most 1.6e-8 here)."""
    args = ["model=tiny-llama-gqa", "method=depth_ppl", "ratio=0.25", "retrain=kd", "retrain.tokens=8192",
            "eval=quick", "eval.stages=[ppl]", "eval.ppl.max_windows=1", "retrain.seq_len=32",
            "retrain.micro_batch=4", "retrain.grad_accum=2", "retrain.val_sequences=4", "retrain.evals=2"]
    env = os.environ | {"BENCH_DATA": str(data_root), "BENCH_CACHE": str(tmp_path / "cache")}
    torchrun = Path(sys.executable).parent / "torchrun"
    with socket.socket() as s:  # a free port (torchrun's --master-port=0 waits forever here)
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    two = subprocess.run([str(torchrun), "--nproc-per-node=2", "--master-addr=127.0.0.1", f"--master-port={port}",
                          "-m", "bench", *args,
                          f"out_dir={tmp_path / 'two'}"], env=env, cwd=tmp_path, capture_output=True, text=True,
                         timeout=900)
    assert two.returncode == 0, two.stderr[-3000:]
    one = subprocess.run([sys.executable, "-m", "bench", *args, f"out_dir={tmp_path / 'one'}"], env=env, cwd=tmp_path,
                         capture_output=True, text=True, timeout=900)
    assert one.returncode == 0, one.stderr[-3000:]
    cells = {name: next((tmp_path / name).rglob("retrain.json")).parent for name in ("one", "two")}
    a, b = (json.loads((cells[n] / "retrain.json").read_text()) for n in ("one", "two"))
    assert (a["world_size"], b["world_size"]) == (1, 2) and a["tokens"] == b["tokens"]
    assert b["train_loss"] == pytest.approx(a["train_loss"], rel=1e-4, abs=1e-6)
    assert [v["kl"] for v in b["val"]] == pytest.approx([v["kl"] for v in a["val"]], rel=1e-4, abs=1e-6)
    assert len((cells["two"] / "records.jsonl").read_text().splitlines()) == \
        len((cells["one"] / "records.jsonl").read_text().splitlines())
    shutil.rmtree(tmp_path / "cache", ignore_errors=True)


@pytest.mark.parametrize("model", ["tiny-llama", "tiny-qwen2", "tiny-qwen3", "tiny-mistral", "tiny-gemma3",
                                   "tiny-phi3"])
@pytest.mark.parametrize("regime", ["kd", "cpt"])
def test_every_regime_on_every_tiny_architecture(cfg_for, model, regime):
    """A depth-pruned cell of each registry architecture retrains and evaluates (kd with the hidden term)."""
    hidden = ["retrain.kd.hidden_weight=1.0"] if regime == "kd" else []
    out = run_cell(cfg_for(f"model={model}", "method=depth_magnitude", "ratio=0.25", f"retrain={regime}",
                           "retrain.tokens=32", *hidden, "retrain.evals=1",
                           "eval.ppl.max_windows=1", "eval.ppl.bos_modes=[once]", *SHORT))
    summary = json.loads((out / "retrain.json").read_text())
    assert summary["tokens_trained"] == 32 and all(math.isfinite(x) for x in summary["train_loss"])
    if regime == "kd":
        assert summary["kd"]["layer_map"] == json.loads((out / "plan.json").read_text())["keep"]


def test_memory_plan_for_retraining_shards_the_states():
    from bench.memory import Shape, predict_retrain

    shape = Shape(layers=32, hidden=4096, heads=32, kv_heads=32, intermediate=11008, vocab=32000, tied=False)
    one, eight = (predict_retrain(shape, "kd", 0.2, g) for g in (1, 8))
    assert one["states"] == pytest.approx(8 * eight["states"]) and one["teacher"] == pytest.approx(8 * eight["teacher"])
    assert one["states"] / 16 < shape.params and one["teacher"] == 2 * shape.params
    assert eight["gathered"] > 0 == one["gathered"] and one["activations"] == eight["activations"]
    assert predict_retrain(shape, "cpt", 0.2, 1)["logits"] * 2 == one["logits"]
    lora = predict_retrain(shape, "kd", 0.2, 1, params="lora")
    assert lora["states"] < one["states"] / 4
