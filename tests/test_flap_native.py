"""protocol=native for FLAP and Wanda-sp: FLAP's in-place fluctuation, its AL-AM threshold, the native counts
(FLAP repo lib/layerwrapper.py BiasGPT.add_batch, lib/prune.py prune_flap / prune_wanda_sp)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from bench.budget import is_matched, resolve_budget
from bench.config import compose
from bench.data import calibration_ids
from bench.methods import build_method
from bench.methods.width import FLAP, LayerGeometry, head_units, model_geometry
from bench.methods.width_criteria import _Fluctuation
from bench.models import build_from_config, count_params, hf_config

# Two input channels over three samples of two tokens each; channel 1 is constant, so it never fluctuates.
SAMPLES = torch.tensor([[[1.0, 5.0], [3.0, 5.0]],
                        [[2.0, 5.0], [6.0, 5.0]],
                        [[0.0, 5.0], [4.0, 5.0]]], dtype=torch.float64)  # [sample, token, channel]


def fluctuation(in_place: bool, batches) -> _Fluctuation:
    stat = _Fluctuation(in_place)
    for b in batches:
        stat(None, (SAMPLES[b],))
    return stat


@pytest.mark.parametrize("batches", [[slice(0, 3)], [slice(0, 1), slice(1, 3)]])
def test_native_fluctuation_by_hand(batches):
    """Channel 0, the original's update per sample (n samples seen before it, m its running mean of per-sample
    token means): m <- m n/(n+1) + mean_t(x)/(n+1); F <- 0 on the first sample, else
    F (n-1)/n + sum_t (x - m_new)(x - m_ref)/(n+1), with m_ref = m_new in FLAP (BiasGPT updates the tensor that
    `old_baseline_inp` names in place) and m_ref = m_old in the matched (Welford) form.
        sample 1 [1, 3]: m = 2,            F = 0
        sample 2 [2, 6]: m = 2/2 + 4/2 = 3
            native:  (2-3)^2 + (6-3)^2 = 10,                       F = 0 + 10/2 = 5
            matched: (2-3)(2-2) + (6-3)(6-2) = 12,                 F = 0 + 12/2 = 6
        sample 3 [0, 4]: m = 3 (2/3) + 2/3 = 8/3
            native:  (0-8/3)^2 + (4-8/3)^2 = 80/9,                 F = 5/2 + 80/27 = 295/54
            matched: (0-8/3)(0-3) + (4-8/3)(4-3) = 28/3,           F = 6/2 + 28/9 = 55/9
    The split into forwards does not matter: statistics are updated one sample at a time, as FLAP's batch of 1."""
    native, matched = fluctuation(True, batches), fluctuation(False, batches)
    for stat, expected in ((native, 295 / 54), (matched, 55 / 9)):
        assert stat.n == 3
        torch.testing.assert_close(stat.mean, torch.tensor([8 / 3, 5.0], dtype=torch.float64))
        torch.testing.assert_close(stat.fluc, torch.tensor([expected, 0.0], dtype=torch.float64))


def toy_geometry(n_layers: int = 2) -> list[LayerGeometry]:
    """Layers of 2 heads (multi-head) and 3 channels; a head unit is 4 + 3 = 7 params, a channel 2: weight
    int(7 / 2) = 3 channel-equivalents (FLAP's int64 compression_weight truncates 512/3 the same way)."""
    return [LayerGeometry(n_q=2, n_kv=2, head_dim=1, channels=3, q_params=4, kv_params=3, channel_params=2,
                          hidden=5, o_bias=False, down_bias=False)] * n_layers


TOY_SCORES = {"q": [[0.9, -1.0], [0.4, 0.8]], "kv": [[0.0, 0.0], [0.0, 0.0]],
              "channel": [[1.2, 0.1, -0.5], [-0.2, 0.3, -0.8]],
              "o_mean": [[0.1, 0.2], [0.3, 0.4]], "down_mean": [[0.5, 0.6, 0.7], [0.8, 0.9, 1.1]]}


def al_am(scores: dict, weight: int, p: float) -> list[tuple[list[int], list[int]]]:
    """The rule as FLAP writes it: all head and channel scores concatenated, sorted descending, a head weighing
    `weight`; threshold = sorted[argmin |cumsum(weight) - (1 - p) sum(weight)|]; keep score > threshold. Returns
    the (heads, channels) each layer removes, before the one-unit-per-layer floor."""
    heads, chans = torch.tensor(scores["q"]), torch.tensor(scores["channel"])
    metric = torch.cat([heads.view(-1), chans.view(-1)])
    ranked, order = torch.sort(metric, descending=True)
    w = torch.ones_like(order)
    w[order < heads.numel()] = weight
    threshold = ranked[torch.argmin(torch.abs(torch.cumsum(w, 0) - w.sum() * (1 - p)))]
    return [(torch.where(h <= threshold)[0].tolist(), torch.where(c <= threshold)[0].tolist())
            for h, c in zip(heads, chans)]


