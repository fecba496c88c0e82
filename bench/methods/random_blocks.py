"""A worked example of adding a pruning method: remove k *random* blocks (a sanity floor every criterion must beat).

A new depth criterion is one subclass of `DepthPruner` that implements `score` (one number per block, lower =
removed first) plus one YAML in conf/method/ (or in your own config directory, added with `hydra.searchpath`)
whose `impl` names the class as `module:Class` or by its registered name. The YAML's other keys are the class's
fields. Everything else is inherited: the keep-set, the budget (how many blocks, bench/budget.py), the plan
(bench.plans.DepthPlan), the removal (bench/surgery.py), the records and the tables.

    python -m bench method=depth_random ratio=0.2                       # conf/method/depth_random.yaml
    python -m bench -m method=depth_ppl,depth_random ratio=0.2,0.35     # beside a real criterion
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import ClassVar

from bench.budget import Budget
from bench.methods.base import register
from bench.methods.depth import DepthPruner


@register("depth_random")
@dataclass
class RandomBlocks(DepthPruner):
    criterion: ClassVar[str] = "random"
    needs_calib: ClassVar[bool] = False   # data-free: the runner draws no calibration text
    name: str = "depth_random"
    seed: int = 0                         # which random blocks

    @property
    def label(self) -> str:               # the row's name in tables (no "+" suffix for the keep-set)
        return self.name

    def score_key(self, budget: Budget | None = None, model=None) -> dict:
        """Everything the scores depend on besides the model (the runner caches scores under it)."""
        return {"impl": "random_blocks", "seed": self.seed}

    def score(self, model, calib_ids, budget: Budget | None = None) -> list[float]:
        """One score per block, lower = removed first: here a seeded random number."""
        rng = random.Random(self.seed)
        return [rng.random() for _ in range(budget.n_blocks)]

    def plan(self, scores, budget: Budget, model=None):
        plan = super().plan(scores, budget, model)
        plan.extra["seed"] = self.seed
        return plan
