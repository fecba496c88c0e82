"""Surgery: the one place that physically changes a model's structure.

Deciding what to remove is the methods' job (a plan); this module only applies a decision and keeps the model a
plain, consistent HF model: config, per-module indices and KV-cache layout all follow the new structure.
"""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path

import torch

from bench.models import decoder_layers


def _set_blocks(model, blocks: list[torch.nn.Module], keep: list[int]) -> None:
    model.model.layers = torch.nn.ModuleList(blocks)
    config = model.config
    config.num_hidden_layers = len(blocks)
    # Per-layer lists follow the blocks: attention kinds (Gemma 3, Qwen2: sliding vs full) and the sizes of a
    # width-pruned model.
    for key in ("layer_types", "layer_shapes"):
        if getattr(config, key, None) is not None:
            setattr(config, key, [getattr(config, key)[i] for i in keep])


def remove_blocks(model, remove: list[int]):
    """Remove decoder blocks `remove` in place; the result generates with the KV cache and round-trips through
    save_pretrained / from_pretrained like any HF checkpoint."""
    layers = decoder_layers(model)
    n = len(layers)
    if any(not 0 <= i < n for i in remove) or len(set(remove)) != len(remove):
        raise ValueError(f"blocks to remove {remove} must be distinct indices in [0, {n})")
    keep = [i for i in range(n) if i not in set(remove)]
    _set_blocks(model, [layers[i] for i in keep], keep)
    for new_idx, block in enumerate(decoder_layers(model)):
        # layer_idx is the block's slot in the KV cache; stale indices would read another block's keys
        for module in block.modules():
            if hasattr(module, "layer_idx"):
                module.layer_idx = new_idx
    return model


@contextmanager
def blocks_view(model, keep: list[int]):
    """Temporarily run `model` with only blocks `keep` (no copy, no cache use): the criteria's way of asking
    "what if these blocks were gone". Restores the model on exit."""
    layers, config = decoder_layers(model), model.config
    saved = {key: getattr(config, key, None) for key in ("num_hidden_layers", "layer_types", "layer_shapes")}
    _set_blocks(model, [layers[i] for i in keep], keep)
    try:
        yield model
    finally:
        model.model.layers = layers
        for key, value in saved.items():
            if value is not None:
                setattr(config, key, value)


# --- width: attention heads, MLP channels, compensation biases ------------------------------------------------


def _keep(linear: torch.nn.Linear, keep: torch.Tensor, dim: int) -> None:
    """Keep output rows (dim 0) or input columns (dim 1) `keep` of a Linear, in place, with torch-pruning's
    low-level pruning functions (weights, bias and in/out_features in one step)."""
    import torch_pruning as tp

    size = linear.out_features if dim == 0 else linear.in_features
    removed = sorted(set(range(size)) - set(keep.tolist()))
    if removed:
        (tp.prune_linear_out_channels if dim == 0 else tp.prune_linear_in_channels)(linear, removed)


def head_rows(heads: list[int], head_dim: int) -> torch.Tensor:
    """The q/k/v output rows (= o_proj input columns) owned by `heads`: head_dim consecutive ones each."""
    return (torch.tensor(heads, dtype=torch.long)[:, None] * head_dim + torch.arange(head_dim)).flatten()


