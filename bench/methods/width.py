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
        if need > most:
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
            h = min(self.remove_count(units, r), units - 1)
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
                own_rule = self.remove_count(units, c / g.channels) == h
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
        counts = self.solve_counts(geo, budget.dense_params, self.target(budget))
        layers = {li: self._select_layer(li, geo[li], scores, c) for li, c in counts.items()}
        first, (h, c) = next(iter(counts.items()))  # uniform: every prunable layer has the same counts
        return layers, {"head_units": h, "head_fraction": h / head_units(geo[first], self.head_mode)[0],
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
    """LLM-Pruner: Taylor importance of each head and channel over the weights it owns, uniform per layer."""

    criterion: ClassVar[str] = "llm_pruner"
    taylor: str = "param_first"   # element salience: param_first, param_second, param_mix, vectorize

    def __post_init__(self):
        super().__post_init__()
        if self.taylor not in wc.TAYLOR_VARIANTS:
            raise BenchError(f"method.taylor={self.taylor!r}: allowed values are {', '.join(wc.TAYLOR_VARIANTS)}")

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


@register("wanda_sp")
@dataclass
class WandaSP(WidthPruner):
    """Wanda-sp: |W| x ||X|| per o_proj / down_proj input channel, uniform, layers scored and pruned in sequence
    (so the scores depend on the counts, which the budget fixes)."""

    criterion: ClassVar[str] = "wanda_sp"

    def remove_count(self, n: int, r: float) -> int:
        """Wanda-sp removes int(r n) (FLAP repo's thresholds)."""
        return int(r * n)

    def score_key(self, budget=None, model=None) -> dict:
        counts = self.solve_counts(model_geometry(model), budget.dense_params, self.target(budget))
        return super().score_key(budget, model) | {"counts": sorted(counts.items())}

    def score(self, model, calib_ids, budget=None) -> dict:
        self.resolve_head_mode(model)
        geo = model_geometry(model)
        counts = self.solve_counts(geo, budget.dense_params, self.target(budget))

        def select(li, scores):
            spec = self._select_layer(li, geo[li], scores, counts.get(li, (0, 0)))
            return head_rows(spec["remove_q"], geo[li].head_dim), torch.tensor(spec["remove_channels"],
                                                                                  dtype=torch.long)
        return wc.wanda_sp_scores(model, calib_ids, select, self.batch_size)


@register("flap")
@dataclass
class FLAP(WidthPruner):
    """FLAP: fluctuation metric, adaptive structure across layers (AL-AM), bias compensation."""

    criterion: ClassVar[str] = "flap"
    head_reduce: ClassVar[str] = "mean"  # FLAP's head score is a mean over its channels
    bias: bool = True                    # bias compensation

    def __post_init__(self):
        super().__post_init__()
        if self.head_mode == "q_heads":
            raise BenchError("method.head_mode=q_heads: flap's adaptive structure removes whole key/value groups; "
                             "allowed values for flap are kv_groups")

    def score(self, model, calib_ids, budget=None) -> dict:
        return wc.flap_scores(model, calib_ids, self.batch_size)

    def allocate(self, geo, scores, budget, structural):
        """FLAP's AL-AM: the head units and channels of all layers ranked together by standardised score and
        removed lowest first, each weighted by its parameters (FLAP's 512/3 per MHA head of LLaMA-7B, in general
        params(unit) / params(channel)), stopping where the removed parameters, net of the compensation biases
        the pruned modules gain, come closest to the budget. A layer keeps at least one head unit and one
        channel. Each pruned module gets the mean inputs of its removed columns (the compensation bias)."""
        need = budget.dense_params - self.target(budget)
        units = {li: self._unit_scores(li, geo[li], scores) for li in self.layers(len(geo))}
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
        layers = {li: {k: sorted(v) for k, v in spec.items()} for li, spec in out.items()}
        for li, spec in layers.items():
            if self.bias:
                cols = head_rows(spec["remove_q"], geo[li].head_dim).tolist()
                spec["o_bias_mean"] = [scores["o_mean"][li][j] for j in cols] if cols else None
                spec["down_bias_mean"] = ([scores["down_mean"][li][j] for j in spec["remove_channels"]]
                                          if spec["remove_channels"] else None)
        return layers, None
