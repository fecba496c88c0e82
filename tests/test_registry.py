"""Every runnable method on every tiny architecture, from the registry alone: adding a method (a class and a YAML)
or a tiny model config adds its cases here without editing this file.

Per (architecture, method) that applies: score, plan, the plan's JSON round trip, apply, exact parameter count
against the plan's prediction, a finite forward, greedy generation with the KV cache equal to without, and the
saved model reloaded with logits equal to the in-memory one. A method that does not apply to an architecture
(its `check` or the layout check refuses it in one line) is skipped with that line as the reason.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from bench import BenchError, plans
from bench.budget import resolve_budget
from bench.config import choices, compose
from bench.data import calibration_ids
from bench.methods import build_method
from bench.models import check_layout, count_params, load_model
from bench.records import write_json
from bench.runner import calib_spec, run_cell
from bench.surgery import load_pruned, save_pruned

ARCHS = [name for name in choices("model") if name.startswith("tiny-")]
METHODS = choices("method")
SMALL_CALIB = ("calibration=shared", "shared_calib.n_samples=4", "shared_calib.seq_len=32")


def prepared(cfg_for, arch, method):
    """(method, model, tokenizer, budget, calibration ids) for one case; skips a case the method refuses."""
    cfg = cfg_for(f"model={arch}", f"method={method}", *SMALL_CALIB)
    m = build_method(cfg.method)
    model, tok = load_model(cfg.model, cfg.cache_dir, "cpu", "float32")
    budget = resolve_budget(model, 0.25) if m.prunes else None
    try:
        check_layout(model, m.layout, f"method={method}")  # what check() does first; dense has no check
        m.check(budget, model)
    except BenchError as e:
        pytest.skip(f"does not apply: {e}")
    spec = calib_spec(cfg, m)
    calib = spec and calibration_ids(tok, spec.dataset, spec.n_samples, spec.seq_len, spec.seed, cfg.data_root)[0]
    return m, model, tok, budget, calib


def round_trip(plan, tmp_path):
    """The plan as plan.json holds it, read back as its own kind."""
    write_json(tmp_path / "plan.json", plan.to_json())
    return plans.from_json(json.loads((tmp_path / "plan.json").read_text()))


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("arch", ARCHS)
def test_method_on_architecture(cfg_for, tmp_path, arch, method):
    m, model, tok, budget, calib = prepared(cfg_for, arch, method)
    plan = m.plan(m.score(model, calib, budget), budget, model)
    assert plan.kind == m.kind
    back = round_trip(plan, tmp_path)
    if plan.kind == "slice":  # plan.json keeps the bases' hashes only: it comes back with identity bases
        assert back.rotations is None and back.dims == plan.dims
    else:
        assert back == plan
    m.apply(model, plan)
    if m.prunes:
        assert count_params(model) == plan.predicted_params
        assert count_params(model) < budget.dense_params
    ids = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits = model(ids, use_cache=False).logits
        assert torch.isfinite(logits).all()
        kw = dict(max_new_tokens=6, min_new_tokens=6, do_sample=False, pad_token_id=0)
        assert torch.equal(model.generate(ids[:1, :8], use_cache=True, **kw),
                           model.generate(ids[:1, :8], use_cache=False, **kw))
    reloaded = load_pruned(save_pruned(model, tok, plan, tmp_path / "model"))
    assert count_params(reloaded) == count_params(model)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids, use_cache=False).logits, logits, atol=1e-5, rtol=0)


def test_every_method_applies_to_a_grouped_query_llama():
    """The registry's cases are not all skipped: every method runs on LLaMA with grouped-query attention."""
    model, _ = load_model(compose(["model=tiny-llama-gqa"]).model, "unused", "cpu", "float32")
    for method in METHODS:
        m = build_method(compose([f"method={method}"]).method)
        check_layout(model, m.layout, f"method={method}")
        if m.prunes:
            m.check(resolve_budget(model, 0.25), model)


