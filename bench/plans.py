"""Plans: the typed, JSON-serializable decision a method makes and surgery applies.

A method scores units, then returns one of these; `bench.surgery` applies it; the runner writes it as plan.json
(`to_json`) and replays a saved one with `plan_file=` (`from_json`, which picks the class by the plan's own
`kind`). A plan holds only the method's decision and what it predicts; what the run achieved (the counted
parameters, the calibration used, whether the scores came from the cache) goes into the records.

    kind    class       what surgery does
    dense   DensePlan   nothing
    depth   DepthPlan   removes whole decoder blocks (`remove`)
    width   WidthPlan   removes heads and MLP channels per layer (`layers`), adds FLAP's compensation biases
    slice   SlicePlan   rotates the residual stream and slices it to `dims` (SliceGPT)

    python -c "import json, bench.plans as p; print(p.from_json(json.load(open('plan.json'))))"
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, ClassVar

from bench import BenchError


@dataclass
class Plan:
    """Fields every pruning plan has: the parameter count it aims at and the count it predicts (exact: surgery
    must reach it), and whether that is within the match tolerance of the target."""

    kind: ClassVar[str] = ""

    def to_json(self) -> dict[str, Any]:
        """`kind` first, then the fields in order; tensors (SliceGPT's bases) are summarised by write_json."""
        return {"kind": self.kind} | {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}


@dataclass
class DensePlan(Plan):
    kind: ClassVar[str] = "dense"


@dataclass
class DepthPlan(Plan):
    """Remove decoder blocks `remove` of `n_layers`; `order` is the full ranking (least important first) among
    the blocks the keep-set allows, or for iterative criteria (SLEB) the removal order."""

    kind: ClassVar[str] = "depth"
    criterion: str | None
    n_layers: int
    remove: list[int]
    keep: list[int]
    order: list[int]
    keep_first: int
    keep_last: int
    target_params: int
    predicted_params: int
    budget_matched: bool = True
    extra: dict[str, Any] = field(default_factory=dict)   # method-specific facts (a seed, SLEB's steps)


@dataclass
class WidthPlan(Plan):
    """Per decoder layer (key: its index as a string, JSON's only key type), the query heads, key/value heads
    and MLP channels to remove, and FLAP's compensation inputs (`o_bias_mean`, `down_bias_mean`: the mean input
    of each removed o_proj / down_proj column, or None). `uniform` holds the counts when every pruned layer
    loses the same (None for FLAP's adaptive structure)."""

    kind: ClassVar[str] = "width"
    criterion: str | None
    head_mode: str
    round_to: int | None
    budget_match: str
    uniform: dict[str, Any] | None
    target_params: int
    predicted_params: int
    gap_params: int
    budget_matched: bool
    layers: dict[str, dict[str, Any]]


@dataclass
class SlicePlan(Plan):
    """SliceGPT: the residual width `dims` per site (`embed`, `mid<i>`, `out<i>`) and the bases, one
    [h, dims[site]] tensor per site (`rotations`; None = identity bases, the shape-only / reload case). plan.json
    keeps only each basis's shape and sha256: the tensors live in the score cache."""

    kind: ClassVar[str] = "slice"
    criterion: str | None
    hidden_dense: int
    hidden: int
    slicing_fraction: float
    sparsity: float | None
    round_to: int
    budget_match: str
    dims: dict[str, int]
    target_params: int
    predicted_params: int
    gap_params: int
    budget_matched: bool
    rotations: dict[str, Any] | None = None


PLAN_KINDS: dict[str, type[Plan]] = {cls.kind: cls for cls in (DensePlan, DepthPlan, WidthPlan, SlicePlan)}


def from_json(data: dict[str, Any]) -> Plan:
    """The plan a plan.json holds, as its own kind's class; unknown keys are refused (a plan of another version
    or a hand edit with a typo), and a SliceGPT plan's summarised bases come back as None (identity)."""
    kind = data.get("kind")
    if kind not in PLAN_KINDS:
        raise BenchError(f"plan kind={kind!r}: allowed values are {', '.join(PLAN_KINDS)}")
    cls = PLAN_KINDS[kind]
    names = {f.name for f in dataclasses.fields(cls)}
    fields = {k: v for k, v in data.items() if k != "kind"}
    unknown = sorted(set(fields) - names)
    if unknown:
        raise BenchError(f"plan key {unknown[0]!r} is not a field of a {kind} plan; allowed: "
                         f"{', '.join(sorted(names))}")
    if kind == "slice" and fields.get("rotations") is not None:
        summarised = any(isinstance(r, dict) for r in fields["rotations"].values())
        fields["rotations"] = None if summarised else fields["rotations"]
    try:
        return cls(**fields)
    except TypeError as e:
        raise BenchError(f"a {kind} plan needs the fields {', '.join(sorted(names))} ({e})") from e
