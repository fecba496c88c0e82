"""More architectures on tiny random shapes: Qwen2 (q/k/v biases), Qwen3 (per-head q/k norms), Mistral (sliding
window), Phi-3 (fused qkv_proj / gate_up_proj: depth only). Depth and width surgery keep each one a consistent
model (cached generation = uncached; a width-pruned model = the dense one with those units masked), unknown
layouts are refused in one line, and the 7B configs give the hub models' exact parameter counts."""

from __future__ import annotations

import copy
from types import SimpleNamespace

import pytest
import torch

from bench import BenchError
from bench.budget import _main as budget_main
from bench.budget import resolve_budget
from bench.config import compose
from bench.methods import build_method
from bench.methods.slicegpt import pca_rotations, slice_dims
from bench.models import (DEPTH_LAYOUT, SLICE_LAYOUT, WIDTH_LAYOUT, build_from_config, check_layout, count_params,
                          decoder_layers, hf_config, load_model)
from bench.surgery import apply_slice_plan, head_rows, load_pruned, remove_blocks

ARCHS = ["tiny-qwen2", "tiny-qwen3", "tiny-mistral", "tiny-phi3"]
PAD = 257


def load(cfg_for, name):
    cfg = cfg_for(f"model={name}")
    model, _ = load_model(cfg.model, cfg.cache_dir, "cpu", "float32")
    if name == "tiny-qwen2":  # HF initialises biases to zero: make them matter, so a misaligned slice shows
        g = torch.Generator().manual_seed(1)
        with torch.no_grad():
            for layer in decoder_layers(model):
                for lin in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                    lin.bias.copy_(torch.randn(lin.bias.shape, generator=g))
    return model


@torch.no_grad()
def assert_cache_consistent(model, prompt, new=8):
    """Greedy generation with the KV cache gives the same tokens and step logits as recomputing every step."""
    kw = dict(max_new_tokens=new, min_new_tokens=new, do_sample=False, pad_token_id=PAD, output_logits=True,
              return_dict_in_generate=True)
    cached, plain = model.generate(prompt, use_cache=True, **kw), model.generate(prompt, use_cache=False, **kw)
    assert torch.equal(cached.sequences, plain.sequences)
    torch.testing.assert_close(torch.stack(cached.logits), torch.stack(plain.logits), atol=1e-4, rtol=0)


@pytest.mark.parametrize("name", ARCHS)
def test_depth_removal_equals_bypass_and_caches(cfg_for, ids, name):
    model = load(cfg_for, name)
    assert len(decoder_layers(model)) == 12 and model.config.model_type == name.removeprefix("tiny-")
    remove = [3, 5, 8]
    hooks = [decoder_layers(model)[b].register_forward_hook(
        lambda mod, args, kwargs, out: args[0] if args else kwargs["hidden_states"], with_kwargs=True) for b in remove]
    with torch.no_grad():
        expected = model(ids, use_cache=False).logits
    for h in hooks:
        h.remove()
    remove_blocks(model, remove)
    assert model.config.num_hidden_layers == 9
    with torch.no_grad():
        torch.testing.assert_close(model(ids, use_cache=False).logits, expected, atol=1e-5, rtol=0)
    assert_cache_consistent(model, ids[:1, :12])  # 12 + 8 tokens: past tiny-mistral's 8-token window


def test_mistral_window_is_in_force(cfg_for, ids):
    """The cache test above crosses a window that really restricts attention."""
    model = load(cfg_for, "tiny-mistral")
    with torch.no_grad():
        windowed = model(ids, use_cache=False).logits
        model.config.sliding_window = None
        full = model(ids, use_cache=False).logits
    assert torch.allclose(windowed[:, :8], full[:, :8], atol=1e-5) and not torch.allclose(windowed, full, atol=1e-3)


@pytest.mark.parametrize("name, method", [("tiny-qwen2", "depth_taylor"), ("tiny-qwen3", "depth_magnitude"),
                                          ("tiny-mistral", "depth_ppl"), ("tiny-phi3", "depth_ppl"),
                                          ("tiny-phi3", "depth_taylor")])
def test_depth_method_runs(cfg_for, ids, name, method):
    model = load(cfg_for, name)
    m = build_method(cfg_for(f"model={name}", f"method={method}").method)
    check_layout(model, m.layout, f"method={method}")
    budget = resolve_budget(model, 0.25)
    m.check(budget, model)
    calib = torch.randint(0, 256, (4, 32), generator=torch.Generator().manual_seed(2))
    m.apply(model, m.plan(m.score(model, calib, budget), budget, model))
    assert len(decoder_layers(model)) == 9 and count_params(model) == budget.target_params
    assert_cache_consistent(model, ids[:1, :12], new=4)


