"""Speed stage: records per batch size, interleaved speedups, the OOM path, shape-only models and saved plans."""

from __future__ import annotations

import json

import pytest
import torch

import bench.evals.speed as speed
from bench import BenchError, memory
from bench.budget import resolve_budget
from bench.config import compose
from bench.methods import build_method
from bench.models import build_from_config, count_params, hf_config
from bench.runner import run_cell

QUICK = ("eval.stages=[speed]", "eval.speed.batch_sizes=[1,2,4]", "eval.speed.new_tokens=[6]", "eval.speed.warmup=1",
         "eval.speed.warmup_tokens=2", "eval.speed.repeats=2", "eval.speed.min_time_s=0")


def records(out):
    """The cell's evaluation rows (its per-stage memory rows apart: tests/test_memory.py)."""
    rows = [json.loads(line) for line in (out / "records.jsonl").read_text().splitlines()]
    return [r for r in rows if r["stage"] != "memory"]


def test_speed_records_per_batch_size(cfg_for):
    rows = records(run_cell(cfg_for("model=tiny-llama-gqa", "method=depth_magnitude", "ratio=0.25", *QUICK)))
    by = {(r["metric"], r["batch_size"]): r for r in rows}
    for b in (1, 2, 4):
        lat, thr = by["latency_s", b], by["throughput_tok_s", b]
        assert lat["status"] == "ok" and lat["n"] == 2 and all(t > 0 for t in lat["raw"])
        # throughput = batch x new tokens / latency, run by run
        assert thr["raw"] == pytest.approx([b * 6 / t for t in lat["raw"]], rel=1e-4)
        assert by["speedup", b]["reference"] == "dense" and by["speedup", b]["value"] > 0
        assert by["prefill_s", b]["value"] > 0 and by["peak_mem_mib", b]["value"] >= by["peak_mem_mib", b]["weights_mib"]
        assert by["decode_s", b]["value"] == pytest.approx(lat["value"] - by["prefill_s", b]["value"])
    # the batch-1 roofline needs a positive decode time (mean latency - mean prefill: generates timed apart, which
    # a loaded machine does not order): its row is there exactly when decode_s > 0, never above batch 1
    decode_1 = by["decode_s", 1]["value"]
    assert (("roofline_frac", 1) in by) is (decode_1 > 0) and ("roofline_frac", 2) not in by
    if decode_1 > 0:
        roof = by["roofline_frac", 1]
        assert roof["bandwidth_gb_s"] > 0 and roof["value"] > 0 and roof["bytes_per_step"] > 0
    assert {r["runtime"] for r in rows} == {"eager"} and all(r["mode"] == "weights" for r in rows)
    assert rows[0]["params"] < rows[0]["dense_params"]


def test_dense_cell_has_no_speedup_rows(cfg_for):
    rows = records(run_cell(cfg_for("model=tiny-llama", "method=dense", *QUICK[:2], "eval.speed.new_tokens=[8]",
                                    "eval.speed.repeats=1", "eval.speed.min_time_s=0")))
    decode_1 = next(r["value"] for r in rows if r["metric"] == "decode_s" and r["batch_size"] == 1)
    roofline = {"roofline_frac"} if decode_1 > 0 else set()  # as in test_speed_records_per_batch_size
    assert {r["metric"] for r in rows} == {"latency_s", "throughput_tok_s", "prefill_s", "decode_s", "decode_tok_s",
                                           "peak_mem_mib"} | roofline


def test_out_of_memory_is_recorded_and_larger_batches_skipped(cfg_for, monkeypatch):
    real = speed.generate

    def generate(model, ids, new_tokens, runtime):
        if ids.shape[0] >= 2:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real(model, ids, new_tokens, runtime)

    monkeypatch.setattr(speed, "generate", generate)
    rows = records(run_cell(cfg_for("model=tiny-llama", "method=depth_magnitude", "ratio=0.25", *QUICK)))
    oom = [r for r in rows if r["status"] == "oom"]
    assert len(oom) == 1 and oom[0]["batch_size"] == 2 and "out of memory" in oom[0]["error"]
    assert {r["batch_size"] for r in rows} == {1, 2}  # batch 4 skipped