@pytest.mark.parametrize("method", ["depth_ppl", "wanda_sp"])
def test_depth_and_uniform_width_models_load_with_stock_transformers(cfg_for, tmp_path, method):
    """A depth-pruned model and a uniformly width-pruned one (every layer the same sizes, no added bias) are plain
    checkpoints: AutoModelForCausalLM.from_pretrained, no bench code, gives the same logits."""
    from transformers import AutoModelForCausalLM

    out = run_cell(cfg_for("model=tiny-llama-gqa", f"method={method}", "ratio=0.25", "save_model=true",
                           "eval.ppl.max_windows=1", *SMALL_CALIB))
    saved = out / "model"
    assert {"config.json", "model.safetensors", "plan.json", "tokenizer.json"} <= {p.name for p in saved.iterdir()}
    config = json.loads((saved / "config.json").read_text())
    assert "layer_shapes" not in config and "slicing" not in config
    stock = AutoModelForCausalLM.from_pretrained(saved, dtype=torch.float32).eval()
    plan = plans.from_json(json.loads((saved / "plan.json").read_text()))
    cfg = cfg_for("model=tiny-llama-gqa")
    model, _ = load_model(cfg.model, cfg.cache_dir, "cpu", "float32")
    build_method(cfg_for(f"method={method}").method).apply(model, plan)
    ids = torch.randint(0, 256, (1, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(stock(ids).logits, model(ids).logits, atol=1e-5, rtol=0)
    rows = [json.loads(line) for line in (out / "records.jsonl").read_text().splitlines()]
    assert count_params(stock) == rows[0]["params"] == plan.predicted_params


def test_plan_file_replays_depth_random(cfg_for, tmp_path):
    """plan_file= reads the plan by its own kind: the worked example's plan (a class outside the three families'
    modules) replays to the same blocks and parameters."""
    first = run_cell(cfg_for("model=tiny-llama", "method=depth_random", "ratio=0.25", "eval.ppl.max_windows=1"))
    again = run_cell(cfg_for("model=tiny-llama", "method=depth_random", "ratio=0.25", "eval.ppl.max_windows=1",
                             f"plan_file={first / 'plan.json'}", f"out_dir={tmp_path / 'replay'}"))
    assert json.loads((again / "plan.json").read_text())["remove"] == json.loads(
        (first / "plan.json").read_text())["remove"]
    rows = [json.loads((d / "records.jsonl").read_text().splitlines()[0]) for d in (first, again)]
    assert rows[0]["params"] == rows[1]["params"] and rows[1]["plan_file"] == str(first / "plan.json")


EXTERNAL = '''
from dataclasses import dataclass
from typing import ClassVar

from bench.methods.depth import DepthPruner


@dataclass
class LastBlocks(DepthPruner):
    """Removes the last allowed blocks: a criterion defined outside the repository."""

    criterion: ClassVar[str] = "last"
    needs_calib: ClassVar[bool] = False

    def score(self, model, calib_ids, budget=None):
        return [-b for b in range(budget.n_blocks)]
'''


def test_a_method_defined_outside_the_repo_runs(tmp_path, data_root):
    """A class importable as module:Class and its YAML in the user's own config directory (hydra.searchpath):
    nothing in the repository is edited."""
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "my_methods.py").write_text(EXTERNAL)
    (tmp_path / "myconf" / "method").mkdir(parents=True)
    (tmp_path / "myconf" / "method" / "last_blocks.yaml").write_text(
        "impl: my_methods:LastBlocks\nname: last_blocks\nkeep_first: 0\nkeep_last: 1\n")
    env = os.environ | {"BENCH_DATA": str(data_root), "BENCH_CACHE": str(tmp_path / "cache"),
                        "PYTHONPATH": str(tmp_path / "mine")}
    run = subprocess.run([sys.executable, "-m", "bench", "model=tiny-llama", "method=last_blocks", "ratio=0.25",
                          "eval.stages=[ppl]", "eval.ppl.max_windows=1", f"out_dir={tmp_path / 'res'}",
                          f"hydra.searchpath=[file://{tmp_path / 'myconf'}]"],
                         capture_output=True, text=True, env=env, cwd=tmp_path)
    assert run.returncode == 0, run.stderr
    plan = json.loads((tmp_path / "res" / "tiny-llama" / "last_blocks" / "r0.25" / "plan.json").read_text())
    assert plan["kind"] == "depth" and plan["criterion"] == "last" and plan["remove"] == [8, 9, 10]
