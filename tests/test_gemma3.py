"""A second architecture: Gemma 3 (one key/value head, sliding-window layers) on a tiny random shape."""

from __future__ import annotations

import json

import pytest
import torch

from bench import BenchError
from bench.budget import resolve_budget
from bench.methods import build_method
from bench.models import count_params, load_model
from bench.runner import run_cell
from bench.surgery import remove_blocks


@pytest.fixture()
def gemma(cfg_for):
    cfg = cfg_for("model=tiny-gemma3")
    model, _ = load_model(cfg.model, cfg.cache_dir, "cpu", "float32")
    return model, cfg


def test_depth_removal_slices_layer_types_and_equals_bypass(gemma, ids):
    model, _ = gemma
    remove = [3, 5, 8]  # two sliding layers and the full-attention layer 5
    hooks = [model.model.layers[b].register_forward_hook(lambda mod, args, kwargs, out: args[0] if args
                                                         else kwargs["hidden_states"], with_kwargs=True)
             for b in remove]
    with torch.no_grad():
        expected = model(ids, use_cache=False).logits
    for h in hooks:
        h.remove()
    types = model.config.layer_types
    remove_blocks(model, remove)
    assert model.config.layer_types == [t for i, t in enumerate(types) if i not in remove]
    with torch.no_grad():
        assert torch.allclose(model(ids, use_cache=False).logits, expected, atol=1e-5)
        cached = model.generate(ids[:1], max_new_tokens=6, min_new_tokens=6, do_sample=False, pad_token_id=0)
        plain = model.generate(ids[:1], max_new_tokens=6, min_new_tokens=6, do_sample=False, pad_token_id=0,
                               use_cache=False)
    assert torch.equal(cached, plain)


@pytest.mark.parametrize("method", ["llm_pruner", "flap", "wanda_sp"])
def test_kv_group_removal_refuses_a_single_kv_head(gemma, cfg_for, method):
    model, _ = gemma
    m = build_method(cfg_for(f"method={method}", "method.head_mode=kv_groups").method)
    with pytest.raises(BenchError, match="single key/value head per layer.*allowed values for it are"):
        m.check(resolve_budget(model, 0.2), model)


@pytest.mark.parametrize("method, head_mode", [("llm_pruner", "q_heads"), ("wanda_sp", "q_heads"),
                                               ("llm_pruner", "auto")])
def test_query_head_pruning_runs_on_a_single_kv_head(gemma, cfg_for, ids, method, head_mode):
    model, cfg = gemma
    m = build_method(cfg_for(f"method={method}", f"method.head_mode={head_mode}", "method.calib.n_samples=4").method)
    budget = resolve_budget(model, 0.2)
    m.check(budget, model)
    plan = m.plan(m.score(model, ids, budget), budget, model)
    m.apply(model, plan)
    assert count_params(model) == plan.predicted_params and plan.budget_matched
    assert plan.head_mode == "q_heads"  # auto: a single key/value head leaves only query heads to remove
    assert all(layer.self_attn.k_proj.out_features == 16 for layer in model.model.layers)  # the KV head stays
    with torch.no_grad():
        assert torch.isfinite(model(ids, use_cache=False).logits).all()
        out = model.generate(ids[:1, :8], max_new_tokens=4, min_new_tokens=4, do_sample=False, pad_token_id=0)
    assert out.shape == (1, 12)


def test_depth_cell_measures_perplexity_with_a_bos_on_every_window(cfg_for):
    out = run_cell(cfg_for("model=tiny-gemma3", "method=block_influence", "ratio=0.25", "eval.ppl.max_windows=1",
                           "eval.ppl.bos_modes=[once]"))
    rows = [r for r in map(json.loads, (out / "records.jsonl").read_text().splitlines()) if r["stage"] != "memory"]
    assert {(r["task"], r["metric"]) for r in rows} == {("wikitext2", "ppl"), ("wikitext2", "ppl_bos"),
                                                        ("ptb", "ppl"), ("ptb", "ppl_bos")}
    assert rows[0]["params"] == json.loads((out / "plan.json").read_text())["predicted_params"]