def prune_heads(attn, keep_q: list[int], keep_kv: list[int]) -> None:
    """Keep query heads `keep_q` and key/value heads `keep_kv` of one attention module (LLaMA layout).

    Grouped-query attention pairs query head j with key/value head j // groups. After pruning, every kept query
    head must still have its own key/value head kept, and every kept key/value head must serve the same number of
    query heads (HF's repeat_kv needs uniform groups): pruning whole groups, or the same number of query heads
    in every group, both satisfy this. Anything else would orphan or mis-pair a head and is refused."""
    groups = attn.num_key_value_groups
    keep_q, keep_kv = sorted(keep_q), sorted(keep_kv)
    if not keep_q or not keep_kv:
        raise ValueError("an attention layer must keep at least one query and one key/value head")
    owners = [q // groups for q in keep_q]
    per_kv = {kv: owners.count(kv) for kv in keep_kv}
    if set(owners) != set(keep_kv) or len(set(per_kv.values())) != 1:
        raise ValueError(f"query heads {keep_q} and key/value heads {keep_kv} do not form uniform GQA groups "
                         f"(a key/value head would be orphaned or groups would differ in size)")
    d = attn.head_dim
    q_rows, kv_rows = head_rows(keep_q, d), head_rows(keep_kv, d)
    _keep(attn.q_proj, q_rows, 0)
    _keep(attn.k_proj, kv_rows, 0)
    _keep(attn.v_proj, kv_rows, 0)
    _keep(attn.o_proj, q_rows, 1)
    attn.num_key_value_groups = len(keep_q) // len(keep_kv)


def prune_channels(mlp, keep: list[int]) -> None:
    """Keep MLP intermediate channels `keep`: gate/up rows and down_proj columns."""
    idx = torch.tensor(sorted(keep), dtype=torch.long)
    _keep(mlp.gate_proj, idx, 0)
    _keep(mlp.up_proj, idx, 0)
    _keep(mlp.down_proj, idx, 1)
    if hasattr(mlp, "intermediate_size"):
        mlp.intermediate_size = len(keep)


def add_bias(linear: torch.nn.Linear, bias: torch.Tensor) -> None:
    """Add `bias` to a Linear's output (creating the bias if it has none): FLAP's compensation on o_proj and
    down_proj. Shape-only callers pass zeros."""
    bias = bias.to(device=linear.weight.device, dtype=linear.weight.dtype)
    if linear.bias is None:
        linear.bias = torch.nn.Parameter(bias.clone())
    else:
        linear.bias.data += bias


def layer_shapes(model) -> list[dict]:
    """Per-layer sizes of a (possibly non-uniformly) width-pruned model, as recorded in its saved config."""
    shapes = []
    for layer in decoder_layers(model):
        attn, mlp = layer.self_attn, layer.mlp
        shapes.append({"num_attention_heads": attn.q_proj.out_features // attn.head_dim,
                       "num_key_value_heads": attn.k_proj.out_features // attn.head_dim,
                       "intermediate_size": mlp.gate_proj.out_features,
                       "o_proj_bias": attn.o_proj.bias is not None,
                       "down_proj_bias": mlp.down_proj.bias is not None})
    return shapes


def apply_width_plan(model, plan):
    """Apply a width plan in place: per layer, the query / key-value heads and MLP channels to remove, and the
    mean activations of the removed o_proj / down_proj input channels (FLAP's compensation: the removed
    channels' expected contribution, W[:, removed] @ mean_x[removed], moves into a bias).
    Where every layer ends with the same sizes and no bias was added, the config's own head and channel counts
    are updated (a stock checkpoint); otherwise the per-layer sizes go into config.layer_shapes, from which
    `load_pruned` rebuilds the model."""
    layers = decoder_layers(model)
    for key, spec in plan.layers.items():
        layer = layers[int(key)]
        attn, mlp = layer.self_attn, layer.mlp
        d = attn.head_dim
        n_q, n_kv = attn.q_proj.out_features // d, attn.k_proj.out_features // d
        if spec.get("o_bias_mean") is not None:
            add_bias(attn.o_proj, _compensation(attn.o_proj, head_rows(spec["remove_q"], d), spec["o_bias_mean"]))
        if spec.get("down_bias_mean") is not None:
            add_bias(mlp.down_proj, _compensation(mlp.down_proj, torch.tensor(spec["remove_channels"]),
                                                  spec["down_bias_mean"]))
        rm_q, rm_kv, rm_c = (set(spec.get(k) or ()) for k in ("remove_q", "remove_kv", "remove_channels"))
        if rm_q or rm_kv:
            prune_heads(attn, [q for q in range(n_q) if q not in rm_q], [k for k in range(n_kv) if k not in rm_kv])
        if rm_c:
            prune_channels(mlp, [c for c in range(mlp.gate_proj.out_features) if c not in rm_c])
    shapes = layer_shapes(model)
    sizes = {(s["num_attention_heads"], s["num_key_value_heads"], s["intermediate_size"]) for s in shapes}
    compensated = any(spec.get("o_bias_mean") is not None or spec.get("down_bias_mean") is not None
                      for spec in plan.layers.values())
    stock = None if compensated else _stock_sizes(model.config, sizes, decoder_layers(model)[0].self_attn.head_dim)
    if stock:  # every layer has the same sizes, no new bias: a stock checkpoint (from_pretrained)
        for key, value in stock.items():
            setattr(model.config, key, value)
    else:
        model.config.layer_shapes = shapes
    return model


def _stock_sizes(config, sizes: set[tuple[int, int, int]], head_dim: int) -> dict | None:
    """The config keys that describe a width-pruned model, where one set of sizes holds for every layer and the
    config class accepts them (transformers validates, e.g., hidden_size % num_attention_heads == 0 even with an
    explicit head_dim); None otherwise: the per-layer sizes then go into layer_shapes."""
    from huggingface_hub.errors import StrictDataclassError

    if len(sizes) != 1:
        return None
    (heads, kv_heads, channels), = sizes
    keys = {"num_attention_heads": heads, "num_key_value_heads": kv_heads, "intermediate_size": channels,
            "head_dim": head_dim}
    try:
        type(config).from_dict(config.to_dict() | keys)
    except (ValueError, TypeError, StrictDataclassError):  # the class's own validation: no stock config fits
        return None
    return keys


def _compensation(linear: torch.nn.Linear, removed_inputs: torch.Tensor, mean: list[float]) -> torch.Tensor:
    w = linear.weight.data[:, removed_inputs.to(linear.weight.device)].float()
    return w @ torch.tensor(mean, dtype=torch.float32, device=w.device)


def save_pruned(model, tokenizer, plan, path) -> Path:
    """Write a pruned model as a checkpoint directory: safetensors weights, config, tokenizer and the plan.json
    that made it (`save_model=true` in a cell: <cell dir>/model/). Written beside and renamed into place, so a
    killed save never leaves a directory that looks complete. `load_pruned` reads every kind back; depth-pruned
    and uniformly width-pruned models are stock checkpoints (AutoModelForCausalLM.from_pretrained)."""
    import shutil

    from bench.records import write_json

    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    if tokenizer is not None:
        tokenizer.save_pretrained(tmp)
    write_json(tmp / "plan.json", plan.to_json())
    shutil.rmtree(path, ignore_errors=True)
    tmp.rename(path)
    return path


def load_pruned(path, dtype: torch.dtype = torch.float32):
    """Reload a model written by `save_pruned` (or any HF checkpoint), on the CPU in `dtype`:

    - depth-pruned, uniformly width-pruned, LoRA-merged: a stock checkpoint, AutoModelForCausalLM.from_pretrained;
    - non-uniformly width-pruned (config.layer_shapes: per-layer head and channel counts, FLAP's biases): built
      at the base sizes, reshaped layer by layer, then the saved weights are loaded;
    - SliceGPT (config.slicing): built at the base sizes, sliced to the saved widths with identity bases (the
      same shapes and shortcut matrices as the rotated model), then the saved weights are loaded.
    """
    import json

    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModelForCausalLM

    from bench.plans import from_json

    config = AutoConfig.from_pretrained(path)
    shapes, slicing = getattr(config, "layer_shapes", None), getattr(config, "slicing", None)
    if shapes is None and slicing is None:
        return AutoModelForCausalLM.from_pretrained(path, dtype=dtype).eval()
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    for layer, shape in zip(decoder_layers(model), shapes or []):
        attn, mlp = layer.self_attn, layer.mlp
        groups = shape["num_attention_heads"] // shape["num_key_value_heads"]
        keep_kv = list(range(shape["num_key_value_heads"]))
        keep_q = [kv * attn.num_key_value_groups + j for kv in keep_kv for j in range(groups)]
        prune_heads(attn, keep_q, keep_kv)
        prune_channels(mlp, list(range(shape["intermediate_size"])))
        if shape["o_proj_bias"]:
            add_bias(attn.o_proj, torch.zeros(attn.o_proj.out_features))
        if shape["down_proj_bias"]:
            add_bias(mlp.down_proj, torch.zeros(mlp.down_proj.out_features))
    if slicing is not None:
        apply_slice_plan(model, from_json(json.loads((Path(path) / "plan.json").read_text())))
    state = {}
    for f in sorted(Path(path).glob("*.safetensors")):
        state |= load_file(f)
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.endswith("lm_head.weight") or not config.tie_word_embeddings]
    if missing or unexpected:
        raise RuntimeError(f"pruned checkpoint {path} does not match its config: missing {missing[:3]}, "
                           f"unexpected {unexpected[:3]}")
    if config.tie_word_embeddings:
        model.tie_weights()
    return model.eval()


