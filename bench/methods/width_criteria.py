"""Width criteria: importance of every attention head and MLP channel, from the original algorithms
(../shared/docs/methods.md sections 3-5, 7). Each returns, for every decoder layer, one score per query head
(`q`), per key/value head (`kv`) and per MLP channel (`channel`); higher = more important.

    taylor_scores      LLM-Pruner: |W * dL/dW| per element -> per channel -> summed over the coupled weights
    magnitude_scores   torch-pruning's data-free baseline: sum of squared weights, mean over the coupled weights
    wanda_sp_scores    |W| x ||X||_2 per input channel of o_proj / down_proj, layers pruned in sequence
    flap_scores        FLAP's fluctuation metric (WIFV) through the unpruned network, standardised per layer,
                       plus the mean input of every o_proj / down_proj channel for bias compensation
"""

from __future__ import annotations

import torch

from bench.methods.grads import backward_folded
from bench.models import decoder_layers
from bench.progress import bar

ROWS, COLS = 1, 0  # reduce a weight over its inputs (one score per output row) or over its outputs (per column)


def geometry(layer) -> tuple[int, int, int]:
    """(query heads, key/value heads, head_dim) of one decoder layer, read off its weights."""
    attn = layer.self_attn
    d = attn.head_dim
    return attn.q_proj.out_features // d, attn.k_proj.out_features // d, d


def _coupled(layer):
    """(weight, reduce over, unit kind) of every weight a head or channel owns."""
    attn, mlp = layer.self_attn, layer.mlp
    return [(attn.q_proj.weight, ROWS, "q"), (attn.o_proj.weight, COLS, "q"),
            (attn.k_proj.weight, ROWS, "kv"), (attn.v_proj.weight, ROWS, "kv"),
            (mlp.gate_proj.weight, ROWS, "channel"), (mlp.up_proj.weight, ROWS, "channel"),
            (mlp.down_proj.weight, COLS, "channel")]


def _per_unit(vec: torch.Tensor, kind: str, d: int) -> torch.Tensor:
    """Per-channel scores -> per-unit scores: a head owns head_dim consecutive channels."""
    return vec.view(-1, d).sum(dim=1) if kind in ("q", "kv") else vec


def _empty(model) -> dict:
    out = {"q": [], "kv": [], "channel": []}
    for layer in decoder_layers(model):
        n_q, n_kv, _ = geometry(layer)
        out["q"].append(torch.zeros(n_q, dtype=torch.float64))
        out["kv"].append(torch.zeros(n_kv, dtype=torch.float64))
        out["channel"].append(torch.zeros(layer.mlp.gate_proj.out_features, dtype=torch.float64))
    return out


def _to_lists(scores: dict) -> dict:
    return {k: [t.tolist() for t in v] if isinstance(v, list) else v for k, v in scores.items()}


TAYLOR_VARIANTS = ("param_first", "param_second", "param_mix", "vectorize")


def taylor_scores(model, ids: torch.Tensor, variant: str = "param_first") -> dict:
    """LLM-Pruner's Taylor importance (hf_prune.py:127-148, LLMPruner/pruner/hf_llama_pruner.py::TaylorImportance).

    Element salience S: param_first W*g (g: the batch gradient); param_second W*A*W with A = mean over samples of
    per-sample g^2; param_mix W*g - W*A*W / 2; vectorize sums W*g over a channel before the absolute value. A
    channel's score is sum |S| over its row (q, k, v, gate, up) or column (o, down); a unit's score sums all
    weights it owns. No variant holds gradients (bench.methods.grads), and the state kept per element is:
      param_first, vectorize  none: each gradient folds into the channel scores as it arrives
      param_second            none: sum |W A W| = sum W^2 A = (1/N) sum_j sum (W g_j)^2 (A >= 0), so each
                              per-sample gradient folds into the channel sums as it arrives
      param_mix               A, in the model's dtype (|W g - W A W / 2| does not split over samples): the N
                              per-sample passes fill it, then the batch gradient folds with it and frees it
    On LLaMA-7B (6.48e9 scored weights) param_mix's A is 25.9 GB in float32, 13.0 GB in bfloat16 (the other
    variants: one weight's float32 temporaries, under 1 GB); LLM-Pruner itself keeps .grad of every parameter
    (27 GB in float32) and, for param_second / param_mix, .acc_grad too (27 GB more)."""
    if variant not in TAYLOR_VARIANTS:
        raise ValueError(f"taylor={variant!r}: allowed values are {', '.join(TAYLOR_VARIANTS)}")
    layers = decoder_layers(model)
    scores = _empty(model)
    owned = [(li, w, dim, kind, geometry(layer)[2]) for li, layer in enumerate(layers)
             for w, dim, kind in _coupled(layer)]
    n = len(ids)

    def add(li, kind, dim, d, salience):
        red = salience.sum(dim=dim).abs() if variant == "vectorize" else salience.abs().sum(dim=dim)
        scores[kind][li] += _per_unit(red.double().cpu(), kind, d)

    def first(li, w, dim, kind, d):  # W * g of the batch gradient
        return lambda g: add(li, kind, dim, d, w.detach().float() * g.float())

    def second(li, w, dim, kind, d):  # (W g_j)^2 / N of one sample's gradient: its share of W A W
        return lambda g: add(li, kind, dim, d, (w.detach().float() * g.float()).square_() / n)

    acc = {}  # param_mix: sum_j g_j^2 per element, in the weight's dtype

    def accumulate(w):
        def fold(g):
            sq = g.float().square_()
            if w in acc:
                acc[w].add_(sq)
            else:
                acc[w] = sq.to(w.dtype)
        return fold

    def mix(li, w, dim, kind, d):  # W g - W A W / 2, then A is freed
        def fold(g):
            wf = w.detach().float()
            add(li, kind, dim, d, wf * g.float() - 0.5 * wf * (acc.pop(w).float() / n) * wf)
        return fold

    if variant in ("param_first", "vectorize"):
        backward_folded(model, ids, {u[1]: first(*u) for u in owned})
        return _to_lists(scores)
    per_sample = second if variant == "param_second" else (lambda li, w, dim, kind, d: accumulate(w))
    for sample in bar(ids, desc=f"taylor {variant}", unit="sample"):  # A = sum_j g_j^2 / N, as hf_prune.py:131-143
        backward_folded(model, sample[None], {u[1]: per_sample(*u) for u in owned})
    if variant == "param_mix":
        backward_folded(model, ids, {u[1]: mix(*u) for u in owned})
    return _to_lists(scores)


