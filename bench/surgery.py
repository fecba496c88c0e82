"""Surgery: the one place that physically changes a model's structure.

Deciding what to remove is the methods' job (a plan); this module only applies a decision and keeps the model a
plain, consistent HF model: config, per-module indices and KV-cache layout all follow the new structure.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch

from bench.models import decoder_layers


def _set_blocks(model, blocks: list[torch.nn.Module], keep: list[int]) -> None:
    model.model.layers = torch.nn.ModuleList(blocks)
    config = model.config
    config.num_hidden_layers = len(blocks)
    # Models with per-layer attention kinds (Gemma 3, Qwen2: sliding vs full) describe them in config.layer_types.
    if getattr(config, "layer_types", None) is not None:
        config.layer_types = [config.layer_types[i] for i in keep]


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
    saved = (layers, config.num_hidden_layers, getattr(config, "layer_types", None))
    _set_blocks(model, [layers[i] for i in keep], keep)
    try:
        yield model
    finally:
        model.model.layers, config.num_hidden_layers = saved[0], saved[1]
        if saved[2] is not None:
            config.layer_types = saved[2]
