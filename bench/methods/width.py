"""Width pruning: remove attention heads and MLP channels, matched to depth's parameter budget.

    llm_pruner  Taylor importance, uniform per-layer ratio on blocks 4..L-3 (Ma et al. 2023)
    wanda_sp    |W| x ||X|| per o_proj / down_proj input channel, uniform, layers pruned in sequence (An et al.)
    flap        fluctuation metric, adaptive global structure (AL-AM), bias compensation (An et al. 2024)
    magnitude   data-free L2 magnitude, uniform (torch-pruning's LLM example)

Grouped-query attention (`head_mode`): `kv_groups` removes a key/value head together with every query head
that shares it (LLM-Pruner's llama3.py); `q_heads` removes the same number of query heads from every group and
keeps all key/value heads (possible only when heads are grouped). Either way no key/value head is orphaned.
`auto` (the default) is kv_groups, or q_heads on a model with a single key/value head (Gemma 3 270M), where
there is no group to remove.

Budget (`budget_match`): `depth` (default) targets the parameter count depth pruning reaches at the same ratio;
`ratio` targets ratio x (decoder-block parameters) itself. The uniform ratio (or FLAP's global threshold) is
solved so the achieved count is as close as whole heads and channels allow; the record says whether it is within
0.5% of the dense total.

    python -m bench method=llm_pruner ratio=0.2
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import torch

from bench import BenchError
from bench.budget import BUDGET_MATCHES, MATCH_TOLERANCE, Budget, is_matched, match_target
from bench.methods import width_criteria as wc
from bench.methods.base import CalibSpec, as_calib, register
from bench.models import WIDTH_LAYOUT, check_layout, decoder_layers
from bench.plans import WidthPlan
from bench.surgery import apply_width_plan, head_rows

HEAD_MODES = ("auto", "kv_groups", "q_heads")
GQA_ALIGNS = ("auto", "original", "group")   # LLM-Pruner: which query heads a key/value head is scored with


@dataclass(frozen=True)
class LayerGeometry:
    n_q: int
    n_kv: int
    head_dim: int
    channels: int
    q_params: int        # one query head: its q_proj rows + o_proj columns
    kv_params: int       # one key/value head: its k_proj + v_proj rows
    channel_params: int  # one MLP channel: gate + up rows, down column
    hidden: int
    o_bias: bool
    down_bias: bool


def _numel_row(linear: torch.nn.Linear) -> int:
    return linear.in_features + (1 if linear.bias is not None else 0)


def layer_geometry(layer) -> LayerGeometry:
    attn, mlp = layer.self_attn, layer.mlp
    n_q, n_kv, d = wc.geometry(layer)
    return LayerGeometry(n_q, n_kv, d, mlp.gate_proj.out_features,
                         q_params=d * _numel_row(attn.q_proj) + attn.o_proj.out_features * d,
                         kv_params=d * (_numel_row(attn.k_proj) + _numel_row(attn.v_proj)),
                         channel_params=_numel_row(mlp.gate_proj) + _numel_row(mlp.up_proj) + mlp.down_proj.out_features,
                         hidden=attn.o_proj.out_features, o_bias=attn.o_proj.bias is not None,
                         down_bias=mlp.down_proj.bias is not None)


def model_geometry(model) -> list[LayerGeometry]:
    return [layer_geometry(layer) for layer in decoder_layers(model)]


def head_units(g: LayerGeometry, mode: str) -> tuple[int, int]:
    """(units per layer, params per unit) for a head mode."""
    groups = g.n_q // g.n_kv
    if mode == "kv_groups":
        return g.n_kv, groups * g.q_params + g.kv_params
    return groups, g.n_kv * g.q_params  # one query head out of every group


def _round_kept(kept: int, round_to: int | None) -> int:
    if not round_to:
        return kept
    return max(round_to, round(kept / round_to) * round_to)


@dataclass
class WidthPruner:
    """A width criterion: score heads and MLP channels, remove the least important ones, matched to the budget.
    A criterion is a subclass that sets `criterion` and implements `score`; `remove_count` (its paper's rounding
    at a ratio) and `allocate` (uniform per layer by default) may be overridden."""

    kind: ClassVar[str] = "width"
    prunes: ClassVar[bool] = True
    needs_calib: ClassVar[bool] = True
    layout: ClassVar[tuple[str, ...]] = WIDTH_LAYOUT
    criterion: ClassVar[str] = ""
    head_reduce: ClassVar[str] = "sum"   # a head unit scores the sum of its heads' scores (FLAP: the mean)
    name: str = ""
    head_mode: str = "auto"
    keep_first: int = 0           # blocks never pruned at the start (LLM-Pruner: 4)
    keep_last: int = 0            # ... and at the end (LLM-Pruner: 2)
    round_to: int | None = None   # round kept MLP channels to a multiple (8, 64: hardware-friendly); off = papers
    budget_match: str = "depth"   # depth: depth's achieved params at this ratio; ratio: ratio x block params
    calib: CalibSpec | None = field(default_factory=CalibSpec)
    batch_size: int = 16          # calibration samples per forward (activation statistics)
    protocol: str = "matched"     # matched | native (set by build_method from the run config)

    def departures(self) -> list[str]:
        """Under protocol=native: where this method still differs from its original code (into the records)."""
        return []

    def __post_init__(self):
        self.name = self.name or self.criterion
        for key, value, allowed in (("head_mode", self.head_mode, HEAD_MODES),
                                    ("budget_match", self.budget_match, BUDGET_MATCHES)):
            if value not in allowed:
                raise BenchError(f"method.{key}={value!r}: allowed values are {', '.join(allowed)}")
        self.calib = as_calib(self.calib, needed=self.needs_calib)

    @property
    def label(self) -> str:
        return self.name

    def remove_count(self, n: int, r: float) -> int:
        """Units to remove from n at ratio r: LLM-Pruner / torch-pruning keep int(n (1 - r))."""
        return n - int(n * (1 - r))

    def remove_heads(self, g: LayerGeometry, r: float) -> int:
        """Head units to remove from a layer at ratio r by the method's own rule (default: `remove_count` on the
        units; LLM-Pruner counts channels and floors them to heads)."""
        return self.remove_count(head_units(g, self.head_mode)[0], r)

    def native_budget(self) -> bool:
        """True where the method prunes at its original's own ratio rule (uniform_counts at the cell's ratio) instead
        of matching the budget: LLM-Pruner under protocol=native."""
        return False

    def counts(self, geo: list[LayerGeometry], budget: Budget) -> dict[int, tuple[int, int]]:
        """{layer: (head units, channels) to remove}, uniform: under a native budget the original's rule at the
        cell's ratio, otherwise the counts solved for the budget."""
        if self.native_budget():
            return self.uniform_counts(geo, budget.ratio)
        return self.solve_counts(geo, budget.dense_params, self.target(budget))

    # --- deciding ------------------------------------------------------------------------------------------

    def layers(self, n_layers: int) -> list[int]:
        return list(range(self.keep_first, n_layers - self.keep_last))

    def target(self, budget: Budget) -> int:
        return match_target(budget, self.budget_match)

    def resolve_head_mode(self, model_or_geo) -> None:
        """Fix `auto` for this model (or its geometry): kv_groups, or q_heads where a layer has a single key/value
        head (flap always removes whole groups, and refuses such a model in `check`)."""
        if self.head_mode == "auto":
            geo = model_or_geo if isinstance(model_or_geo, list) else model_geometry(model_or_geo)
            single = any(g.n_kv == 1 for g in geo)
            self.head_mode = "q_heads" if single and self.criterion != "flap" else "kv_groups"

    def check(self, budget: Budget, model=None) -> None:
        if model is None:
            return
        check_layout(model, self.layout, f"method={self.name}")
        self.resolve_head_mode(model)
        geo = model_geometry(model)
        if self.head_mode == "q_heads" and any(g.n_q == g.n_kv for g in geo):
            raise BenchError("method.head_mode=q_heads needs grouped-query attention (more query than key/value "
                             "heads); allowed values for this model are kv_groups")
        if self.head_mode == "kv_groups" and any(g.n_kv == 1 for g in geo):
            allowed = "none: flap removes whole key/value groups" if self.criterion == "flap" else "q_heads"
            raise BenchError(f"method.head_mode=kv_groups: this model has a single key/value head per layer (Gemma 3 "
                             f"270M), which no method can remove; allowed values for it are {allowed}")
        most = sum(head_units(geo[i], self.head_mode)[1] * (head_units(geo[i], self.head_mode)[0] - 1)
                   + geo[i].channel_params * (geo[i].channels - 1) for i in self.layers(len(geo)))
        need = budget.dense_params - self.target(budget)
        if need > most and not self.native_budget():
            raise BenchError(f"ratio={budget.ratio}: {self.criterion} must remove {need:,} params but blocks "
                             f"{self.keep_first}..{len(geo) - self.keep_last - 1} hold only {most:,} removable "
                             f"(keep_first={self.keep_first}, keep_last={self.keep_last}): lower the ratio")

    def uniform_counts(self, geo: list[LayerGeometry], r: float) -> dict[int, tuple[int, int]]:
        """{layer: (head units, channels) to remove} at uniform ratio r on the prunable layers, by the method's own
        rounding rule: LLM-Pruner's plan at a given ratio (its README's 0.25 on blocks 4..29 of LLaMA-7B), with no
        budget matching."""
        self.resolve_head_mode(geo)
        out = {}
        for i in self.layers(len(geo)):
            units, _ = head_units(geo[i], self.head_mode)
            h = min(self.remove_heads(geo[i], r), units - 1)
            kept = _round_kept(geo[i].channels - self.remove_count(geo[i].channels, r), self.round_to)
            out[i] = (h, min(max(geo[i].channels - kept, 0), geo[i].channels - 1))
        return out

    def solve_counts(self, geo: list[LayerGeometry], dense: int, target: int) -> dict[int, tuple[int, int]]:
        """Uniform allocation matched to `target`: the same (head units, channels) removed from every prunable
        layer. Whole heads are coarse (SmolLM2 has 3 key/value groups per layer), so channels take up the slack:
        among the pairs within the tolerance of the target, prefer one whose head count is what the method's own
        rule gives at the channel fraction (`remove_count`), then the one whose head and channel fractions are
        closest; with no pair within tolerance, the pair nearest the target."""
        self.resolve_head_mode(geo)
        layers = self.layers(len(geo))
        g = geo[layers[0]]
        if any(geo[i] != g for i in layers):
            raise BenchError("width budgets need prunable layers of one shape (a uniform base model)")
        units, unit_params = head_units(g, self.head_mode)
        need, n, tol = dense - target, len(layers), MATCH_TOLERANCE * dense
        step = self.round_to or 1
        best = None
        for h in range(units):  # a layer keeps at least one head unit
            exact = (need - n * h * unit_params) / (n * g.channel_params)
            kept = {_round_kept(g.channels - c, self.round_to) for c in (int(exact), int(exact) + 1)}
            kept |= {k + step for k in kept} | {k - step for k in kept}
            for k in kept:
                c = g.channels - k
                if not 0 <= c < g.channels:
                    continue
                gap = abs(need - n * (h * unit_params + c * g.channel_params))
                own_rule = self.remove_heads(g, c / g.channels) == h
                key = (0, not own_rule, abs(h / units - c / g.channels)) if gap <= tol else (1, 0, gap)
                if best is None or key < best[0]:
                    best = (key, h, c)
        return {i: (best[1], best[2]) for i in layers}

    def score_key(self, budget: Budget | None = None, model=None) -> dict:
        self.resolve_head_mode(model)
        return {"impl": "width", "criterion": self.criterion, "head_mode": self.head_mode}

    def score(self, model, calib_ids, budget: Budget | None = None) -> dict:
        raise NotImplementedError

    def _unit_scores(self, li: int, g: LayerGeometry, scores: dict) -> list[tuple[float, list[int], list[int]]]:
        """(score, query heads, key/value heads) of every key/value group of a layer: the reduction (sum, or
        FLAP's mean) of its query heads' scores plus its key/value head's."""
        q, kv = list(map(float, scores["q"][li])), list(map(float, scores["kv"][li]))
        groups = g.n_q // g.n_kv
        reduce = (lambda xs: sum(xs) / len(xs)) if self.head_reduce == "mean" else sum
        return [(reduce([q[k * groups + j] for j in range(groups)]) + kv[k],
                 [k * groups + j for j in range(groups)], [k]) for k in range(g.n_kv)]

    def _select_layer(self, li: int, g: LayerGeometry, scores: dict, count: tuple[int, int]) -> dict:
        n_units, n_ch = count
        remove_q, remove_kv = [], []
        if n_units and self.head_mode == "kv_groups":
            units = sorted(self._unit_scores(li, g, scores), key=lambda u: (u[0], u[2]))[:n_units]
            remove_q = sorted(q for u in units for q in u[1])
            remove_kv = sorted(k for u in units for k in u[2])
        elif n_units:  # q_heads: the n_units lowest query heads of every group
            groups = g.n_q // g.n_kv
            q = list(map(float, scores["q"][li]))
            for k in range(g.n_kv):
                members = sorted(range(k * groups, (k + 1) * groups), key=lambda j: (q[j], j))
                remove_q += members[:n_units]
            remove_q.sort()
        ch = list(map(float, scores["channel"][li]))
        remove_ch = sorted(sorted(range(g.channels), key=lambda j: (ch[j], j))[:n_ch])
        return {"remove_q": remove_q, "remove_kv": remove_kv, "remove_channels": remove_ch}

    def allocate(self, geo: list[LayerGeometry], scores: dict, budget: Budget,
                 structural: bool) -> tuple[dict[int, dict], dict | None]:
        """(per-layer removal specs, the uniform counts): the same head units and channels from every prunable
        layer, the lowest-scoring ones, counts solved for the budget."""
        native = self.native_budget()  # the original's own ratio, no matching (plan.target_params: for reference)
        counts = self.counts(geo, budget)
        layers = {li: self._select_layer(li, geo[li], scores, c) for li, c in counts.items()}
        first, (h, c) = next(iter(counts.items()))  # uniform: every prunable layer has the same counts
        return layers, ({"ratio": budget.ratio} if native else {}) | {
            "head_units": h, "head_fraction": h / head_units(geo[first], self.head_mode)[0],
            "channels": c, "channel_fraction": c / geo[first].channels}

    def plan(self, scores: dict | None, budget: Budget, model=None) -> WidthPlan:
        """Per-layer heads and channels to remove. scores=None (shape-only): the uniform allocation matched to the
        budget (LLM-Pruner's structure; FLAP too, whose adaptive structure needs data) with the lowest-index
        units removed and no compensation biases."""
        self.resolve_head_mode(model)
        geo = model_geometry(model)
        target = self.target(budget)
        structural = scores is None
        if structural:
            sizes = {"q": [g.n_q for g in geo], "kv": [g.n_kv for g in geo], "channel": [g.channels for g in geo]}
            scores = {unit: [[0.0] * n for n in ns] for unit, ns in sizes.items()}
            layers, uniform = WidthPruner.allocate(self, geo, scores, budget, structural)
        else:
            layers, uniform = self.allocate(geo, scores, budget, structural)
        predicted = budget.dense_params - sum(
            geo[li].q_params * len(s["remove_q"]) + geo[li].kv_params * len(s["remove_kv"])
            + geo[li].channel_params * len(s["remove_channels"])
            - (geo[li].hidden if s.get("o_bias_mean") and not geo[li].o_bias else 0)
            - (geo[li].hidden if s.get("down_bias_mean") and not geo[li].down_bias else 0)
            for li, s in layers.items())
        return WidthPlan(criterion=None if structural else self.criterion, head_mode=self.head_mode,
                         round_to=self.round_to, budget_match=self.budget_match, uniform=uniform,
                         target_params=target, predicted_params=predicted, gap_params=predicted - target,
                         budget_matched=is_matched(budget, predicted, target),
                         layers={str(li): s for li, s in layers.items() if s["remove_q"] or s["remove_channels"]})

    # --- mutating ------------------------------------------------------------------------------------------

    def apply(self, model, plan: WidthPlan):
        return apply_width_plan(model, plan)


