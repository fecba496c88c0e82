"""GGUF export (bench/export.py): the architecture decision, the refusals, and the round trip through transformers'
GGUF loader. Needs only the gguf library; tests/test_llamacpp.py loads the same kinds of files in llama.cpp.

    .venv/bin/python -m pytest -q tests/test_export.py
"""

from __future__ import annotations

import sys

import gguf
import pytest
import torch

from bench import BenchError
from bench.budget import resolve_budget
from bench.data import calibration_ids
from bench.evals import llamacpp
from bench.export import export_gguf, gguf_types, layout, main, permute_rotary
from bench.methods import build_method
from bench.models import load_model
from bench.runner import cell_dir, run_cell
from bench.schema import validate
from bench.surgery import remove_blocks


def width_pruned(model, tok, cfg_for, data_root, method: str, ratio: float = 0.25):
    """`model` pruned in place by a width method's scored plan (calibration from the test data root)."""
    m = build_method(cfg_for(f"method={method}").method)
    budget = resolve_budget(model, ratio)
    calib = calibration_ids(tok, "bookcorpus", 6, 32, 0, data_root)[0] if m.needs_calib else None
    m.apply(model, m.plan(m.score(model, calib, budget), budget, model))
    return model


def gguf_field(path, key):
    return gguf.GGUFReader(str(path)).fields[key].contents()


def reloaded(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32).eval()


def max_rel_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


@torch.no_grad()
def test_depth_pruned_f32_round_trip(tiny, ids, tmp_path):
    model, tok, _ = tiny
    remove_blocks(model, [3, 7])
    path = tmp_path / "model.f32.gguf"
    lay = export_gguf(model, path, "f32", tokenizer=tok)
    assert (lay.arch, lay.n_layers, lay.transformers) == ("llama", 10, True)
    assert gguf_field(path, "general.architecture") == "llama"
    assert gguf_field(path, "llama.block_count") == 10
    assert gguf_field(path, "llama.attention.head_count_kv") == model.config.num_key_value_heads
    assert ("output.weight" in {t.name for t in gguf.GGUFReader(str(path)).tensors}) is not lay.tied
    back = reloaded(path)
    assert max_rel_diff(back(ids).logits, model(ids).logits) < 1e-6
    kw = dict(max_new_tokens=32, min_new_tokens=32, do_sample=False, pad_token_id=0)
    assert torch.equal(back.generate(ids, **kw), model.generate(ids, **kw))


@torch.no_grad()
def test_f16_export_keeps_norms_f32(tiny, ids, tmp_path):
    model, tok, _ = tiny
    path = tmp_path / "model.f16.gguf"
    export_gguf(model, path, "f16", tokenizer=tok)
    types = {t.name: t.tensor_type.name for t in gguf.GGUFReader(str(path)).tensors}
    assert types["blk.0.attn_q.weight"] == "F16" and types["blk.0.attn_norm.weight"] == "F32"
    assert gguf_types(path) == {"f16": sum(t == "F16" for t in types.values()),
                                "f32": sum(t == "F32" for t in types.values())}
    assert max_rel_diff(reloaded(path)(ids).logits, model(ids).logits) < 1e-2


