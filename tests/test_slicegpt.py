"""SliceGPT: an unsliced rotation is exact, a sliced model computes the projected dense model, budgets are exact."""

from __future__ import annotations

import copy
from types import SimpleNamespace
import json

import pytest
import torch

from bench import BenchError
from bench.budget import resolve_budget
from bench.data import calibration_ids
from bench.methods import build_method
from bench.methods.slicegpt import pca_rotations, slice_dims, sliced_param_count
from bench.methods.width_criteria import layer_inputs
from bench.models import count_params, load_model
from bench.records import write_json
from bench.runner import run_cell
from bench.surgery import apply_slice_plan


def calib(tok, data_root, n=8, seq_len=32):
    return calibration_ids(tok, "bookcorpus", n, seq_len, 0, data_root)[0]


@torch.no_grad()
def projected_logits(model, ids, rotations):
    """The dense model with every residual-stream site projected onto its basis: what slicing should compute."""
    def proj(x, site):
        q = rotations[site].double()
        return ((x.double() @ q) @ q.T).to(x.dtype)

    (x, kw), = layer_inputs(model, ids, len(ids))
    x = proj(x, "embed")
    for i, layer in enumerate(model.model.layers):
        m = proj(x + layer.self_attn(hidden_states=layer.input_layernorm(x), **kw)[0], f"mid{i}")
        x = proj(m + layer.mlp(layer.post_attention_layernorm(m)), f"out{i}")
    return model.lm_head(model.model.norm(x))


def test_rotation_without_slicing_keeps_logits(tiny, data_root, ids):
    model, tok, _ = tiny
    h = model.config.hidden_size
    dims = slice_dims(model, h)
    rotations = pca_rotations(model, calib(tok, data_root), dims)["rotations"]
    assert all(not torch.allclose(q, torch.eye(h)) for q in rotations.values())  # real rotations, not identities
    rotated = apply_slice_plan(copy.deepcopy(model), SimpleNamespace(dims=dims, rotations=rotations, hidden=None))
    with torch.no_grad():
        before, after = model(ids).logits, rotated(ids).logits
    assert (before - after).abs().max().item() < 1e-4
    assert rotated.get_input_embeddings().weight is not rotated.lm_head.weight  # untied


@pytest.mark.parametrize("ratio", [0.2, 0.35])
def test_slicegpt_plan_apply_generate(tiny, data_root, ids, ratio):
    model, tok, _ = tiny
    method = build_method({"impl": "slicegpt", "name": "slicegpt", "batch_size": 4})
    budget = resolve_budget(model, ratio)
    method.check(budget, model)
    cal = calib(tok, data_root)
    plan = method.plan(method.score(model, cal, budget), budget, model)
    h, d = model.config.hidden_size, plan.hidden
    assert d < h and plan.dims[f"out{len(model.model.layers) - 1}"] == h
    # d is the width whose exact count is nearest the budget
    gaps = {w: abs(sliced_param_count(model, slice_dims(model, w)) - budget.target_params) for w in range(1, h + 1)}
    assert gaps[d] == min(gaps.values())
    expected = projected_logits(model, ids, plan.rotations)
    pruned = apply_slice_plan(copy.deepcopy(model), plan)
    assert count_params(pruned) == plan.predicted_params
    assert pruned.model.layers[3].self_attn.q_proj.in_features == d
    with torch.no_grad():
        logits = pruned(ids).logits
    assert (logits - expected).abs().max().item() < 1e-4
    # greedy generation with the KV cache equals recomputing every step without it
    prompt = ids[:1, :8]
    out = pruned.generate(prompt, max_new_tokens=6, do_sample=False, min_new_tokens=6)
    step = prompt
    for _ in range(6):
        with torch.no_grad():
            nxt = pruned(step, use_cache=False).logits[:, -1].argmax(-1, keepdim=True)
        step = torch.cat([step, nxt], dim=1)
    assert torch.equal(out, step)