@torch.no_grad()
def magnitude_scores(model) -> dict:
    """Data-free L2 magnitude (torch-pruning GroupMagnitudeImportance(p=2, group_reduction="mean")): per weight
    the sum of squares over a unit's elements, averaged over the weights the unit owns."""
    scores = _empty(model)
    for li, layer in enumerate(bar(decoder_layers(model), desc="magnitude", unit="layer")):
        d = geometry(layer)[2]
        coupled = _coupled(layer)
        for kind in ("q", "kv", "channel"):
            mine = [(w, dim) for w, dim, k in coupled if k == kind]
            for w, dim in mine:
                scores[kind][li] += _per_unit(w.float().pow(2).sum(dim=dim).double().cpu(), kind, d) / len(mine)
    return _to_lists(scores)


def layer_inputs(model, ids: torch.Tensor, batch_size: int):
    """The hidden states entering block 0 for every calibration batch, and the keyword arguments the model
    passes its blocks (position embeddings, mask), captured from a real forward, so blocks can be run one by
    one as FLAP and Wanda do."""
    captured = []

    class Stop(Exception):
        pass

    def catch(module, args, kwargs):
        hidden = args[0] if args else kwargs.pop("hidden_states")
        captured.append((hidden, {k: v for k, v in kwargs.items() if k != "hidden_states"}))
        raise Stop

    handle = decoder_layers(model)[0].register_forward_pre_hook(catch, with_kwargs=True)
    try:
        for batch in ids.split(batch_size):
            try:
                model(batch.to(model.device), use_cache=False)
            except Stop:
                pass
    finally:
        handle.remove()
    return captured


def _input_hook(store: list):
    def hook(module, args):
        store.append(args[0].detach())
    return hook


def _mask_hook(removed: torch.Tensor):
    def hook(module, args):
        x = args[0].clone()
        x[..., removed.to(x.device)] = 0
        return (x,)
    return hook