# --- SliceGPT: rotate the residual stream and slice its width ------------------------------------------------


def slice_sites(n_layers: int) -> list[str]:
    """The residual-stream sites that get a basis: block 0's input, then each block's MLP input and output."""
    return ["embed"] + [f"{kind}{i}" for i in range(n_layers) for kind in ("mid", "out")]


class ScalelessRMSNorm(torch.nn.Module):
    """RMSNorm with its scale folded into the next linears, dividing by the *dense* width `mean_dim` (SliceGPT's
    RMSN): on a sliced stream that is the dense model's norm, since the dropped directions carry ~no energy."""

    def __init__(self, mean_dim: int, eps: float):
        super().__init__()
        self.mean_dim, self.eps = mean_dim, eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        variance = x32.pow(2).sum(-1, keepdim=True) / self.mean_dim
        return (x32 * torch.rsqrt(variance + self.eps)).to(x.dtype)


class _Shortcuts:
    """A pre-norm decoder block whose residual changes basis: x -> x S_attn + attn(x), then x S_mlp + mlp(x)."""

    def forward(self, hidden_states, **kwargs):
        attn, _ = self.self_attn(hidden_states=self.input_layernorm(hidden_states), **kwargs)
        hidden_states = hidden_states @ self.attn_shortcut + attn
        return hidden_states @ self.mlp_shortcut + self.mlp(self.post_attention_layernorm(hidden_states))