def test_nominal_sparsity_and_plan_json(tiny, tmp_path):
    model, _, _ = tiny
    method = build_method({"impl": "slicegpt", "name": "slicegpt", "sparsity": 0.25, "round_to": 8})
    budget = resolve_budget(model, 0.2)
    plan = method.plan(None, budget, model)  # shape-only: identity bases
    h = model.config.hidden_size
    assert plan.hidden == int(0.75 * h) // 8 * 8 and plan.hidden < h  # the original's nominal rule
    assert plan.predicted_params == sliced_param_count(model, plan.dims)
    plan.rotations = {"embed": torch.eye(4)}
    write_json(tmp_path / "plan.json", plan.to_json())
    saved = json.loads((tmp_path / "plan.json").read_text())["rotations"]["embed"]
    assert saved["tensor"] == [4, 4] and len(saved["sha256"]) == 64


def test_slicegpt_refuses_gemma3(cfg_for):
    cfg = cfg_for("model=tiny-gemma3")
    model, _ = load_model(cfg.model, cfg.cache_dir, "cpu", "float32")
    method = build_method({"impl": "slicegpt", "name": "slicegpt"})
    with pytest.raises(BenchError, match="slicegpt.*post_feedforward|pre_feedforward"):
        method.check(resolve_budget(model, 0.2), model)


def test_slicegpt_cell_scores_cached(cfg_for):
    overrides = ("model=tiny-llama-gqa", "method=slicegpt", "ratio=0.2", "calibration=shared",
                 "shared_calib.n_samples=4", "shared_calib.seq_len=32")
    out = run_cell(cfg_for(*overrides))
    plan = json.loads((out / "plan.json").read_text())
    rows = [json.loads(line) for line in (out / "records.jsonl").read_text().splitlines()]
    assert rows and {r["params"] for r in rows} == {plan["predicted_params"]} and plan["kind"] == "slice"
    assert (out / "scores.csv").read_text().startswith("site,index,eigenvalue")
    cached = list((out.parents[3] / "cache" / "scores").rglob("*.pt"))
    assert len(cached) == 1
    with pytest.raises(BenchError, match="plan_file"):
        run_cell(cfg_for(*overrides, f"plan_file={out / 'plan.json'}", f"out_dir={out.parents[3] / 'again'}"))


@pytest.mark.parametrize("ratio, d", [(0.2, 3272), (0.35, 2656)])
def test_native_nominal_slicing_llama7b(ratio, d):
    """protocol=native: run_slicegpt.py's d = int((1 - s) h) rounded down to a multiple of 8, s = the ratio, the
    lm_head unsliced; the target stays depth's count and the budget is honestly not matched."""
    from bench.config import compose
    from bench.models import build_from_config, hf_config

    model = build_from_config(hf_config(compose(["model=llama-7b"]).model))  # meta device: shapes only
    method = build_method({"impl": "slicegpt", "name": "slicegpt", "round_to": 1}, "native")
    budget = resolve_budget(model, ratio)
    method.check(budget, model)  # no "cannot go below" error: the nominal rule aims at no budget
    plan = method.plan(None, budget, model)
    h, v, i, n = 4096, 32000, 11008, 32
    assert plan.hidden == d == int((1 - ratio) * h) // 8 * 8 and plan.round_to == 8 and plan.sparsity == ratio
    assert plan.dims["out31"] == h and plan.dims["out30"] == d  # lm_head not sliced
    # every block at d, except that the last one writes the full width h into the unsliced lm_head (its down_proj
    # rows and its MLP shortcut d x h: rotate.py's get_mlp_output_dimension(last) = the head dimension)
    last = (h - d) * (i + d)
    assert plan.predicted_params == n * (4 * h * d + 3 * i * d + 2 * d * d) + last + v * d + v * h
    assert plan.target_params == budget.target_params and not plan.budget_matched
    assert method.departures() and all(isinstance(s, str) for s in method.departures())
    explicit = build_method({"impl": "slicegpt", "name": "slicegpt", "sparsity": 0.3}, "native")
    assert explicit.plan(None, budget, model).hidden == 2864  # an explicit sparsity wins over the ratio
