"""Gradient-based scoring without holding gradients: each weight's gradient is handed to a callback the moment
it is accumulated, then freed (post-accumulate-grad hook). Peak memory stays near weights + activations, not
weights + gradients (LLM-Pruner's Taylor pruner needs ~80 GB for a 7B model because it keeps them)."""

from __future__ import annotations

from typing import Callable

import torch


def backward_folded(model, ids: torch.Tensor, folds: dict[torch.nn.Parameter, Callable]) -> None:
    """One forward/backward of the causal-LM loss on `ids` (mean next-token CE, `model(x, labels=x).loss`) in
    which only the parameters in `folds` get gradients; `folds[p](grad)` consumes each gradient, which is then
    freed. requires_grad flags are restored afterwards."""
    saved = {p: p.requires_grad for p in model.parameters()}
    hooks = []

    def hook_for(fold):
        def hook(p):
            fold(p.grad)
            p.grad = None
        return hook

    try:
        for p in model.parameters():
            p.requires_grad_(p in folds)
        hooks = [p.register_post_accumulate_grad_hook(hook_for(fold)) for p, fold in folds.items()]
        ids = ids.to(model.device)
        model(ids, labels=ids, use_cache=False).loss.backward()
    finally:
        for h in hooks:
            h.remove()
        for p, flag in saved.items():
            p.requires_grad_(flag)
            p.grad = None
