"""protocol=native | matched: what each switches, the records that say which ran, the paper sweeps' counts."""

from __future__ import annotations

import json

import pytest

from bench.budget import resolve_budget
from bench.config import CONF_DIR, compose
from bench.methods import build_method
from bench.models import build_from_config, hf_config
from bench.runner import calib_spec, calibration_kind, run_cell, run_dtype


def records(out):
    return [json.loads(line) for line in (out / "records.jsonl").read_text().splitlines()]


def test_every_record_carries_the_protocol(cfg_for, tmp_path):
    for protocol in ("matched", "native"):
        out = run_cell(cfg_for("model=tiny-llama", "method=depth_magnitude", "ratio=0.25", f"protocol={protocol}",
                               "eval.ppl.max_windows=1", f"out_dir={tmp_path / protocol}"))
        rows = records(out)
        assert rows and {r["protocol"] for r in rows} == {protocol}
        assert all(isinstance(r["departures"], list) for r in rows)


def test_calibration_follows_the_protocol_unless_set():
    matched, native = compose(["method=flap"]), compose(["method=flap", "protocol=native"])
    assert calibration_kind(matched) == "shared" and calibration_kind(native) == "native"
    assert calibration_kind(compose(["method=flap", "protocol=native", "calibration=shared"])) == "shared"
    m = build_method(native.method, "native")
    assert m.protocol == "native" and calib_spec(native, m).n_samples == 1024  # FLAP's own 1024 x 128
    assert calib_spec(matched, build_method(matched.method)).n_samples == matched.shared_calib.n_samples


def test_native_evaluates_in_fp16_on_a_gpu_and_scores_taylor_in_fp32(cfg_for):
    assert run_dtype(compose(["protocol=native", "device=cuda"])) == "float16"  # the originals' .half()
    assert run_dtype(compose(["device=cuda"])) == "auto"  # matched: bf16 where supported (bench.models)
    assert run_dtype(compose(["protocol=native", "device=cpu"])) == "auto"
    out = run_cell(cfg_for("model=tiny-llama", "method=depth_taylor", "ratio=0.25", "protocol=native",
                           "dtype=bfloat16", "eval.ppl.max_windows=1"))
    row = records(out)[0]
    assert (row["dtype"], row["score_dtype"], row["protocol"]) == ("bfloat16", "float32", "native")


@pytest.mark.parametrize("model, ratio, blocks, params", [
    ("llama-7b", 0.2, 6, 5_524_115_456),      # st-llama-1-5.5b
    ("llama-7b", 0.35, 11, 4_512_198_656),
    ("vicuna-13b", 0.21, 8, 10_478_228_480),  # st-vicuna-v1.3-10.5b
    ("vicuna-13b", 0.37, 15, 8_257_797_120),  # the 15-block model of shortened-llm script/prune.sh
    ("llama3-8b", 0.2, 6, 6_721_589_248),
])
def test_native_depth_counts_from_the_config_alone(model, ratio, blocks, params):
    cfg = compose([f"model={model}", "method=depth_ppl", f"ratio={ratio}", "protocol=native"])
    meta = build_from_config(hf_config(cfg.model))
    budget = resolve_budget(meta, ratio)
    plan = build_method(cfg.method, "native").plan(None, budget, meta)
    assert (budget.remove_blocks, plan.predicted_params) == (blocks, params)


@pytest.mark.parametrize("sweep, ratios", [("paper_llama7b", (0.2, 0.35)), ("paper_vicuna13b", (0.21, 0.37)),
                                           ("llama3_8b", (0.2, 0.35))])
def test_paper_sweeps_run_native(sweep, ratios):
    cfg = compose([f"+sweep={sweep}"])
    assert cfg.protocol == "native" and calibration_kind(cfg) == "native"
    text = (CONF_DIR / "sweep" / f"{sweep}.yaml").read_text()
    assert f"ratio: {','.join(map(str, ratios))}" in text