def masked_reference(model, layers):
    """The dense model with a width plan's units masked: o_proj columns of removed query heads and down_proj
    columns of removed channels zeroed. Whatever the removed heads' q/k/v rows and biases held then no longer
    reaches the output, so the pruned model must match it exactly, and only if every kept head keeps its own
    rows, biases and key/value head."""
    ref = copy.deepcopy(model)
    with torch.no_grad():
        for key, spec in layers.items():
            layer = decoder_layers(ref)[int(key)]
            layer.self_attn.o_proj.weight[:, head_rows(spec["remove_q"], layer.self_attn.head_dim)] = 0
            layer.mlp.down_proj.weight[:, spec["remove_channels"]] = 0
    return ref


@pytest.mark.parametrize("name, method, head_mode", [("tiny-qwen2", "magnitude_width", "kv_groups"),
                                                     ("tiny-qwen2", "llm_pruner", "q_heads"),
                                                     ("tiny-qwen3", "wanda_sp", "q_heads"),
                                                     ("tiny-qwen3", "magnitude_width", "kv_groups"),
                                                     ("tiny-mistral", "llm_pruner", "auto")])
def test_width_pruned_equals_masked_dense(cfg_for, ids, tmp_path, name, method, head_mode):
    model = load(cfg_for, name)
    dense = copy.deepcopy(model)
    m = build_method(cfg_for(f"model={name}", f"method={method}", f"method.head_mode={head_mode}").method)
    check_layout(model, m.layout, f"method={method}")
    budget = resolve_budget(model, 0.25)
    m.check(budget, model)
    calib = torch.randint(0, 256, (4, 32), generator=torch.Generator().manual_seed(2))
    plan = m.plan(m.score(model, calib, budget), budget, model)
    assert plan.layers and any(spec["remove_q"] for spec in plan.layers.values())
    ref = masked_reference(model, plan.layers)
    m.apply(model, plan)
    assert count_params(model) == plan.predicted_params
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, ref(ids).logits, atol=1e-4, rtol=0)
    for key, spec in plan.layers.items():
        attn, before = decoder_layers(model)[int(key)].self_attn, decoder_layers(dense)[int(key)].self_attn
        d = attn.head_dim
        n_q, n_kv = before.q_proj.out_features // d, before.k_proj.out_features // d
        rows_q = head_rows([q for q in range(n_q) if q not in spec["remove_q"]], d)
        rows_kv = head_rows([k for k in range(n_kv) if k not in spec["remove_kv"]], d)
        for lin, old, rows in ((attn.q_proj, before.q_proj, rows_q), (attn.k_proj, before.k_proj, rows_kv),
                               (attn.v_proj, before.v_proj, rows_kv)):
            assert torch.equal(lin.weight, old.weight[rows])
            assert (lin.bias is None) == (old.bias is None)
            assert lin.bias is None or torch.equal(lin.bias, old.bias[rows])  # Qwen2: bias rows follow their heads
        if name == "tiny-qwen3":  # q_norm / k_norm act on head_dim, shared by all heads: nothing to slice
            assert attn.q_norm.weight.shape == attn.k_norm.weight.shape == (d,)
    assert_cache_consistent(model, ids[:1, :12])
    model.save_pretrained(tmp_path / "pruned")  # the biases' sizes survive a reload
    with torch.no_grad():
        torch.testing.assert_close(load_pruned(tmp_path / "pruned")(ids).logits, model(ids).logits, atol=1e-5, rtol=0)


@pytest.mark.parametrize("name", ["tiny-qwen2", "tiny-qwen3", "tiny-mistral"])
def test_unsliced_rotation_keeps_logits(cfg_for, ids, name):
    """SliceGPT's rotation with d = h is exact: q/k/v biases (Qwen2) are outputs, untouched by a rotation of the
    residual stream, and q/k norms (Qwen3) act after q/k_proj."""
    model = load(cfg_for, name)
    h = model.config.hidden_size
    dims = slice_dims(model, h)
    calib = torch.randint(0, 256, (8, 32), generator=torch.Generator().manual_seed(3))
    rotations = pca_rotations(model, calib, dims)["rotations"]
    assert not torch.allclose(rotations["embed"], torch.eye(h))
    rotated = apply_slice_plan(copy.deepcopy(model), SimpleNamespace(dims=dims, rotations=rotations, hidden=None))
    with torch.no_grad():
        assert (model(ids).logits - rotated(ids).logits).abs().max().item() < 1e-4


