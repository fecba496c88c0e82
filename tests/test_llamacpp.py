"""llama.cpp (llama-cpp-python): the exported GGUF files load and compute what the PyTorch model computes, the
architectures llama.cpp offers hold what bench.export says they hold, llama.cpp's quantizer runs, and the llamacpp
speed runtime writes its records. Skipped without llama-cpp-python (make test); make test-llamacpp builds it.

    make test-llamacpp
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed (make test-llamacpp)")

from bench import BenchError  # noqa: E402
from bench import export  # noqa: E402
from bench.evals import llamacpp  # noqa: E402
from bench.evals.llamacpp import LlamaCpp  # noqa: E402
from bench.export import export_gguf, gguf_types  # noqa: E402
from bench.models import load_model  # noqa: E402
from bench.records import load_records  # noqa: E402
from bench.report import main_table  # noqa: E402
from bench.runner import run_cell  # noqa: E402
from bench.surgery import remove_blocks  # noqa: E402
from test_export import max_rel_diff, width_pruned  # noqa: E402

PROMPT = [256, 84, 104, 101, 32, 76, 101, 97, 110, 105, 110, 103]  # <s> + bytes of "The Leaning"


@torch.no_grad()
def same_as_torch(model, path, greedy_tokens: int = 32) -> None:
    """llama.cpp's next-token logits on PROMPT within 1e-3 of max |logit| of the PyTorch model's, and the same
    greedy tokens."""
    x = torch.tensor([PROMPT])
    ref = model(x).logits[0]
    want = model.generate(x, attention_mask=torch.ones_like(x), do_sample=False, max_new_tokens=greedy_tokens,
                          min_new_tokens=greedy_tokens, pad_token_id=0)[0, len(PROMPT):].tolist()
    with LlamaCpp(path, n_ctx_seq=len(PROMPT) + greedy_tokens, exact=True) as lm:
        assert max_rel_diff(torch.from_numpy(lm.logits(PROMPT)), ref) < 1e-3
        assert lm.greedy(PROMPT, greedy_tokens) == want


def test_depth_pruned_in_llamacpp(tiny, tmp_path):
    model, tok, _ = tiny
    remove_blocks(model, [0, 5, 11])
    path = tmp_path / "depth.f32.gguf"
    assert export_gguf(model, path, "f32", tokenizer=tok).arch == "llama"
    same_as_torch(model, path)


@pytest.mark.parametrize("method, arch", [("wanda_sp", "llama"), ("llm_pruner", "deci"), ("flap", "deci")])
def test_width_pruned_in_llamacpp(tiny, cfg_for, data_root, tmp_path, method, arch):
    """Uniform widths in llama, per-layer heads / FFN widths and FLAP's biases in deci."""
    model, tok, _ = tiny
    width_pruned(model, tok, cfg_for, data_root, method)
    path = tmp_path / f"{method}.f32.gguf"
    assert export_gguf(model, path, "f32", tokenizer=tok).arch == arch
    same_as_torch(model, path)


def test_llama_arch_cannot_hold_per_layer_sizes(cfg_for, data_root, tmp_path, monkeypatch):
    """llama.cpp's llama arch reads per-layer head_count / feed_forward_length arrays but builds every layer
    with layer 0's sizes, so the same file labelled llama does not load; as deci it does."""
    cfg = cfg_for("model=tiny-llama-gqa")
    model, tok = load_model(cfg.model, cfg.cache_dir, "cpu", "float32")
    width_pruned(model, tok, cfg_for, data_root, "llm_pruner")
    decided = export.layout(model)
    assert decided.arch == "deci"
    monkeypatch.setattr(export, "layout", lambda m: dataclasses.replace(decided, arch="llama"))
    path = tmp_path / "as-llama.gguf"
    export_gguf(model, path, "f32", tokenizer=tok)
    with pytest.raises(BenchError, match="llama.cpp cannot load"):
        LlamaCpp(path)


