"""Width pruning: physical removal equals zeroing the same units, counts are exact, GQA stays consistent."""

from __future__ import annotations

import copy
from types import SimpleNamespace

import pytest
import torch

from bench import BenchError
from bench.budget import resolve_budget
from bench.config import compose
from bench.data import calibration_ids
from bench.methods import build_method
from bench.methods.base import METHODS
from bench.methods.width import FLAP, LLMPruner, MagnitudeWidth, layer_geometry
from bench.models import build_from_config, count_params, hf_config
from bench.surgery import apply_width_plan, load_pruned, prune_heads

WIDTH = ["llm_pruner", "wanda_sp", "flap", "magnitude_width"]


def zeroed_reference(model, plan):
    """The unpruned model with the plan's units zeroed: o_proj columns of removed query heads and down_proj
    columns of removed channels set to 0, plus FLAP's compensation bias."""
    ref = copy.deepcopy(model)
    for key, spec in plan.layers.items():
        layer = ref.model.layers[int(key)]
        o, down, d = layer.self_attn.o_proj, layer.mlp.down_proj, layer.self_attn.head_dim
        cols = [h * d + j for h in spec["remove_q"] for j in range(d)]
        with torch.no_grad():
            for linear, removed, mean in ((o, cols, spec.get("o_bias_mean")),
                                          (down, spec["remove_channels"], spec.get("down_bias_mean"))):
                if mean is not None:
                    bias = linear.weight[:, removed] @ torch.tensor(mean)
                    linear.bias = torch.nn.Parameter(bias if linear.bias is None else linear.bias + bias)
                linear.weight[:, removed] = 0
    return ref


def prune(model, tok, cfg_for, data_root, method, ratio=0.25, **overrides):
    cfg = cfg_for(f"method={method}", *[f"method.{k}={v}" for k, v in overrides.items()])
    m = build_method(cfg.method)
    budget = resolve_budget(model, ratio)
    m.check(budget, model)
    calib = None
    if m.needs_calib:
        calib, _ = calibration_ids(tok, "bookcorpus", 6, 32, 0, data_root)
    scores = m.score(model, calib, budget)
    return m, budget, m.plan(scores, budget, model)


@pytest.mark.parametrize("method", WIDTH)
def test_pruned_equals_zeroed(tiny, cfg_for, data_root, ids, method):
    model, tok, _ = tiny
    m, budget, plan = prune(model, tok, cfg_for, data_root, method)
    assert plan.layers, "the plan removes nothing"
    ref = zeroed_reference(model, plan)
    m.apply(model, plan)
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, ref(ids).logits, atol=1e-4, rtol=0)
    assert count_params(model) == plan.predicted_params
    kw = dict(max_new_tokens=8, min_new_tokens=8, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        assert torch.equal(model.generate(ids, use_cache=True, **kw), model.generate(ids, use_cache=False, **kw))
    for layer in model.model.layers:  # no key/value head orphaned, groups uniform
        n_q, n_kv = layer.self_attn.q_proj.out_features, layer.self_attn.k_proj.out_features
        assert n_q % n_kv == 0 and layer.self_attn.num_key_value_groups == n_q // n_kv


def test_llm_pruner_keeps_protected_blocks(tiny, cfg_for, data_root):
    model, tok, _ = tiny
    _, _, plan = prune(model, tok, cfg_for, data_root, "llm_pruner")
    assert set(plan.layers) <= {str(i) for i in range(4, 10)}


def test_q_heads_mode_prunes_evenly_within_groups(cfg_for, data_root, ids):
    cfg = cfg_for("model=tiny-llama-gqa")
    from bench.models import load_model

    model, tok = load_model(cfg.model, cfg.cache_dir, "cpu", "float32")
    m, _, plan = prune(model, tok, cfg_for, data_root, "llm_pruner", head_mode="q_heads")
    ref = zeroed_reference(model, plan)
    m.apply(model, plan)
    for key, spec in plan.layers.items():
        per_group = [q // 3 for q in spec["remove_q"]].count
        assert spec["remove_kv"] == [] and per_group(0) == per_group(1) >= 1
        attn = model.model.layers[int(key)].self_attn
        assert attn.k_proj.out_features // 16 == 2 and attn.q_proj.out_features // 16 == 6 - 2 * per_group(0)
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, ref(ids).logits, atol=1e-4, rtol=0)


def test_flap_model_reloads(tiny, cfg_for, data_root, ids, tmp_path):
    model, tok, _ = tiny
    m, _, plan = prune(model, tok, cfg_for, data_root, "flap")
    m.apply(model, plan)
    model.save_pretrained(tmp_path / "flap")
    reloaded = load_pruned(tmp_path / "flap")
    assert count_params(reloaded) == count_params(model)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, model(ids).logits, atol=1e-5, rtol=0)


def meta(name):
    return build_from_config(hf_config(compose([f"model={name}"]).model))


def test_llama7b_uniform_quarter_from_config():
    """LLM-Pruner's README setting: ratio 0.25 on heads and channels of blocks 4-29 -> 5,422,977,024 params."""
    model = meta("llama-7b")
    m = LLMPruner(name="llm_pruner", keep_first=4, keep_last=2)
    geo = [layer_geometry(layer) for layer in model.model.layers]
    counts = m.uniform_counts(geo, 0.25)
    assert set(counts) == set(range(4, 30)) and counts[4] == (8, 2752)
    zeros = {k: [[0.0] * n for n in sizes] for k, sizes in
             (("q", [32] * 32), ("kv", [32] * 32), ("channel", [11008] * 32))}
    layers = {str(i): m._select_layer(i, geo[i], zeros, c) for i, c in counts.items()}
    apply_width_plan(model, SimpleNamespace(layers=layers))
    assert count_params(model) == 5_422_977_024