@register("llm_pruner")
@dataclass
class LLMPruner(WidthPruner):
    """LLM-Pruner: Taylor importance of each head and channel over the weights it owns, uniform per layer.

    Head count (both protocols): the original's rule, on the root linear's output channels C (q_proj on
    multi-head attention, hf_prune.py:105,111; k_proj on grouped-query attention, llama3.py:108,114): it prunes
    C - int(C (1 - r)) channels, floored to whole heads by n_pruned // head_dim
    (LLMPruner/torch_pruning/pruner/algorithms/metapruner.py:249-251, 274), e.g. 6 of LLaMA-7B's 32 heads at
    r = 0.2 and 8 at 0.25. MLP channels: C - int(C (1 - r)) on gate_proj. protocol=native: r is the cell's ratio
    on blocks keep_first..L-keep_last-1, uniform, not matched to depth's count (the plan keeps that target for
    reference and says whether it is met); matched: the counts are solved for the budget, preferring the pair
    whose head count is this rule's at the channel fraction.

    GQA score alignment (`gqa_align`, kv_groups on grouped heads): `original` scores key/value head k with query
    heads {k, k + n_kv, k + 2 n_kv, ...}, as the original's `imp.view(len // min, min).sum(0)` folds the 4096
    query channels onto the 1024 key channels (LLMPruner/pruner/hf_llama_pruner.py:332-340), while it removes
    k's true group {k g, ..., k g + g - 1} (repeat_kv's expand mapping, LLMPruner/torch_pruning/dependency.py:
    1042-1078, _helpers.py:53-67); `group` scores the true group; `auto` = original under protocol=native,
    group under matched."""

    criterion: ClassVar[str] = "llm_pruner"
    native_score_dtype: ClassVar[str] = "float32"  # the README's hf_prune.py --device cpu: fp32 (hf_prune.py:44-46)
    taylor: str = "param_first"   # element salience: param_first, param_second, param_mix, vectorize
    gqa_align: str = "auto"       # auto | original | group: which query heads a key/value head is scored with

    def __post_init__(self):
        super().__post_init__()
        if self.taylor not in wc.TAYLOR_VARIANTS:
            raise BenchError(f"method.taylor={self.taylor!r}: allowed values are {', '.join(wc.TAYLOR_VARIANTS)}")
        if self.gqa_align not in GQA_ALIGNS:
            raise BenchError(f"method.gqa_align={self.gqa_align!r}: allowed values are {', '.join(GQA_ALIGNS)}")

    def native_budget(self) -> bool:
        return self.protocol == "native"

    def alignment(self) -> str:
        """`gqa_align` resolved: original under protocol=native, group under matched, unless set."""
        if self.gqa_align != "auto":
            return self.gqa_align
        return "original" if self.protocol == "native" else "group"

    def remove_heads(self, g: LayerGeometry, r: float) -> int:
        """The original's head count (class docstring): C - int(C (1 - r)) root channels floored to whole heads,
        C = n_kv x head_dim (k_proj; = q_proj's on multi-head attention). q_heads, which the original lacks: the
        rule on q_proj's channels, floored to whole units (one query head of every group)."""
        q_heads = self.head_mode == "q_heads"
        c = (g.n_q if q_heads else g.n_kv) * g.head_dim
        removed = (c - int(c * (1 - r))) // g.head_dim
        return removed // g.n_kv if q_heads else removed

    def _unit_scores(self, li, g, scores):
        """kv_groups units as the base class (the true group's scores), or with `original` alignment on grouped
        heads the score of key/value head k plus query heads k, k + n_kv, ... (the removed heads stay k's group)."""
        units = super()._unit_scores(li, g, scores)
        if self.alignment() != "original" or g.n_q == g.n_kv:
            return units
        q, kv = list(map(float, scores["q"][li])), list(map(float, scores["kv"][li]))
        groups = g.n_q // g.n_kv
        return [(sum(q[k + m * g.n_kv] for m in range(groups)) + kv[k], members, own)
                for k, (_, members, own) in enumerate(units)]

    def departures(self) -> list[str]:
        if self.protocol != "native":
            return []
        out = ["scores in float32 on every model, as hf_prune.py on the README's --device cpu; llama3.py (grouped "
               "heads) loads the model in float16 (llama3.py:40-46) and scores in it"]
        if self.taylor in ("param_second", "param_mix"):
            out.append(f"taylor={self.taylor}: the squared per-sample gradients are folded per channel "
                       "(param_second) or accumulated in the model dtype (param_mix), the scored weights only; the "
                       "original keeps .grad and .acc_grad of every parameter (hf_prune.py:130-148)")
        if self.head_mode == "q_heads":
            out.append("head_mode=q_heads (query heads evenly from every group) has no counterpart in the original, "
                       "which removes whole key/value groups (llama3.py)")
        if self.alignment() == "group":
            out.append("gqa_align=group: a key/value head is scored with its true query group; the original folds "
                       "query heads k, k + n_kv, ... onto it (hf_llama_pruner.py:332-340)")
        return out

    def score_key(self, budget=None, model=None) -> dict:
        return super().score_key(budget, model) | {"taylor": self.taylor}

    def score(self, model, calib_ids, budget=None) -> dict:
        return wc.taylor_scores(model, calib_ids, self.taylor)


