"""The method contract: score units on calibration text, decide a plan, apply it.

    check(budget)                 fail fast, before any scoring, on a budget the method cannot meet
    score(model, calib) -> list   one importance per unit (lower = less important); cached on disk by the runner
    plan(scores, budget) -> dict  a JSON-serializable decision (plan.json): pure, no model mutation
    apply(model, plan)            physical removal through bench.surgery

`score_key()` names everything the scores depend on besides the model (criterion, calibration), so a sweep over
ratios scores each (model, criterion, calibration) once.
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


class Method(Protocol):
    name: str
    calib: CalibSpec | None

    @property
    def label(self) -> str: ...
    def check(self, budget: Budget) -> None: ...
    def score_key(self) -> dict | None: ...
    def score(self, model, calib_ids) -> list[float]: ...
    def plan(self, scores: list[float] | None, budget: Budget) -> dict[str, Any]: ...
    def apply(self, model, plan: dict[str, Any]) -> Any: ...


@dataclass
class Dense:
    """The unpruned reference: no scoring, empty plan."""

    name: str = "dense"
    calib: CalibSpec | None = field(default=None)
    label = "dense"
    prunes = False

    def check(self, budget):
        pass

    def score_key(self):
        return None

    def score(self, model, calib_ids):
        return None

    def plan(self, scores, budget):
        return {"kind": "dense"}

    def apply(self, model, plan):
        return model
