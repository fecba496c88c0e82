"""LLM-Pruner's own rules: the head count (channels floored to whole heads), the native budget (the cell's ratio
on blocks 4..L-3, not matched) and the GQA score alignment, checked against the original's published counts."""

from __future__ import annotations

import pytest

from bench.budget import resolve_budget
from bench.config import compose
from bench.methods import build_method
from bench.methods.width import layer_geometry
from bench.models import build_from_config, count_params, hf_config
from bench.surgery import apply_width_plan


def meta(name):
    return build_from_config(hf_config(compose([f"model={name}"]).model))


def llm_pruner(protocol="native", **overrides):
    cfg = compose(["method=llm_pruner", *[f"method.{k}={v}" for k, v in overrides.items()]])
    return build_method(cfg.method, protocol)


@pytest.mark.parametrize("ratio, heads, channels", [(0.2, 6, 2202), (0.25, 8, 2752)])
def test_head_count_floors_pruned_channels_to_heads(ratio, heads, channels):
    """LLaMA-7B: q_proj loses 4096 - int(4096 (1 - r)) channels = 820 (r 0.2) or 1024 (0.25), floored to
    128-channel heads: 6 or 8 of 32 (metapruner.py prune_local); MLP 11008 - int(11008 (1 - r))."""
    geo = [layer_geometry(layer) for layer in meta("llama-7b").model.layers]
    m = llm_pruner()
    assert m.remove_heads(geo[4], ratio) == heads
    counts = m.uniform_counts(geo, ratio)
    assert set(counts) == set(range(4, 30)) and counts[4] == (heads, channels)


@pytest.mark.parametrize("name, ratio, params", [
    ("llama-7b", 0.25, 5_422_977_024),   # LLM-Pruner README (~20%): r 0.25 on blocks 4-29
    ("llama-7b", 0.2, 5_707_747_328),    # r 0.2: 6 heads + 2,202 channels per block
    ("llama3-8b", 0.25, 6_612_586_496),  # more_results/README.md (llama3.py, blocks 4-29): 2 of 8 KV groups
])
def test_native_plan_reproduces_original_counts(name, ratio, params):
    model = meta(name)
    budget = resolve_budget(model, ratio)
    m = llm_pruner()
    m.check(budget, model)
    plan = m.plan(None, budget, model)
    assert plan.predicted_params == params
    assert plan.target_params == budget.target_params  # depth's count, for reference
    assert not plan.budget_matched                      # LLM-Pruner's own ratio removes less than depth
    assert plan.uniform["ratio"] == ratio and set(plan.layers) == {str(i) for i in range(4, 30)}
    apply_width_plan(model, plan)
    assert count_params(model) == params


def test_llama3_native_counts():
    """Llama-3-8B: k_proj's 1024 channels root the group (llama3.py): 1024 - int(1024 x 0.8) = 205 -> 1 group
    at r 0.2 (the unit rule 8 - int(6.4) would give 2); 256 -> 2 groups at 0.25."""
    geo = [layer_geometry(layer) for layer in meta("llama3-8b").model.layers]
    m = llm_pruner()
    m.resolve_head_mode(geo)
    assert [m.remove_heads(geo[4], r) for r in (0.2, 0.25)] == [1, 2]
    assert m.uniform_counts(geo, 0.25)[4] == (2, 3584)


def test_matched_still_matches_depth():
    model = meta("llama-7b")
    budget = resolve_budget(model, 0.2)
    plan = llm_pruner("matched").plan(None, budget, model)
    assert plan.budget_matched and "ratio" not in plan.uniform


def test_gqa_alignment_original_vs_group():
    """Scores where only query heads {1, 1+n_kv, ...} matter: `original` folds them onto key/value head 1
    (hf_llama_pruner.py's view(len // min, min).sum(0)), `group` onto each head's true group; either way the
    removed query heads are the removed key/value head's own group."""
    geo = [layer_geometry(layer) for layer in meta("llama3-8b").model.layers]
    g = geo[4]  # 32 query heads, 8 key/value heads: groups of 4
    q = [0.0] * g.n_q
    for m in range(4):
        q[1 + 8 * m] = 1.0  # heads 1, 9, 17, 25: in groups 0, 2, 4, 6
    scores = {"q": [q] * len(geo), "kv": [[0.0] * g.n_kv] * len(geo), "channel": [[0.0] * g.channels] * len(geo)}
    native, matched = llm_pruner("native"), llm_pruner("matched")
    for m in (native, matched):
        m.resolve_head_mode(geo)
    assert native.alignment() == "original" and matched.alignment() == "group"
    orig = native._unit_scores(4, g, scores)
    assert [u[0] for u in orig] == [0, 4, 0, 0, 0, 0, 0, 0] and orig[1][1] == [4, 5, 6, 7]
    assert [u[0] for u in matched._unit_scores(4, g, scores)] == [1, 0, 1, 0, 1, 0, 1, 0]
    keep_one = native._select_layer(4, g, scores, (7, 0))  # remove 7 groups: original keeps group 1
    assert keep_one["remove_kv"] == [0, 2, 3, 4, 5, 6, 7]
    assert llm_pruner("native", gqa_align="group").alignment() == "group"


def test_departures_only_under_native():
    assert llm_pruner("matched").departures() == []
    assert any("float16" in d for d in llm_pruner("native").departures())
    assert any("gqa_align=group" in d for d in llm_pruner("native", gqa_align="group").departures())



def test_native_prunes_a_tiny_gqa_model(cfg_for, ids):
    """Scored end to end under native (original alignment): the surgery reaches the plan's count and every
    layer keeps whole, uniform groups."""
    from bench.methods.width_criteria import taylor_scores
    from bench.models import load_model

    cfg = cfg_for("model=tiny-llama-gqa")
    model, _ = load_model(cfg.model, cfg.cache_dir, "cpu", "float32")
    m = llm_pruner()
    budget = resolve_budget(model, 0.5)
    m.check(budget, model)
    plan = m.plan(taylor_scores(model, ids), budget, model)
    assert plan.uniform["ratio"] == 0.5 and plan.layers
    m.apply(model, plan)
    assert count_params(model) == plan.predicted_params
    for layer in model.model.layers:
        attn = layer.self_attn
        assert attn.q_proj.out_features // attn.k_proj.out_features == 3