@torch.no_grad()
def wanda_sp_scores(model, ids: torch.Tensor, select, batch_size: int = 16) -> dict:
    """Wanda-sp (FLAP repo lib/prune.py::prune_wanda_sp), sequential as in the original: block l is scored on
    the outputs of blocks < l *after* their pruning, its units are chosen (`select(l, scores) -> removed o_proj /
    down_proj input channels`), its pruned outputs feed block l + 1. Pruning is simulated by zeroing the removed
    input channels of o_proj / down_proj, which is what removing those heads and channels does.

    Channel score: mean over output rows of |W_ij| * ||X_j||_2, ||X_j||^2 = mean over samples of sum over tokens
    of x_j^2; a head's score is the sum over its channels."""
    layers = decoder_layers(model)
    scores = _empty(model)
    batches = layer_inputs(model, ids, batch_size)
    masks = []
    try:
        for li, layer in enumerate(bar(layers, desc="wanda-sp", unit="layer")):
            n_q, n_kv, d = geometry(layer)
            seen = {"o": [], "down": []}
            hooks = [layer.self_attn.o_proj.register_forward_pre_hook(_input_hook(seen["o"])),
                     layer.mlp.down_proj.register_forward_pre_hook(_input_hook(seen["down"]))]
            for hidden, kwargs in batches:
                layer(hidden, **kwargs)
            for h in hooks:
                h.remove()
            for key, linear, kind in (("o", layer.self_attn.o_proj, "q"), ("down", layer.mlp.down_proj, "channel")):
                sq = sum(x.double().pow(2).sum(dim=(0, 1)) for x in seen[key]) / len(ids)
                metric = (linear.weight.detach().double().abs() * sq.sqrt().to(linear.weight.device)).mean(dim=0)
                scores[kind][li] = _per_unit(metric.cpu(), kind, d)
            del seen
            removed_o, removed_down = select(li, scores)
            masks += [layer.self_attn.o_proj.register_forward_pre_hook(_mask_hook(removed_o)),
                      layer.mlp.down_proj.register_forward_pre_hook(_mask_hook(removed_down))]
            batches = [(layer(hidden, **kwargs), kwargs) for hidden, kwargs in batches]
    finally:
        for h in masks:
            h.remove()
    return _to_lists(scores)


class _Fluctuation:
    """FLAP's BiasGPT statistics for one Linear input, updated one calibration sample at a time (FLAP feeds its
    blocks one sample per forward): the mean input (baseline) and the fluctuation, whose first sample contributes
    nothing. The fluctuation term of a sample is sum_t (x - mean_new)(x - mean_old) by default (protocol=matched,
    the Welford form), or with `in_place` sum_t (x - mean_new)^2 as FLAP computes it: lib/layerwrapper.py
    BiasGPT.add_batch binds `old_baseline_inp` to the same tensor as `baseline_inp` and then updates that tensor
    in place (`*=`, `+=`), so its "old" mean is the new one by the time the term is formed."""

    def __init__(self, in_place: bool = False):
        self.n, self.mean, self.fluc, self.in_place = 0, None, None, in_place

    def __call__(self, module, args):
        for x in args[0].detach().double():  # [T, D] per sample
            old = self.mean if self.mean is not None else torch.zeros(x.shape[-1], dtype=x.dtype, device=x.device)
            self.mean = old * self.n / (self.n + 1) + x.mean(dim=0) / (self.n + 1)
            ref = self.mean if self.in_place else old
            if self.n == 0:
                self.fluc = torch.zeros_like(self.mean)
            else:
                self.fluc = self.fluc * (self.n - 1) / self.n + ((x - self.mean) * (x - ref)).sum(dim=0) / (self.n + 1)
            self.n += 1


def _standardize(x: torch.Tensor) -> torch.Tensor:
    return (x - x.mean()) / x.std()


@torch.no_grad()
def flap_scores(model, ids: torch.Tensor, batch_size: int = 16, in_place: bool = False) -> dict:
    """FLAP (lib/prune.py::prune_flap, --metrics WIFV --structure AL-AM): statistics gathered through the unpruned
    network. Per input channel j of o_proj / down_proj: WIFV_j = fluctuation_j * ||W[:, j]||^2; attention's metric
    is squared; each is standardised over its layer; a head scores the mean of its channels. Key/value heads get
    no score of their own (their group is scored by its query heads). Also returns the mean input of every
    channel (`o_mean`, `down_mean`), from which apply() builds the compensation bias. `in_place`: FLAP's own
    fluctuation update (protocol=native, `_Fluctuation`)."""
    layers = decoder_layers(model)
    stats = [(_Fluctuation(in_place), _Fluctuation(in_place)) for _ in layers]
    hooks = []
    for layer, (o, down) in zip(layers, stats):
        hooks += [layer.self_attn.o_proj.register_forward_pre_hook(o),
                  layer.mlp.down_proj.register_forward_pre_hook(down)]
    try:
        for batch in bar(ids.split(batch_size), desc="flap stats", unit="batch"):
            model(batch.to(model.device), use_cache=False, logits_to_keep=1)
    finally:
        for h in hooks:
            h.remove()
    scores = _empty(model)
    scores["o_mean"], scores["down_mean"] = [], []
    for li, (layer, (o, down)) in enumerate(zip(layers, stats)):
        d = geometry(layer)[2]
        wo = layer.self_attn.o_proj.weight.detach().double().pow(2).sum(dim=0)
        wd = layer.mlp.down_proj.weight.detach().double().pow(2).sum(dim=0)
        attn = _standardize((o.fluc * wo) ** 2).cpu()
        scores["q"][li] = attn.view(-1, d).mean(dim=1)
        scores["channel"][li] = _standardize(down.fluc * wd).cpu()
        scores["o_mean"].append(o.mean.cpu())
        scores["down_mean"].append(down.mean.cpu())
    return _to_lists(scores)
