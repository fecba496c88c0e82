"""Budget: the one place a pruning ratio is turned into a parameter target.

`ratio` is the fraction of the decoder blocks' parameters to remove (the paper's convention: its "20%" of
LLaMA-7B is 6 of 32 blocks, "35%" is 11). Depth takes the block count nearest ratio x L (ties round up); the
parameters left after removing those blocks are the target every method is matched to. Counts are exact:
they come from the model's own parameters (a meta-device model when only the config is known).

    python -m bench.budget model=llama-7b ratio=0.2
    python -m bench.budget model=llama-7b ratio=0.25 method=llm_pruner protocol=native   # + that method's plan
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from decimal import ROUND_HALF_UP, Decimal

from bench import BenchError
from bench.models import count_params, decoder_layers


@dataclass(frozen=True)
class Budget:
    ratio: float               # requested fraction of the decoder blocks' parameters to remove
    dense_params: int          # all parameters of the unpruned model (embeddings and head included)
    n_blocks: int              # decoder blocks of the unpruned model
    params_per_block: int
    remove_blocks: int         # depth: blocks nearest ratio x n_blocks
    target_params: int         # params after removing remove_blocks blocks: what width methods match

    @property
    def block_params(self) -> int:
        return self.n_blocks * self.params_per_block


def resolve_budget(model, ratio: float) -> Budget:
    """The budget for `ratio` on `model` (real or meta)."""
    if not 0 < ratio < 1:
        raise BenchError(f"ratio={ratio}: must be in (0, 1), the fraction of decoder-block parameters to remove")
    sizes = {sum(p.numel() for p in block.parameters()) for block in decoder_layers(model)}
    if len(sizes) != 1:
        raise BenchError(f"decoder blocks differ in size ({sorted(sizes)}): a ratio needs a uniform base model")
    per_block = sizes.pop()
    n_blocks = len(decoder_layers(model))
    remove = int((Decimal(str(ratio)) * n_blocks).to_integral_value(rounding=ROUND_HALF_UP))
    if remove < 1:
        raise BenchError(f"ratio={ratio} removes no block of {n_blocks}: use a ratio of at least {0.5 / n_blocks:.3f}")
    dense = count_params(model)
    return Budget(ratio, dense, n_blocks, per_block, remove, dense - remove * per_block)


BUDGET_MATCHES = ("depth", "ratio")
MATCH_TOLERANCE = 0.005  # of the dense total: within it a pruned model counts as budget-matched


def check_budget_match(budget_match: str) -> None:
    if budget_match not in BUDGET_MATCHES:
        raise BenchError(f"method.budget_match={budget_match!r}: allowed values are {', '.join(BUDGET_MATCHES)}")


def match_target(budget: Budget, budget_match: str) -> int:
    """The parameter count a width method aims at: `depth` = what depth pruning reaches at this ratio (whole
    blocks); `ratio` = the dense count minus ratio x the decoder blocks' parameters."""
    check_budget_match(budget_match)
    if budget_match == "depth":
        return budget.target_params
    return budget.dense_params - round(budget.ratio * budget.block_params)


def is_matched(budget: Budget, params: int, target: int) -> bool:
    return abs(params - target) <= MATCH_TOLERANCE * budget.dense_params


def achieved(budget: Budget, params: int) -> dict:
    """What a pruned model achieved against the budget: its params and both removed fractions."""
    removed = budget.dense_params - params
    return {"params": params,
            "removed_frac_block_params": removed / budget.block_params,
            "removed_frac_total_params": removed / budget.dense_params}


def _main(argv: list[str]) -> None:
    from bench.config import compose
    from bench.models import build_from_config, hf_config

    from bench.methods import build_method

    cfg = compose(argv)
    if cfg.model.get("arch") is None:
        raise BenchError(f"model={cfg.model.name}: no `arch` in its config, so its budget needs the checkpoint")
    model = build_from_config(hf_config(cfg.model))
    budget = resolve_budget(model, float(cfg.ratio))
    rows = {"dense_params": budget.dense_params, "n_blocks": budget.n_blocks,
            "params_per_block": budget.params_per_block, "remove_blocks": budget.remove_blocks,
            "params_after": budget.target_params} | achieved(budget, budget.target_params)
    del rows["params"]
    method = build_method(cfg.method, cfg.protocol)
    if method.prunes:  # the method's structural plan (no data): its parameter count under this protocol
        method.check(budget, model)
        plan = method.plan(None, budget, model)
        rows |= {f"{method.label}_params": plan.predicted_params,
                 f"{method.label}_removed_frac_block_params": achieved(budget, plan.predicted_params)[
                     "removed_frac_block_params"]}
        if getattr(plan, "uniform", None):
            rows |= {f"{method.label}_{k}": v for k, v in plan.uniform.items()}
    width = max(len(k) for k in rows)
    print(f"{cfg.model.name} ratio={cfg.ratio} protocol={cfg.protocol}" +
          (f" method={method.label}" if method.prunes else ""))
    for key, value in rows.items():
        print(f"  {key:<{width}}  {value:.4f}" if isinstance(value, float) else f"  {key:<{width}}  {value}")


if __name__ == "__main__":
    try:
        _main(sys.argv[1:])
    except BenchError as e:
        sys.exit(f"error: {e}")
