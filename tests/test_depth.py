"""Depth pruning: surgery is exact, pruned models stay plain HF models, criteria match their definitions."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import AutoModelForCausalLM

from bench import BenchError
from bench.budget import resolve_budget
from bench.data import calibration_ids
from bench.methods import build_method
from bench.methods.depth import (SLEB, Angular, DepthMagnitude, angular_distances, block_influence_scores,
                                 magnitude_scores, ppl_scores, ppl_scores_reference, sleb_order, taylor_scores)
from bench.models import count_params
from bench.surgery import blocks_view, remove_blocks


def bypass_logits(model, ids, remove):
    """Logits of the full model with blocks `remove` turned into identities (forward hooks)."""
    hooks = [model.model.layers[b].register_forward_hook(lambda mod, args, kwargs, out: args[0] if args
                                                         else kwargs["hidden_states"], with_kwargs=True)
             for b in remove]
    try:
        with torch.no_grad():
            return model(ids, use_cache=False).logits
    finally:
        for h in hooks:
            h.remove()


def test_removal_equals_bypass(tiny, ids):
    model, _, _ = tiny
    remove = [4, 6, 7]
    expected = bypass_logits(model, ids, remove)
    remove_blocks(model, remove)
    with torch.no_grad():
        got = model(ids, use_cache=False).logits
    assert len(model.model.layers) == model.config.num_hidden_layers == 9
    assert [layer.self_attn.layer_idx for layer in model.model.layers] == list(range(9))
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)


def test_generate_with_cache_equals_without(tiny, ids):
    model, _, _ = tiny
    remove_blocks(model, [5, 8])
    kw = dict(max_new_tokens=12, min_new_tokens=12, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        cached = model.generate(ids, use_cache=True, **kw)
        uncached = model.generate(ids, use_cache=False, **kw)
    assert cached.shape == (2, 24 + 12)
    assert torch.equal(cached, uncached)


def test_save_reload_round_trip(tiny, ids, tmp_path):
    model, _, _ = tiny
    remove_blocks(model, [4, 9])
    model.save_pretrained(tmp_path / "pruned")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "pruned", dtype=torch.float32).eval()
    assert reloaded.config.num_hidden_layers == 10
    assert count_params(reloaded) == count_params(model)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, model(ids).logits, atol=1e-6, rtol=0)


def test_layer_types_follow_removed_blocks(tiny):
    model, _, _ = tiny
    model.config.layer_types = [f"kind{i}" for i in range(12)]
    remove_blocks(model, [0, 11])
    assert model.config.layer_types == [f"kind{i}" for i in range(1, 11)]


def test_fast_ppl_criterion_equals_official_loop(tiny, ids):
    model, _, _ = tiny
    calib = torch.randint(0, 256, (3, 32), generator=torch.Generator().manual_seed(1))
    fast = ppl_scores(model, calib, batch_size=2)
    for rebuild in (True, False):
        ref = ppl_scores_reference(model, calib, rebuild=rebuild)
        assert max(abs(a - b) / b for a, b in zip(fast, ref)) < 1e-5
    assert len(fast) == 12 and all(math.isfinite(s) and s > 1 for s in fast)


def test_taylor_equals_direct_gradient_product(tiny, ids):
    model, _, _ = tiny
    got = taylor_scores(model, ids)
    assert all(p.grad is None for p in model.parameters())
    assert all(p.requires_grad for p in model.parameters())  # flags restored
    model.zero_grad()
    model(ids, labels=ids).loss.backward()
    want = [sum((p * p.grad).abs().sum().item() for n, p in layer.named_parameters() if "weight" in n)
            for layer in model.model.layers]
    assert got == pytest.approx(want, rel=1e-5)


def test_magnitude_is_sum_of_abs_weights(tiny):
    model, _, _ = tiny
    want = [sum(p.abs().sum().item() for n, p in layer.named_parameters() if "weight" in n)
            for layer in model.model.layers]
    assert magnitude_scores(model) == pytest.approx(want, rel=1e-6)


def test_scores_identical_for_fixed_seed(tiny, data_root):
    model, tok, _ = tiny
    a, _ = calibration_ids(tok, "bookcorpus", 4, 32, 1234, data_root)
    b, _ = calibration_ids(tok, "bookcorpus", 4, 32, 1234, data_root)
    c, _ = calibration_ids(tok, "bookcorpus", 4, 32, 99, data_root)
    assert a.shape == (4, 32) and a.dtype == torch.long and torch.equal(a, b) and not torch.equal(a, c)
    assert ppl_scores(model, a) == ppl_scores(model, b)
    assert taylor_scores(model, a) == taylor_scores(model, b)


def test_keep_set_respected(tiny):
    model, _, _ = tiny
    budget = resolve_budget(model, 0.5)  # 6 of 12 blocks
    scores = [float(b) for b in range(12)]  # block 0 least important ... block 11 most
    plus = DepthMagnitude(name="depth_x")
    with pytest.raises(BenchError, match="removes 6 of 12 blocks, but only 6 may be removed"):
        plus.check(budget)  # every prunable block: refused
    budget = resolve_budget(model, 0.25)  # 3 blocks
    assert plus.plan(scores, budget).remove == [4, 5, 6]
    raw = DepthMagnitude(name="depth_x", keep_first=0, keep_last=0)
    assert raw.plan(scores, budget).remove == [0, 1, 2]
    assert plus.label == "depth_x+" and raw.label == "depth_x"


def test_build_method_rejects_unknown_parameter(cfg_for):
    cfg = cfg_for("method=depth_ppl", "+method.n_blockz=3")
    with pytest.raises(BenchError, match="method.n_blockz: not a parameter of depth_ppl"):
        build_method(cfg.method)
    with pytest.raises(BenchError, match="method.impl='depth_fisher': allowed values are angular, block_influence"):
        build_method(cfg_for("method=depth_ppl", "method.impl=depth_fisher").method)


def _hidden(model, ids):
    with torch.no_grad():
        return model(ids, output_hidden_states=True, use_cache=False).hidden_states


def test_block_influence_equals_direct_computation(tiny, ids):
    model, _, _ = tiny
    h = [x.double() for x in _hidden(model, ids)]
    direct = []
    for b in range(len(h) - 1):
        cos = (h[b] * h[b + 1]).sum(-1) / (h[b].norm(dim=-1) * h[b + 1].norm(dim=-1))
        direct.append((1 - cos).sum().item())
    assert block_influence_scores(model, ids, batch_size=1) == pytest.approx(direct, rel=1e-4)


@pytest.mark.parametrize("n", [1, 3])
def test_angular_distance_equals_direct_computation(tiny, ids, n):
    model, _, _ = tiny
    last = [x[:, -1].double() for x in _hidden(model, ids)]
    direct = []
    for start in range(len(last) - n):
        a, b = last[start], last[start + n]
        cos = ((a * b).sum(-1) / (a.norm(dim=-1) * b.norm(dim=-1))).clamp(-1, 1)
        direct.append((torch.arccos(cos) / math.pi).mean().item())
    assert angular_distances(model, ids, n) == pytest.approx(direct, abs=1e-5)


def test_angular_plan_removes_the_closest_contiguous_run(tiny, ids):
    model, _, _ = tiny
    m = Angular(name="angular", keep_first=0, keep_last=0)
    budget = resolve_budget(model, 0.25)  # 3 of 12 blocks
    scores = m.score(model, ids, budget)
    plan = m.plan(scores, budget, model)
    start = min(range(len(scores)), key=lambda s: (scores[s], s))
    assert plan.remove == [start, start + 1, start + 2]


def test_sleb_removes_one_block_at_a_time_by_loss(tiny, ids):
    model, _, _ = tiny
    steps = sleb_order(model, ids, 2, candidates=list(range(12)))
    first = ppl_scores_reference(model, ids, rebuild=False)
    assert steps[0]["block"] == min(range(1, 11), key=lambda b: (first[b], b))  # never block 0 or 11
    assert steps[0]["ppl"] == pytest.approx(first[steps[0]["block"]], rel=1e-5)
    rest = [b for b in range(12) if b != steps[0]["block"]]
    with blocks_view(model, rest):
        second = dict(zip(rest, ppl_scores_reference(model, ids, rebuild=False)))
    assert steps[1]["block"] == min(rest[1:-1], key=lambda b: (second[b], b))
    m = SLEB(name="sleb", keep_first=0, keep_last=0)
    budget = resolve_budget(model, 0.2)  # 2 blocks
    plan = m.plan(m.score(model, ids, budget), budget, model)
    assert plan.order[:2] == [s["block"] for s in steps]  # the removal order, one block per step


@pytest.mark.parametrize("method", ["block_influence", "angular", "sleb"])
def test_new_depth_methods_plan_apply_generate(tiny, ids, cfg_for, method):
    model, _, _ = tiny
    m = build_method(cfg_for(f"method={method}").method)
    assert m.label == method  # their own keep-sets, not the paper's "+"
    budget = resolve_budget(model, 0.25)
    plan = m.plan(m.score(model, ids, budget), budget, model)
    m.apply(model, plan)
    assert count_params(model) == plan.predicted_params == budget.target_params
    with torch.no_grad():
        assert torch.isfinite(model(ids, use_cache=False).logits).all()
        out = model.generate(ids[:1, :8], max_new_tokens=4, min_new_tokens=4, do_sample=False, pad_token_id=0)
    assert out.shape == (1, 12)