def test_slicegpt_runs_on_qwen2(cfg_for, ids):
    model = load(cfg_for, "tiny-qwen2")
    m = build_method({"impl": "slicegpt", "name": "slicegpt", "batch_size": 4})
    check_layout(model, m.layout, "method=slicegpt")
    budget = resolve_budget(model, 0.25)
    m.check(budget, model)
    calib = torch.randint(0, 256, (8, 32), generator=torch.Generator().manual_seed(3))
    plan = m.plan(m.score(model, calib, budget), budget, model)
    m.apply(model, plan)
    assert count_params(model) == plan.predicted_params and plan.hidden < model.config.hidden_size
    assert decoder_layers(model)[0].self_attn.q_proj.bias is not None
    assert_cache_consistent(model, ids[:1, :12], new=4)


PHI3_REFUSAL = ("phi3 blocks have no self_attn.q_proj (they fuse it into self_attn.qkv_proj); "
                "allowed: depth methods")


@pytest.mark.parametrize("method", ["llm_pruner", "wanda_sp", "flap", "magnitude_width", "slicegpt"])
def test_phi3_refuses_width_methods_in_one_line(cfg_for, method):
    model = load(cfg_for, "tiny-phi3")
    m = build_method(cfg_for("model=tiny-phi3", f"method={method}").method)
    with pytest.raises(BenchError) as err:
        check_layout(model, m.layout, f"method={method}")
    assert str(err.value) == f"method={method}: {PHI3_REFUSAL}"
    for layout in (WIDTH_LAYOUT, SLICE_LAYOUT):
        with pytest.raises(BenchError, match="fuse it into self_attn.qkv_proj"):
            check_layout(model, layout, f"method={method}")
    check_layout(model, DEPTH_LAYOUT, "method=depth_ppl")


def test_phi3_width_check_refuses_before_scoring(cfg_for):
    model = load(cfg_for, "tiny-phi3")
    m = build_method(cfg_for("model=tiny-phi3", "method=llm_pruner").method)
    with pytest.raises(BenchError, match="no self_attn.q_proj") as err:
        m.check(resolve_budget(model, 0.25), model)
    assert "\n" not in str(err.value)


def test_unknown_layouts_are_one_line_errors(cfg_for):
    from transformers import AutoConfig

    gpt2 = build_from_config(AutoConfig.for_model("gpt2", n_layer=2, n_embd=32, n_head=2, vocab_size=258,
                                                  n_positions=64, bos_token_id=256, eos_token_id=257), device="cpu")
    for call in (lambda: decoder_layers(gpt2), lambda: resolve_budget(gpt2, 0.2)):
        with pytest.raises(BenchError, match=r"^gpt2 models have no model.model.layers \(its blocks are "
                                             r"model.transformer.h\)") as err:
            call()
        assert "\n" not in str(err.value)
    with pytest.raises(BenchError, match=r"^method=flap: gpt2 .*; allowed: none"):
        check_layout(gpt2, WIDTH_LAYOUT, "method=flap")
    llama = load(cfg_for, "tiny-qwen2")
    del decoder_layers(llama)[7].mlp.gate_proj
    with pytest.raises(BenchError) as err:
        check_layout(llama, WIDTH_LAYOUT, "method=wanda_sp")
    assert str(err.value) == ("method=wanda_sp: qwen2 block 7 has no mlp.gate_proj (mlp has up_proj, down_proj, "
                              "act_fn); allowed: depth methods")


@pytest.mark.parametrize("name, dense, per_block", [("qwen2.5-7b", 7_615_616_512, 233_057_792),
                                                    ("mistral-7b", 7_241_732_096, 218_112_000)])
def test_7b_budgets_from_config(capsys, name, dense, per_block):
    budget_main([f"model={name}", "ratio=0.2"])
    out = capsys.readouterr().out
    assert f"dense_params               {dense}" in out and f"params_per_block           {per_block}" in out
    model = build_from_config(hf_config(compose([f"model={name}"]).model))
    attn = decoder_layers(model)[0].self_attn
    assert (attn.q_proj.bias is not None, attn.o_proj.bias is not None) == (name == "qwen2.5-7b", False)
    assert attn.k_proj.out_features == (512 if name == "qwen2.5-7b" else 1024)
    assert model.lm_head.weight is not model.model.embed_tokens.weight
    check_layout(model, SLICE_LAYOUT, f"model={name}")
