"""The method contract: score units on calibration text, decide a plan, apply it.

    check(budget, model)                 fail fast, before any scoring, on a budget the method cannot meet
    score(model, calib, budget)          importance of every unit (lower = less important), JSON-serializable;
                                         cached on disk by the runner
    plan(scores, budget, model) -> dict  a JSON-serializable decision (plan.json); reads the model's shapes,
                                         never changes it. scores=None (shape-only mode, no data) gives the
                                         method's structure with units chosen by index: what speed depends on
    apply(model, plan)                   physical removal through bench.surgery

`score_key(budget, model)` names everything the scores depend on besides the model and the calibration tokens
(which the runner hashes): the criterion, and the budget only for methods whose scoring is sequential. So a
sweep over ratios scores each (model, criterion, calibration) once.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

from bench.budget import Budget


@dataclass(frozen=True)
class CalibSpec:
    dataset: str = "bookcorpus"
    n_samples: int = 10
    seq_len: int = 128
    seed: int = 1234


def as_calib(value, needed: bool) -> CalibSpec | None:
    """A method's calibration spec from its config; None for a data-free criterion."""
    if not needed:
        return None
    return value if isinstance(value, CalibSpec) else CalibSpec(**dict(value or {}))


class Method(Protocol):
    name: str
    calib: CalibSpec | None

    @property
    def label(self) -> str: ...
    def check(self, budget: Budget, model=None) -> None: ...
    def score_key(self, budget: Budget | None = None, model=None) -> dict | None: ...
    def score(self, model, calib_ids, budget: Budget | None = None) -> Any: ...
    def plan(self, scores: Any, budget: Budget, model=None) -> dict[str, Any]: ...
    def apply(self, model, plan: dict[str, Any]) -> Any: ...


@dataclass
class Dense:
    """The unpruned reference: no scoring, empty plan."""

    name: str = "dense"
    calib: CalibSpec | None = field(default=None)
    label = "dense"
    prunes = False

    def check(self, budget, model=None):
        pass

    def score_key(self, budget=None, model=None):
        return None

    def score(self, model, calib_ids, budget=None):
        return None

    def plan(self, scores, budget, model=None):
        return {"kind": "dense"}

    def apply(self, model, plan):
        return model
