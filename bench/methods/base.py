"""The method contract and the registry of runnable methods.

A method is a dataclass whose fields are its hyperparameters (conf/method/<name>.yaml sets them) and whose class
attributes tell the runner what it needs:

    kind         "dense" | "depth" | "width" | "slice": the plan it returns (bench.plans), what plan_file= accepts
    prunes       False only for the dense reference
    needs_calib  False for data-free criteria (magnitude, random): the runner then draws no calibration text
    layout       module paths inside a decoder block that the method reads or cuts (bench.models.check_layout
                 refuses a model without them in one line)
    native_score_dtype  (optional) the dtype its original scores and cuts in under protocol=native ("float32":
                 Taylor+, LLM-Pruner); the runner casts for scoring and back for evaluation

and whose methods are the four steps of a cell:

    check(budget, model)                 fail fast, before any scoring, on a budget or model it cannot handle
    score(model, calib, budget)          importance of every unit (lower = less important), JSON-serializable
                                         (or tensors with scores_format = "pt"); cached on disk by the runner
    plan(scores, budget, model) -> Plan  the decision (bench.plans); reads the model's shapes, never changes it.
                                         scores=None (shape-only mode, no data): the structure with units chosen
                                         by index, which is all that speed depends on
    apply(model, plan)                   physical removal through bench.surgery

`score_key(budget, model)` names everything the scores depend on besides the model and the calibration tokens
(which the runner hashes): the criterion, and the budget only for methods whose scoring is sequential. So a
sweep over ratios scores each (model, criterion, calibration) once.

Every method has a `protocol` field ("matched" | "native", the run's top-level key, set by build_method):
under `native` it follows its original code (budget rule, rounding, statistics) and `departures()` lists, for
the records, what still differs from that code and why.

`METHODS` maps every registry name (a method YAML's `impl`) to its class; `@register("name")` adds one. A new
criterion is a subclass of a family's class (DepthPruner, WidthPruner) plus a YAML; a new family is a module with
its class plus a YAML; a class outside the repo is named `impl: package.module:Class` (README).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar, Protocol

from bench.budget import Budget
from bench.plans import DensePlan, Plan

METHODS: dict[str, type] = {}


def register(name: str):
    """Class decorator: make `name` a runnable `impl` (conf/method/*.yaml)."""
    def add(cls: type) -> type:
        if name in METHODS and METHODS[name] is not cls:
            raise ValueError(f"method {name!r} is registered twice ({METHODS[name].__name__}, {cls.__name__})")
        METHODS[name] = cls
        return cls
    return add


PROTOCOLS = ("matched", "native")


@dataclass(frozen=True)
class CalibSpec:
    """A calibration set: `n_samples` windows of `seq_len` tokens of `dataset`, drawn with `seed` by `sampler` (the
    original code's rule, bench.data; None = the dataset's default, Shortened LLaMA's for BookCorpus), with a BOS
    token opening every window when `bos_every` (the official Gemma scripts' --add_bos_to_every)."""

    dataset: str = "bookcorpus"
    n_samples: int = 10
    seq_len: int = 128
    seed: int = 1234
    sampler: str | None = None
    bos_every: bool = False


def as_calib(value, needed: bool) -> CalibSpec | None:
    """A method's calibration spec from its config; None for a data-free criterion."""
    if not needed:
        return None
    return value if isinstance(value, CalibSpec) else CalibSpec(**dict(value or {}))


class Method(Protocol):
    kind: ClassVar[str]
    prunes: ClassVar[bool]
    needs_calib: ClassVar[bool]
    layout: ClassVar[tuple[str, ...]]
    name: str
    calib: CalibSpec | None
    protocol: str              # "matched" | "native" (set by build_method from the run config)

    @property
    def label(self) -> str: ...
    def departures(self) -> list[str]: ...     # under protocol=native: where it still differs from the original
    def check(self, budget: Budget, model=None) -> None: ...
    def score_key(self, budget: Budget | None = None, model=None) -> dict | None: ...
    def score(self, model, calib_ids, budget: Budget | None = None) -> Any: ...
    def plan(self, scores: Any, budget: Budget, model=None) -> Plan: ...
    def apply(self, model, plan: Plan) -> Any: ...


@register("dense")
@dataclass
class Dense:
    """The unpruned reference: no scoring, empty plan."""

    kind: ClassVar[str] = "dense"
    prunes: ClassVar[bool] = False
    needs_calib: ClassVar[bool] = False
    layout: ClassVar[tuple[str, ...]] = ()
    name: str = "dense"
    calib: CalibSpec | None = field(default=None)
    protocol: str = "matched"

    def departures(self) -> list[str]:
        return []

    @property
    def label(self) -> str:
        return self.name

    def check(self, budget, model=None):
        pass

    def score_key(self, budget=None, model=None):
        return None

    def score(self, model, calib_ids, budget=None):
        return None

    def plan(self, scores, budget, model=None) -> DensePlan:
        return DensePlan()

    def apply(self, model, plan):
        return model