@pytest.mark.parametrize("name", ["llama-7b", "llama3-8b", "smollm2-135m"])
@pytest.mark.parametrize("criterion", ["llm_pruner", "wanda_sp", "flap", "magnitude_width"])
@pytest.mark.parametrize("ratio", [0.2, 0.35])
def test_width_budget_within_half_percent_of_depth(name, criterion, ratio):
    model = meta(name)
    budget = resolve_budget(model, ratio)
    keep = (4, 2) if criterion == "llm_pruner" else (0, 0)
    m = METHODS[criterion](keep_first=keep[0], keep_last=keep[1], calib=None)
    g = torch.Generator().manual_seed(0)
    geo = [layer_geometry(layer) for layer in model.model.layers]
    scores = {"q": [torch.rand(x.n_q, generator=g).tolist() for x in geo],
              "kv": [[0.0] * x.n_kv for x in geo],
              "channel": [torch.rand(x.channels, generator=g).tolist() for x in geo],
              "o_mean": [[0.0] * (x.n_q * x.head_dim) for x in geo],
              "down_mean": [[0.0] * x.channels for x in geo]}
    plan = m.plan(scores, budget, model)
    assert abs(plan.predicted_params - budget.target_params) <= 0.005 * budget.dense_params
    assert plan.budget_matched
    apply_width_plan(model, plan)
    assert count_params(model) == plan.predicted_params


def test_round_to_keeps_hardware_friendly_sizes(tiny, cfg_for, data_root):
    model, tok, _ = tiny
    m, _, plan = prune(model, tok, cfg_for, data_root, "wanda_sp", round_to=8)
    m.apply(model, plan)
    assert all(layer.mlp.gate_proj.out_features % 8 == 0 for layer in model.model.layers)
    assert plan.round_to == 8


def test_unreachable_ratio_is_an_error(tiny, cfg_for, data_root):
    model, tok, _ = tiny
    with pytest.raises(BenchError, match="lower the ratio"):
        prune(model, tok, cfg_for, data_root, "llm_pruner", ratio=0.6)


def test_q_heads_on_mha_is_an_error(cfg_for):
    from bench.models import load_model

    cfg = cfg_for("model=tiny-llama", "method=llm_pruner", "method.head_mode=q_heads")
    model, _ = load_model(cfg.model, cfg.cache_dir, "cpu", "float32")
    with pytest.raises(BenchError, match="head_mode=q_heads needs grouped-query attention"):
        build_method(cfg.method).check(resolve_budget(model, 0.2), model)


def test_surgery_refuses_orphaned_or_uneven_groups(cfg_for):
    from bench.models import load_model

    cfg = cfg_for("model=tiny-llama-gqa")
    model, _ = load_model(cfg.model, cfg.cache_dir, "cpu", "float32")
    attn = model.model.layers[0].self_attn  # 6 query heads, 2 key/value heads: groups {0,1,2} {3,4,5}
    with pytest.raises(ValueError, match="orphaned"):
        prune_heads(attn, keep_q=[0, 1, 2], keep_kv=[0, 1])  # key/value head 1 would serve nobody
    with pytest.raises(ValueError, match="orphaned"):
        prune_heads(attn, keep_q=[0, 1, 3], keep_kv=[0, 1])  # groups of 2 and 1
    with pytest.raises(BenchError, match="allowed values for flap are kv_groups"):
        FLAP(name="flap", head_mode="q_heads")


def test_budget_match_ratio_targets_the_ratio_itself():
    model = meta("llama-7b")
    budget = resolve_budget(model, 0.2)
    m = MagnitudeWidth(name="w", budget_match="ratio")
    assert m.target(budget) == budget.dense_params - round(0.2 * 32 * 202_383_360)
    zeros = {"q": [[0.0] * 32] * 32, "kv": [[0.0] * 32] * 32, "channel": [[0.0] * 11008] * 32}
    plan = m.plan(zeros, budget, model)
    assert abs(plan.predicted_params - m.target(budget)) <= 0.005 * budget.dense_params
    assert plan.target_params == m.target(budget) != budget.target_params


@pytest.mark.parametrize("variant", ["param_first", "param_second", "param_mix", "vectorize"])
def test_taylor_variants_equal_direct_computation(tiny, ids, variant):
    from bench.methods.width_criteria import taylor_scores

    model, _, _ = tiny
    got = taylor_scores(model, ids, variant)
    model.zero_grad()
    model(ids, labels=ids).loss.backward()
    g = {n: p.grad.clone() for n, p in model.named_parameters()}
    sq = {n: torch.zeros_like(p) for n, p in model.named_parameters()}
    for sample in ids:
        model.zero_grad()
        model(sample[None], labels=sample[None]).loss.backward()
        for n, p in model.named_parameters():
            sq[n] += p.grad ** 2 / len(ids)
    layer = model.model.layers[3]

    def salience(module, dim):
        name = next(n for n, p in model.named_parameters() if p is module.weight)
        w = module.weight
        s = {"param_first": w * g[name], "vectorize": w * g[name], "param_second": w * sq[name] * w,
             "param_mix": w * g[name] - 0.5 * w * sq[name] * w}[variant]
        return s.sum(dim).abs() if variant == "vectorize" else s.abs().sum(dim)

    mlp = layer.mlp
    want = salience(mlp.gate_proj, 1) + salience(mlp.up_proj, 1) + salience(mlp.down_proj, 0)
    assert got["channel"][3] == pytest.approx(want.tolist(), rel=1e-4, abs=1e-9)