@torch.no_grad()
def test_rotary_permutation_is_per_head_pairs():
    """HF keeps a head's rotary halves apart (rows 0..d/2-1 rotate with d/2..d-1); llama.cpp wants them as
    consecutive pairs: row 2i is HF row i, row 2i + 1 is HF row i + d/2, head by head."""
    d, heads = 8, 3
    w = torch.arange(heads * d, dtype=torch.float32)[:, None].repeat(1, 2).numpy()
    out = permute_rotary(w, heads)[:, 0]
    expected = [h * d + i + half * d // 2 for h in range(heads) for i in range(d // 2) for half in (0, 1)]
    assert out.tolist() == expected


@torch.no_grad()
def test_uniform_width_is_llama(cfg_for, data_root, ids, tmp_path):
    cfg = cfg_for("model=tiny-llama-gqa")
    model, tok = load_model(cfg.model, cfg.cache_dir, "cpu", "float32")
    width_pruned(model, tok, cfg_for, data_root, "wanda_sp")
    path = tmp_path / "wanda.gguf"
    lay = export_gguf(model, path, "f32", tokenizer=tok)
    assert lay.arch == "llama" and lay.uniform and lay.transformers
    assert gguf_field(path, "llama.feed_forward_length") == lay.ffn[0] < 192
    assert max_rel_diff(reloaded(path)(ids).logits, model(ids).logits) < 1e-6


def test_uniform_width_transformers_refuses_is_still_llama(cfg_for, data_root, tmp_path):
    """Wanda-sp on tiny-llama keeps 3 of 4 heads of 16 on a 64-wide stream: llama.cpp's llama arch holds it (the
    head size is written, not derived as 64 / 3), transformers' config class refuses it."""
    cfg = cfg_for("model=tiny-llama")
    model, tok = load_model(cfg.model, cfg.cache_dir, "cpu", "float32")
    width_pruned(model, tok, cfg_for, data_root, "wanda_sp")
    path = tmp_path / "wanda.gguf"
    lay = export_gguf(model, path, "f32", tokenizer=tok)
    assert lay.arch == "llama" and lay.uniform and not lay.transformers
    assert (gguf_field(path, "llama.attention.head_count"), gguf_field(path, "llama.attention.key_length")) == (3, 16)
    with pytest.raises(Exception, match="validat"):
        reloaded(path)


@pytest.mark.parametrize("method", ["llm_pruner", "flap"])
def test_per_layer_width_is_deci(tiny, cfg_for, data_root, tmp_path, method):
    model, tok, _ = tiny
    width_pruned(model, tok, cfg_for, data_root, method)
    path = tmp_path / f"{method}.gguf"
    lay = export_gguf(model, path, "f16", tokenizer=tok)
    assert lay.arch == "deci" and not lay.uniform and not lay.transformers
    assert gguf_field(path, "deci.attention.head_count") == list(lay.heads)
    assert gguf_field(path, "deci.attention.head_count_kv") == list(lay.kv_heads)
    assert gguf_field(path, "deci.feed_forward_length") == list(lay.ffn)
    names = {t.name: t for t in gguf.GGUFReader(str(path)).tensors}
    for i, layer in enumerate(model.model.layers):
        assert tuple(names[f"blk.{i}.ffn_down.weight"].shape) == (layer.mlp.down_proj.in_features, lay.hidden)
        assert (f"blk.{i}.ffn_down.bias" in names) == (layer.mlp.down_proj.bias is not None)
    if method == "flap":
        assert any(lay.down_bias) and names[f"blk.{lay.down_bias.index(True)}.ffn_down.bias"].tensor_type.name == "F32"


def test_refusals(tiny, cfg_for, tmp_path):
    model, tok, _ = tiny
    with pytest.raises(BenchError, match="quant='q3_k': allowed values are f32, f16, q8_0, q4_k_m"):
        export_gguf(model, tmp_path / "x.gguf", "q3_k", tokenizer=tok)
    with pytest.raises(BenchError, match="no tokenizer"):
        export_gguf(model, tmp_path / "x.gguf", "f16")
    model.model.layers[2].self_attn.q_proj.bias = torch.nn.Parameter(torch.zeros(model.model.layers[2].self_attn
                                                                                 .q_proj.out_features))
    with pytest.raises(BenchError, match="block 2 has a q_proj bias"):
        layout(model)
    qwen = load_model(cfg_for("model=tiny-qwen2").model, tmp_path, "cpu", "float32")[0]
    with pytest.raises(BenchError, match="model_type='qwen2'.*allowed: llama"):
        layout(qwen)
    assert not (tmp_path / "x.gguf").exists()


def test_slicegpt_refused(tiny):
    model, tok, _ = tiny
    method = build_method({"impl": "slicegpt", "name": "slicegpt", "batch_size": 4})
    budget = resolve_budget(model, 0.2)
    method.apply(model, method.plan(None, budget, model))
    with pytest.raises(BenchError, match="^export: slicegpt: .*shortcut matrices.*no llama.cpp architecture"):
        layout(model)


def test_cell_save_model_gguf_and_the_command(cfg_for, tmp_path, capsys):
    """save_model=gguf writes <cell>/model.f16.gguf; `python -m bench.export <cell>` rebuilds the pruned model from
    the base and plan.json (no model/ saved) and writes the quant asked for."""
    cfg = cfg_for("model=tiny-llama-gqa", "method=depth_magnitude", "ratio=0.25", "eval.stages=[]",
                  "save_model=gguf")
    cell = run_cell(cfg)
    assert cell == cell_dir(cfg, "depth_magnitude+", 0.25)
    f16 = reloaded(cell / "model.f16.gguf")
    assert f16.config.num_hidden_layers == 9 and not (cell / "model").exists()
    main([str(cell), "--quant", "f32"])
    assert "arch llama (9 blocks" in capsys.readouterr().out
    f32 = reloaded(cell / "model.f32.gguf")
    ids = torch.tensor([[256, 10, 20, 30, 40]])
    with torch.no_grad():
        assert max_rel_diff(f16(ids).logits, f32(ids).logits) < 1e-2


def test_save_model_schema(cfg_for):
    validate(cfg_for("save_model=gguf"))
    with pytest.raises(BenchError, match="save_model='yes': must be true or false or 'gguf'"):
        validate(cfg_for("save_model=yes"))


def test_missing_llamacpp_is_one_line(tiny, tmp_path, monkeypatch, cfg_for):
    """Without llama-cpp-python, a quantized export and the llamacpp runtime stop with one line naming the make
    target (f16 / f32 need only the gguf library)."""
    model, tok, _ = tiny
    monkeypatch.setitem(sys.modules, "llama_cpp", None)  # import llama_cpp raises ImportError
    monkeypatch.setattr(llamacpp, "_LIB", {})
    assert not llamacpp.available()
    with pytest.raises(BenchError, match=r"^eval.speed.runtimes=llamacpp: .*make setup-llamacpp") as err:
        export_gguf(model, tmp_path / "m.q8_0.gguf", "q8_0", tokenizer=tok)
    assert "\n" not in str(err.value)
    export_gguf(model, tmp_path / "m.f16.gguf", "f16", tokenizer=tok)
    cfg = cfg_for("model=tiny-llama", "method=depth_magnitude", "ratio=0.25", "eval.stages=[speed]",
                  "eval.speed.runtimes=[llamacpp]")
    with pytest.raises(BenchError, match="make setup-llamacpp"):
        run_cell(cfg)


def test_quants_key_checked():
    from omegaconf import OmegaConf

    assert llamacpp.quants(OmegaConf.create({})) == ["f16", "q4_k_m"]
    with pytest.raises(BenchError, match=r"eval.speed.quants=\['f16', 'q2'\]: allowed values are f32, f16, q8_0"):
        llamacpp.quants(OmegaConf.create({"quants": ["f16", "q2"]}))