_SLICED_CLASSES: dict[type, type] = {}


def _sliced_class(cls: type) -> type:
    """cls with the shortcut forward; a subclass, so HF's per-layer hooks (hidden-state recording) still find it."""
    if cls not in _SLICED_CLASSES:
        _SLICED_CLASSES[cls] = type(f"Sliced{cls.__name__}", (_Shortcuts, cls), {})
    return _SLICED_CLASSES[cls]


def _set_linear(linear: torch.nn.Linear, weight: torch.Tensor, bias: torch.Tensor | None = None) -> None:
    dtype = linear.weight.dtype
    linear.weight = torch.nn.Parameter(weight.to(dtype).contiguous())
    linear.out_features, linear.in_features = weight.shape
    if bias is not None:
        linear.bias = torch.nn.Parameter(bias.to(dtype).contiguous())


def _norm_scale(norm) -> torch.Tensor:
    return norm.weight.detach().double()


def _eps(norm) -> float:
    return float(getattr(norm, "variance_epsilon", getattr(norm, "eps", 1e-6)))


@torch.no_grad()
def apply_slice_plan(model, plan):
    """Apply a SliceGPT plan in place: fold every RMSNorm scale into the linears after it, rotate each site's
    readers (embedding columns; q/k/v and gate/up inputs; lm_head input) and writers (o_proj and down_proj rows)
    into its basis Q[:, :d], and give each block its shortcut matrices Q_in^T Q_mid and Q_mid^T Q_out. Math in
    fp64, weights back in their dtype. With d = h everywhere the logits are unchanged (an exact rotation). A
    tied lm_head is untied (it reads the last basis, the embedding writes the first). Plans without bases
    (shape-only) use identity bases: the same shapes."""
    dims, rotations = plan.dims, plan.rotations or {}
    layers = decoder_layers(model)
    emb, head = model.get_input_embeddings(), model.get_output_embeddings()
    h, device = emb.embedding_dim, emb.weight.device
    eye = torch.eye(h, dtype=torch.float64, device=device)

    def basis(site: str) -> torch.Tensor:
        q = rotations.get(site)
        if q is not None and not isinstance(q, torch.Tensor):
            raise ValueError(f"slice plan: the basis of {site} is not a tensor (a plan.json holds only its hash)")
        return eye[:, :dims[site]] if q is None else q.to(device=device, dtype=torch.float64)

    if head.weight is emb.weight:
        head.weight = torch.nn.Parameter(emb.weight.detach().clone())
        model.config.tie_word_embeddings = False
    q_in = basis("embed")
    emb.weight = torch.nn.Parameter((emb.weight.double() @ q_in).to(emb.weight.dtype))
    emb.embedding_dim = q_in.shape[1]
    for i, layer in enumerate(layers):
        attn, mlp = layer.self_attn, layer.mlp
        q_mid, q_out = basis(f"mid{i}"), basis(f"out{i}")
        scale = _norm_scale(layer.input_layernorm)
        for lin in (attn.q_proj, attn.k_proj, attn.v_proj):
            _set_linear(lin, (lin.weight.double() * scale) @ q_in)
        o_bias = None if attn.o_proj.bias is None else attn.o_proj.bias.double() @ q_mid
        _set_linear(attn.o_proj, q_mid.T @ attn.o_proj.weight.double(), o_bias)
        scale = _norm_scale(layer.post_attention_layernorm)
        for lin in (mlp.gate_proj, mlp.up_proj):
            _set_linear(lin, (lin.weight.double() * scale) @ q_mid)
        down_bias = None if mlp.down_proj.bias is None else mlp.down_proj.bias.double() @ q_out
        _set_linear(mlp.down_proj, q_out.T @ mlp.down_proj.weight.double(), down_bias)
        dtype = attn.q_proj.weight.dtype
        layer.input_layernorm = ScalelessRMSNorm(h, _eps(layer.input_layernorm))
        layer.post_attention_layernorm = ScalelessRMSNorm(h, _eps(layer.post_attention_layernorm))
        layer.attn_shortcut = torch.nn.Parameter((q_in.T @ q_mid).to(dtype))
        layer.mlp_shortcut = torch.nn.Parameter((q_mid.T @ q_out).to(dtype))
        layer.__class__ = _sliced_class(type(layer))
        q_in = q_out
    _set_linear(head, (head.weight.double() * _norm_scale(model.model.norm)) @ q_in,
                None if head.bias is None else head.bias.double())
    model.model.norm = ScalelessRMSNorm(h, _eps(model.model.norm))
    model.config.slicing = {"hidden": plan.hidden, "dims": dims}
    return model