@register("magnitude_width")
@dataclass
class MagnitudeWidth(WidthPruner):
    """Data-free L2 magnitude of each head and channel (torch-pruning's LLM example), uniform per layer."""

    criterion: ClassVar[str] = "magnitude"
    needs_calib: ClassVar[bool] = False

    def score(self, model, calib_ids, budget=None) -> dict:
        return wc.magnitude_scores(model)

    def departures(self) -> list[str]:
        return ["no native budget rule: the counts are matched to depth's parameters as under protocol=matched "
                "(torch-pruning's example takes one uniform pruning ratio)"]


@register("wanda_sp")
@dataclass
class WandaSP(WidthPruner):
    """Wanda-sp: |W| x ||X|| per o_proj / down_proj input channel, uniform, layers scored and pruned in sequence
    (so the scores depend on the counts, which the budget fixes). protocol=native: its own rule, int(p x heads)
    heads and int(p x C) channels removed from every layer with p the cell's ratio (FLAP repo lib/prune.py
    prune_wanda_sp), not matched to depth's count (the plan still reports that target and the gap to it)."""

    criterion: ClassVar[str] = "wanda_sp"

    def remove_count(self, n: int, r: float) -> int:
        """Wanda-sp removes int(r n) (FLAP repo's thresholds)."""
        return int(r * n)

    def departures(self) -> list[str]:
        if self.protocol != "native":
            return []
        out = ["pruned units are removed physically; the shipped scripts/llama_7b.sh passes --unstr, which only "
               "zeroes them (same outputs, dense shapes)",
               "o_proj / down_proj carry no bias: the original's main.py get_llm gives every layer zero biases "
               "(2 x hidden params per layer, no effect on outputs)"]
        if getattr(self, "_grouped", False):
            out.append(f"grouped-query attention (head_mode={self.head_mode}): int(p x units) of its head units per "
                       "layer, a unit being a key/value group with its query heads (kv_groups) or one query head "
                       "of every group (q_heads); the original handles multi-head attention only")
        return out

    def native_budget(self) -> bool:
        return self.protocol == "native"

    def plan(self, scores, budget, model=None) -> WidthPlan:
        self._grouped = any(g.n_q != g.n_kv for g in model_geometry(model))  # for departures()
        return super().plan(scores, budget, model)

    def score_key(self, budget=None, model=None) -> dict:
        counts = self.counts(model_geometry(model), budget)
        return super().score_key(budget, model) | {"counts": sorted(counts.items())}

    def score(self, model, calib_ids, budget=None) -> dict:
        self.resolve_head_mode(model)
        geo = model_geometry(model)
        counts = self.counts(geo, budget)

        def select(li, scores):
            spec = self._select_layer(li, geo[li], scores, counts.get(li, (0, 0)))
            return head_rows(spec["remove_q"], geo[li].head_dim), torch.tensor(spec["remove_channels"],
                                                                                  dtype=torch.long)
        return wc.wanda_sp_scores(model, calib_ids, select, self.batch_size)