@torch.no_grad()
def test_f16_and_quantized(cfg_for, tmp_path):
    """f16: the greedy tokens of the f32 export; q8_0 / q4_k_m through llama.cpp's quantizer: smaller files with
    the types llama.cpp chose (q4_K needs rows of 256: these 96-wide rows fall back to q5_0), still decoding."""
    cfg = cfg_for("model=tiny-llama-gqa")
    model, tok = load_model(cfg.model, cfg.cache_dir, "cpu", "float32")
    sizes = {}
    for quant in ("f32", "f16", "q8_0", "q4_k_m"):
        path = tmp_path / f"m.{quant}.gguf"
        export_gguf(model, path, quant, tokenizer=tok)
        sizes[quant] = path.stat().st_size
        with LlamaCpp(path, n_ctx_seq=64, exact=True) as lm:
            logits = torch.from_numpy(lm.logits(PROMPT))
            tokens = lm.greedy(PROMPT, 16)
        if quant == "f32":
            ref_logits, ref_tokens = logits, tokens
        elif quant == "f16":
            assert max_rel_diff(logits, ref_logits) < 1e-2 and tokens == ref_tokens
        else:
            assert max_rel_diff(logits, ref_logits) < 0.25 and len(tokens) == 16
        assert not list(tmp_path.glob(".*"))  # the f32 source of a quantization is gone
    assert sizes["f32"] > sizes["f16"] > sizes["q8_0"] > sizes["q4_k_m"]
    assert set(gguf_types(tmp_path / "m.q8_0.gguf")) == {"f32", "q8_0"}
    assert "q5_0" in gguf_types(tmp_path / "m.q4_k_m.gguf")


def test_parallel_sequences_decode_alike(cfg_for, tmp_path):
    """Batched decoding: 4 parallel sequences of the same prompt give the single sequence's greedy tokens."""
    cfg = cfg_for("model=tiny-llama")
    model, tok = load_model(cfg.model, cfg.cache_dir, "cpu", "float32")
    path = tmp_path / "m.f32.gguf"
    export_gguf(model, path, "f32", tokenizer=tok)
    with LlamaCpp(path, n_seq=4, n_ctx_seq=len(PROMPT) + 8) as lm:
        prefill_s, latency_s, tokens = lm.run(PROMPT, 4, 8)
        assert prefill_s > 0 and latency_s > 0 and len(tokens) == 4 and all(t == tokens[0] for t in tokens)
        assert lm.run(PROMPT, 1, 8)[2][0] == tokens[0]


def test_speed_records(cfg_for, tmp_path):
    """runtimes=[eager,llamacpp]: the llama.cpp rows beside eager's, per quant and batch, with their speedups
    against dense's export (cached once), prefill and decode rates and the batch-1 roofline; the table shows them."""
    overrides = ["model=tiny-llama-gqa", "method=depth_magnitude", "ratio=0.25", "eval.stages=[speed]",
                 "eval.speed.runtimes=[eager,llamacpp]", "+eval.speed.quants=[f16,q8_0]",
                 "eval.speed.batch_sizes=[1,2]", "eval.speed.new_tokens=[4]", "eval.speed.warmup=1",
                 "eval.speed.repeats=2", "eval.speed.min_time_s=0"]
    cell = run_cell(cfg_for(*overrides))
    df = load_records(cell)
    lc = df[df.runtime == "llamacpp"]
    assert not df[df.runtime == "eager"].empty
    assert set(lc.quant) == {"f16", "q8_0"} and set(lc.batch_size) == {1, 2}
    assert (lc.status == "ok").all() and (lc.gguf_arch == "llama").all()
    assert set(lc.llamacpp_threads) == {llamacpp.cores()}
    for metric in ("latency_s", "throughput_tok_s", "prefill_s", "prefill_tok_s", "decode_s", "decode_tok_s",
                   "speedup", "decode_speedup"):
        assert len(lc[lc.metric == metric]) == 4, metric  # 2 quants x 2 batch sizes
    assert all(len(raw) == 2 for raw in lc[lc.metric == "speedup"].raw)
    roof = lc[lc.metric == "roofline_frac"]
    assert set(roof.batch_size) == {1} and (roof.value > 0).all() and (roof.bytes_per_step > 0).all()
    q8 = lc[(lc.quant == "q8_0") & (lc.metric == "roofline_frac")].bytes_per_step.iloc[0]
    assert q8 < lc[(lc.quant == "f16") & (lc.metric == "roofline_frac")].bytes_per_step.iloc[0]
    cached = sorted((tmp_path / "cache" / "gguf_exports" / "tiny-llama-gqa").glob("dense-*.gguf"))
    assert sorted(p.name.split(".", 1)[1] for p in cached) == ["f16.gguf", "q8_0.gguf"]
    table = main_table(df)
    assert {"llama.cpp f16 speedup bs1", "llama.cpp q8_0 decode tok/s bs2", "llama.cpp f16 roofline bs1",
            "speedup bs1"} <= set(table.columns)


def test_too_many_parallel_sequences(cfg_for):
    cfg = cfg_for("model=tiny-llama", "method=dense", "eval.stages=[speed]", "eval.speed.runtimes=[llamacpp]",
                  "eval.speed.batch_sizes=[1,100000]")
    with pytest.raises(BenchError, match=r"batch_sizes=\[1, 100000\]: llama.cpp decodes at most \d+ parallel"):
        run_cell(cfg)