def test_a_point_predicted_not_to_fit_is_skipped_and_recorded(cfg_for, monkeypatch):
    """eval.speed.batch_sizes=[1,100000] with 1 GiB free (a stand-in for the free-memory reader, so the test does
    not depend on this machine's memory): batch 1 is measured with its speedup; batch 100000 is one skipped_memory
    row with its predicted and free bytes, and neither the pruned model nor its dense reference runs there."""
    monkeypatch.setattr(memory, "free_bytes", lambda device: 2**30)
    real = speed.generate

    def generate(model, ids, new_tokens, runtime):  # fails the cell at once, rather than filling the memory
        assert ids.shape[0] == 1, f"batch {ids.shape[0]} ran although predicted not to fit"
        return real(model, ids, new_tokens, runtime)

    monkeypatch.setattr(speed, "generate", generate)
    rows = records(run_cell(cfg_for("model=tiny-llama", "method=depth_magnitude", "ratio=0.25", *QUICK,
                                    "eval.speed.batch_sizes=[1,100000]")))
    one = {r["metric"]: r for r in rows if r["batch_size"] == 1}
    assert one["latency_s"]["status"] == "ok" and one["speedup"]["reference"] == "dense" and one["speedup"]["n"] == 2
    (skipped,) = [r for r in rows if r["batch_size"] == 100000]
    assert skipped["status"] == "skipped_memory" and skipped["metric"] == "latency_s" and skipped["value"] is None
    assert skipped["free_bytes"] == 2**30 < skipped["predicted_bytes"] and skipped["n"] == 0
    assert skipped["speed_reference"] == one["latency_s"]["speed_reference"] and "MiB free" in skipped["error"]


def test_memory_skips_take_the_reference_along(monkeypatch):
    """A reference is skipped with the models it is the reference of (a speedup needs both), and only then."""
    big, small = torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)
    mib = 2**20
    monkeypatch.setattr(memory, "free_bytes", lambda device: 100 * mib)
    monkeypatch.setattr(memory, "speed_point_bytes", lambda model, *a: (500 if model is big else 50) * mib)
    cpu = torch.device("cpu")
    skips = speed.memory_skips({"model": big, "dense": small}, cpu, 4, 11, 8, reference="dense")
    assert skips["model"] == {"predicted_bytes": 500 * mib, "free_bytes": 100 * mib,
                              "error": "predicted 500 MiB above the weights, 100 MiB free"}
    assert skips["dense"] == {"predicted_bytes": 50 * mib, "free_bytes": 100 * mib,
                              "error": "reference of skipped models (model)"}
    assert set(speed.memory_skips({"model": small, "dense": big}, cpu, 4, 11, 8, reference="dense")) == {"dense"}
    assert set(speed.memory_skips({"model": big, "dense": small}, cpu, 4, 11, 8)) == {"model"}
    monkeypatch.setattr(memory, "free_bytes", lambda device: None)  # unreadable: nothing is skipped
    assert speed.memory_skips({"model": big}, cpu, 4, 11, 8) == {}


def test_other_errors_are_not_swallowed(monkeypatch):
    monkeypatch.setattr(speed, "generate", lambda *a: (_ for _ in ()).throw(ValueError("bad kwargs")))
    cfg = compose(list(QUICK))
    with pytest.raises(ValueError, match="bad kwargs"):
        speed.measure({"m": torch.nn.Linear(1, 1)}, torch.zeros(1, 3, dtype=torch.long), cfg.eval.speed)


@pytest.mark.parametrize("method, ratio, expected", [
    ("depth_ppl", 0.2, 5_524_115_456),     # 6 of 32 blocks (methods.md section 0)
    ("depth_ppl", 0.35, 4_512_198_656),    # 11 blocks
])
def test_shape_only_llama7b_depth(method, ratio, expected):
    cfg = compose(["model=llama-7b", f"method={method}", f"ratio={ratio}"])
    model = build_from_config(hf_config(cfg.model), device="meta")
    assert count_params(model) == 6_738_415_616
    m = build_method(cfg.method)
    plan = m.plan(None, resolve_budget(model, ratio), model)
    assert plan.criterion is None and len(plan.remove) == round(ratio * 32 + 1e-9)
    m.apply(model, plan)
    assert count_params(model) == expected == plan.predicted_params


