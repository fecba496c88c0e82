"""A worked example of adding a pruning method: remove k *random* blocks (a sanity floor every criterion must beat).

A method is one class implementing the contract of bench/methods/base.py, plus one YAML in conf/method/ whose
`impl` names the class as `module:Class` (or a short name registered in bench/methods/__init__.py). Its other
keys are the class's fields. This one needs no calibration data; the budget (how many blocks) comes from
bench/budget.py, the removal from bench/surgery.py, the records and tables from the runner.

    python -m bench method=depth_random ratio=0.2                       # conf/method/depth_random.yaml
    python -m bench -m method=depth_ppl,depth_random ratio=0.2,0.35     # beside a real criterion
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from bench import BenchError
from bench.budget import Budget
from bench.surgery import remove_blocks


@dataclass
class RandomBlocks:
    name: str = "depth_random"
    seed: int = 0                 # which random blocks
    keep_first: int = 4           # never remove the first 4 and last 2 blocks (the paper's "+" keep-set)
    keep_last: int = 2
    calib = None                  # data-free: the runner draws no calibration text
    prunes = True

    @property
    def label(self) -> str:       # the row's name in tables
        return self.name

    def candidates(self, n_blocks: int) -> list[int]:
        return list(range(self.keep_first, n_blocks - self.keep_last))

    def check(self, budget: Budget, model=None) -> None:
        """Fail before any work when the budget cannot be met."""
        if budget.remove_blocks > len(self.candidates(budget.n_blocks)):
            raise BenchError(f"ratio={budget.ratio} removes {budget.remove_blocks} blocks, but only "
                             f"{len(self.candidates(budget.n_blocks))} may be removed: lower the ratio")

    def score_key(self, budget: Budget | None = None, model=None) -> dict:
        """Everything the scores depend on besides the model (the runner caches scores under it)."""
        return {"impl": "random_blocks", "seed": self.seed}

    def score(self, model, calib_ids, budget: Budget | None = None) -> list[float]:
        """One score per block, lower = removed first: here a seeded random number."""
        rng = random.Random(self.seed)
        return [rng.random() for _ in model.model.layers]

    def plan(self, scores: list[float] | None, budget: Budget, model=None) -> dict:
        """The decision, JSON-serializable. scores=None (shape-only mode): the last candidates."""
        scores = scores or [-b for b in range(budget.n_blocks)]
        order = sorted(self.candidates(budget.n_blocks), key=lambda b: (scores[b], b))
        remove = sorted(order[:budget.remove_blocks])
        return {"kind": "depth", "criterion": "random", "seed": self.seed, "n_layers": budget.n_blocks,
                "remove": remove, "keep": [b for b in range(budget.n_blocks) if b not in remove],
                "target_params": budget.target_params, "predicted_params": budget.target_params,
                "budget_matched": True}

    def apply(self, model, plan: dict):
        return remove_blocks(model, plan["remove"])