@register("flap")
@dataclass
class FLAP(WidthPruner):
    """FLAP: fluctuation metric, adaptive structure across layers (AL-AM), bias compensation. protocol=native
    follows FLAP's code (lib/prune.py prune_flap --metrics WIFV --structure AL-AM, lib/layerwrapper.py BiasGPT):
    its in-place fluctuation update, its global threshold at (1 - p) of the weighted metric mass with p the cell's
    ratio (not matched to depth's count: the plan still reports that target and the gap to it), its fp16
    compensation means; `departures` lists what still differs."""

    criterion: ClassVar[str] = "flap"
    head_reduce: ClassVar[str] = "mean"  # FLAP's head score is a mean over its channels
    bias: bool = True                    # bias compensation

    def __post_init__(self):
        super().__post_init__()
        if self.head_mode == "q_heads":
            raise BenchError("method.head_mode=q_heads: flap's adaptive structure removes whole key/value groups; "
                             "allowed values for flap are kv_groups")

    def departures(self) -> list[str]:
        if self.protocol != "native":
            return []
        out = ["a layer keeps its best head unit (and MLP channel) where the global threshold would remove them "
               "all, so every attention keeps a key/value cache; the original (lib/prune.py prune_flap) can empty "
               "a layer",
               "pruned units are removed physically; the shipped scripts/llama_7b.sh passes --unstr, which only "
               "zeroes them (same outputs, dense shapes)",
               "only an o_proj / down_proj that loses units gets a (compensation) bias: the original's main.py "
               "get_llm gives every layer both biases, zero where nothing is removed (2 x hidden params per layer)",
               "statistics accumulate in float64 (the original: float32 accumulators over fp16 activations)"]
        if getattr(self, "_grouped", False):
            out.append("grouped-query attention: a head unit is a key/value group with its query heads, scored by "
                       "the mean of its query heads and weighted int(params(group) / params(channel)); the original "
                       "handles multi-head attention only (its 512/3 is an MHA head of LLaMA)")
        if getattr(self, "_structural", False):
            out.append("shape-only plan (no scores): FLAP's uniform structure (--structure UL-UM: int(p x heads) "
                       "and int(p x channels) per layer, lowest indices, no compensation bias), as AL-AM needs "
                       "calibration statistics")
        return out

    def score_key(self, budget=None, model=None) -> dict:
        key = super().score_key(budget, model)
        return (key | {"fluctuation": "in_place"}) if self.protocol == "native" else key

    def score(self, model, calib_ids, budget=None) -> dict:
        return wc.flap_scores(model, calib_ids, self.batch_size, in_place=self.protocol == "native")

    def remove_count(self, n: int, r: float) -> int:
        """native (the structure-only plan, UL-UM): int(r n), FLAP's uniform thresholds; matched: the base rule."""
        return int(r * n) if self.protocol == "native" else super().remove_count(n, r)

    def native_budget(self) -> bool:
        """native: FLAP's own rule at the cell's ratio (the base's structural plan then takes the uniform
        int(p n) counts, FLAP's UL-UM), not matched to depth's count."""
        return self.protocol == "native"

    def plan(self, scores, budget, model=None) -> WidthPlan:
        self._structural = scores is None  # for departures()
        self._grouped = any(g.n_q != g.n_kv for g in model_geometry(model))
        return super().plan(scores, budget, model)

    def allocate(self, geo, scores, budget, structural):
        """FLAP's adaptive structure: which head units and channels each layer loses (`_matched_removals` or, under
        native, `_native_removals`); each pruned module gets the mean inputs of its removed columns (the
        compensation bias W[:, R] x_mean[R], lib/prune.py compress), rounded to fp16 under native as FLAP stores
        them (`baseline_inp.type(torch.half)`)."""
        units = {li: self._unit_scores(li, geo[li], scores) for li in self.layers(len(geo))}
        if self.protocol == "native":
            out = self._native_removals(geo, units, scores, budget.ratio)
        else:
            out = self._matched_removals(geo, units, scores, budget)
        layers = {li: {k: sorted(v) for k, v in spec.items()} for li, spec in out.items()}

        def mean(key, li, cols):  # native: fp16, as FLAP keeps baseline_inp (lib/prune.py, .type(torch.half))
            vals = [scores[key][li][j] for j in cols]
            if self.protocol == "native":
                return torch.tensor(vals, dtype=torch.float64).half().double().tolist()
            return vals
        for li, spec in layers.items():
            if self.bias:
                cols = head_rows(spec["remove_q"], geo[li].head_dim).tolist()
                spec["o_bias_mean"] = mean("o_mean", li, cols) if cols else None
                spec["down_bias_mean"] = (mean("down_mean", li, spec["remove_channels"])
                                          if spec["remove_channels"] else None)
        return layers, None

    def _matched_removals(self, geo, units, scores, budget) -> dict[int, dict]:
        """AL-AM matched to the budget: the head units and channels of all layers ranked together by standardised
        score and removed lowest first, each weighted by its parameters (FLAP's 512/3 per MHA head of LLaMA-7B, in
        general params(unit) / params(channel)), stopping where the removed parameters, net of the compensation
        biases the pruned modules gain, come closest to the budget. A layer keeps at least one head unit and one
        channel."""
        need = budget.dense_params - self.target(budget)
        ranked = sorted([(u[0], 0, li, k) for li, us in units.items() for k, u in enumerate(us)]
                        + [(float(x), 1, li, j) for li in units for j, x in enumerate(scores["channel"][li])])
        taken = {li: [0, 0] for li in units}  # head units, channels removed so far
        order, removed, best = [], 0, (abs(need), 0)
        for _, is_channel, li, idx in ranked:
            if removed >= need:
                break
            g, t = geo[li], taken[li]
            if t[is_channel] == (g.channels if is_channel else g.n_kv) - 1:
                continue
            gets_bias = self.bias and t[is_channel] == 0 and not (g.down_bias if is_channel else g.o_bias)
            removed += (g.channel_params if is_channel else head_units(g, "kv_groups")[1]) - gets_bias * g.hidden
            t[is_channel] += 1
            order.append((li, is_channel, idx))
            if abs(need - removed) < best[0]:
                best = (abs(need - removed), len(order))
        out = {li: {"remove_q": [], "remove_kv": [], "remove_channels": []} for li in units}
        for li, is_channel, idx in order[:best[1]]:
            if is_channel:
                out[li]["remove_channels"].append(idx)
            else:
                out[li]["remove_q"] += units[li][idx][1]
                out[li]["remove_kv"] += units[li][idx][2]
        return out

    def _native_removals(self, geo, units, scores, p: float) -> dict[int, dict]:
        """FLAP's AL-AM rule (lib/prune.py prune_flap): every head unit and channel of the prunable layers sorted
        by score, highest first, a head unit weighing int(params(unit) / params(channel)) channels (FLAP's 512/3
        for an MHA head of LLaMA, written into an int64 tensor, so 170); the threshold is the score of the first
        unit at which the cumulative weight comes closest to (1 - p) of the total weight (torch.argmin), and only
        units scoring strictly above it are kept (`metric > threshold`), so the threshold unit goes too.
        Departure: a layer the threshold would empty keeps its best head unit (channel)."""
        ranked = []  # (score, weight)
        for li, us in units.items():
            weight = int(head_units(geo[li], "kv_groups")[1] / geo[li].channel_params)
            ranked += [(u[0], weight) for u in us] + [(float(x), 1) for x in scores["channel"][li]]
        ranked.sort(key=lambda e: -e[0])
        goal, cum, best = (1 - p) * sum(w for _, w in ranked), 0, (float("inf"), 0)
        for i, (_, w) in enumerate(ranked):
            cum += w
            if abs(cum - goal) < best[0]:
                best = (abs(cum - goal), i)
        threshold = ranked[best[1]][0]
        out = {}
        for li, us in units.items():
            heads = [k for k, u in enumerate(us) if not u[0] > threshold]
            if len(heads) == len(us):
                heads.remove(max(heads, key=lambda k: (us[k][0], -k)))
            ch = [float(x) for x in scores["channel"][li]]
            chans = [j for j, x in enumerate(ch) if not x > threshold]
            if len(chans) == len(ch):
                chans.remove(max(chans, key=lambda j: (ch[j], -j)))
            out[li] = {"remove_q": [q for k in heads for q in us[k][1]],
                       "remove_kv": [kv for k in heads for kv in us[k][2]], "remove_channels": chans}
        return out