def test_native_al_am_threshold_on_synthetic_scores():
    """p = 0.5: total weight 2 x (2 x 3 + 3) = 18, goal 9; descending 1.2 (c, cum 1), 0.9 (h, 4), 0.8 (h, 7),
    0.4 (h, 10), ...: argmin at 0.4 (|10 - 9| = 1), which is removed itself (keep > threshold). Layer 1 loses all
    three channels by the rule, so it keeps its best (0.3): the project's one-unit floor."""
    flap = FLAP(name="flap", protocol="native", bias=True)
    assert al_am(TOY_SCORES, 3, 0.5) == [([1], [1, 2]), ([0], [0, 1, 2])]
    layers, uniform = flap.allocate(toy_geometry(), TOY_SCORES, SimpleNamespace(ratio=0.5), structural=False)
    assert uniform is None
    assert {li: (s["remove_q"], s["remove_channels"]) for li, s in layers.items()} == {
        0: ([1], [1, 2]), 1: ([0], [0, 2])}
    assert layers[0]["remove_kv"] == [1] and layers[1]["remove_kv"] == [0]
    # compensation means of the removed columns, rounded to fp16 as FLAP stores baseline_inp
    half = lambda *v: torch.tensor(v, dtype=torch.float64).half().double().tolist()  # noqa: E731
    assert layers[0]["o_bias_mean"] == half(0.2) and layers[0]["down_bias_mean"] == half(0.6, 0.7)
    assert layers[1]["o_bias_mean"] == half(0.3) and layers[1]["down_bias_mean"] == half(0.8, 1.1)


def test_native_al_am_keeps_one_head_unit_per_layer():
    """p = 0.75: goal 4.5, argmin at 0.9 (cum 4): only channel 1.2 scores above it. The rule empties both layers'
    attention and layer 1's MLP; each keeps its best unit instead (a departure the record lists)."""
    assert al_am(TOY_SCORES, 3, 0.75) == [([0, 1], [1, 2]), ([0, 1], [0, 1, 2])]
    flap = FLAP(name="flap", protocol="native", bias=False)
    layers, _ = flap.allocate(toy_geometry(), TOY_SCORES, SimpleNamespace(ratio=0.75), structural=False)
    assert {li: (s["remove_q"], s["remove_channels"]) for li, s in layers.items()} == {
        0: ([1], [1, 2]), 1: ([0], [0, 2])}
    assert any("keeps its best head unit" in d for d in flap.departures())


@pytest.fixture(scope="module")
def llama7b():
    return build_from_config(hf_config(compose(["model=llama-7b", "protocol=native"]).model))


def plan_for(model, method: str, protocol: str, ratio: float):
    m = build_method(compose([f"method={method}"]).method, protocol)
    budget = resolve_budget(model, ratio)
    m.check(budget, model)
    return m, budget, m.plan(None, budget, model)


@pytest.mark.parametrize("method", ["wanda_sp", "flap"])
def test_native_counts_on_llama7b(llama7b, method):
    """Wanda-sp's rule (and FLAP's structure-only plan, its UL-UM) at p = 0.2: int(0.2 x 32) = 6 heads and
    int(0.2 x 11008) = 2,201 channels per layer, a head 4 x 4096 x 128 params, a channel 3 x 4096:
    6,738,415,616 - 32 (6 x 2,097,152 + 2,201 x 12,288) = 5,470,294,016, not within 0.5% of depth's
    5,524,115,456, which the plan keeps as its target and reports honestly."""
    m, budget, plan = plan_for(llama7b, method, "native", 0.2)
    expected = 6_738_415_616 - 32 * (6 * 4 * 4096 * 128 + 2201 * 3 * 4096)
    assert expected == 5_470_294_016 and plan.predicted_params == expected
    assert plan.target_params == budget.target_params == 5_524_115_456
    assert plan.gap_params == expected - 5_524_115_456 and plan.budget_matched is False
    assert plan.uniform["head_units"] == 6 and plan.uniform["channels"] == 2201
    assert all(len(s["remove_q"]) == 6 and len(s["remove_channels"]) == 2201 for s in plan.layers.values())
    assert len(plan.layers) == 32 and m.departures()
    _, _, matched = plan_for(llama7b, method, "matched", 0.2)  # today's behaviour: matched to depth
    assert matched.budget_matched and matched.predicted_params != expected


def test_native_flap_through_apply(tiny, cfg_for, data_root, ids):
    """A native FLAP plan on real scores: physical removal reaches the predicted count, generation works with and
    without the cache, and the in-place fluctuation is what it scored (a cache key of its own)."""
    model, tok, _ = tiny
    cfg = cfg_for("method=flap", "protocol=native")
    m = build_method(cfg.method, cfg.protocol)
    matched = build_method(cfg.method, "matched")
    budget = resolve_budget(model, 0.25)
    m.check(budget, model)
    assert m.score_key(budget, model) != matched.score_key(budget, model)
    calib, _ = calibration_ids(tok, "bookcorpus", 6, 32, 0, data_root)
    scores = m.score(model, calib, budget)
    assert scores["q"] != matched.score(model, calib, budget)["q"]
    plan = m.plan(scores, budget, model)
    assert plan.layers and plan.uniform is None and plan.target_params == budget.target_params
    assert plan.budget_matched == is_matched(budget, plan.predicted_params, plan.target_params)
    geo = model_geometry(model)  # not matched: the removed weighted mass is p of the total, within a unit or two
    weight = int(head_units(geo[0], "kv_groups")[1] / geo[0].channel_params)
    total = len(geo) * (geo[0].n_kv * weight + geo[0].channels)
    removed = sum(len(s["remove_kv"]) * weight + len(s["remove_channels"]) for s in plan.layers.values())
    assert abs(removed - 0.25 * total) <= 2 * weight
    g = geo[0]
    assert any("grouped-query" in d for d in m.departures()) == (g.n_q != g.n_kv)
    m.apply(model, plan)
    assert count_params(model) == plan.predicted_params
    kw = dict(max_new_tokens=8, min_new_tokens=8, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        assert torch.equal(model.generate(ids, use_cache=True, **kw), model.generate(ids, use_cache=False, **kw))