@pytest.mark.parametrize("ratio", [0.2, 0.35])
def test_shape_only_llama7b_uniform_width(ratio):
    cfg = compose(["model=llama-7b", "method=llm_pruner", f"ratio={ratio}"])
    model = build_from_config(hf_config(cfg.model), device="meta")
    budget = resolve_budget(model, ratio)
    m = build_method(cfg.method)
    plan = m.plan(None, budget, model)
    layers = plan.layers
    assert sorted(map(int, layers)) == list(range(4, 30))  # LLM-Pruner's blocks 4..29
    first = layers["4"]
    assert all(spec == first for spec in layers.values())  # uniform
    assert first["remove_channels"] == list(range(len(first["remove_channels"])))  # by index: no data
    m.apply(model, plan)
    layer = model.model.layers[4]
    kept_heads = 32 - plan.uniform["head_units"]
    assert layer.self_attn.q_proj.out_features == kept_heads * 128 == layer.self_attn.k_proj.out_features
    assert layer.mlp.gate_proj.out_features == 11008 - plan.uniform["channels"]
    assert count_params(model) == plan.predicted_params
    assert abs(count_params(model) - budget.target_params) <= 0.005 * budget.dense_params


def test_shape_only_cell_and_plan_file(cfg_for):
    common = ("model=tiny-llama-gqa", "ratio=0.25", *QUICK[:1], "eval.speed.batch_sizes=[1]",
              "eval.speed.new_tokens=[3]", "eval.speed.repeats=1", "eval.speed.warmup=0", "eval.speed.min_time_s=0")
    real = run_cell(cfg_for("method=flap", *common, "calibration=shared"))
    real_params = records(real)[0]["params"]
    shaped = run_cell(cfg_for("method=flap", *common, "shape_only=true", f"plan_file={real / 'plan.json'}",
                              "sweep_name=shape", "out_dir=${cache_dir}/shape"))
    rows = records(shaped)
    assert rows[0]["mode"] == "shape_only" and rows[0]["params"] == real_params
    structural = run_cell(cfg_for("method=wanda_sp", *common, "shape_only=true", "out_dir=${cache_dir}/shape2"))
    assert json.loads((structural / "plan.json").read_text())["criterion"] is None
    with pytest.raises(BenchError, match="eval.stages: 'ppl' needs real weights.*allowed values with shape_only are "
                                         "speed"):
        run_cell(cfg_for("method=depth_ppl", "model=tiny-llama", "shape_only=true", "eval.stages=[ppl,speed]"))
    with pytest.raises(BenchError, match="plan_file=.*a width plan, but method=depth_ppl. needs a depth plan"):
        run_cell(cfg_for("method=depth_ppl", *common, f"plan_file={real / 'plan.json'}", "out_dir=${cache_dir}/x"))


def test_compiled_runtime_on_cpu(cfg_for):
    """The static-cache + torch.compile runtime runs and is recorded as such (compiles once at warm-up)."""
    rows = records(run_cell(cfg_for("model=tiny-llama", "method=dense", "eval.stages=[speed]",
                                    "eval.speed.runtimes=[compiled]", "eval.speed.batch_sizes=[1]",
                                    "eval.speed.new_tokens=[4]", "eval.speed.warmup=1", "eval.speed.repeats=2",
                                    "eval.speed.min_time_s=0")))
    lat = next(r for r in rows if r["metric"] == "latency_s")
    assert lat["runtime"] == "compiled" and lat["status"] == "ok" and lat["n"] == 2


def test_warmup_is_full_length_on_a_gpu_and_short_for_eager_on_the_cpu():
    scfg = compose(["eval.speed.warmup_tokens=2"]).eval.speed
    cpu, gpu = torch.device("cpu"), torch.device("cuda", 0)  # a device object only: nothing is allocated
    assert speed.warmup_tokens("eager", cpu, 128, scfg) == 2
    assert speed.warmup_tokens("eager", cpu, 1, scfg) == 1
    assert speed.warmup_tokens("eager", gpu, 128, scfg) == 128
    assert speed.warmup_tokens("compiled", cpu, 128, scfg) == 128
