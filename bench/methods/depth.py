"""Depth pruning (Shortened LLaMA, Kim et al. 2024): rank whole decoder blocks, remove the k least important.

Criteria (shortened-llm src/anal_block_sensitivity_*.py; ../shared/docs/methods.md section 1), each returning one
score per block, lowest = least important:

    ppl        calibration perplexity of the model with only that block removed
    taylor     sum over the block's weights of |W * dL/dW| (one forward/backward over the calibration batch)
    magnitude  sum over the block's weights of |W| (no data)

The "+" keep-set of the official code (first 4 and last 2 blocks never removed) is on by default for every
criterion (`keep_first`, `keep_last`; set both to 0 to switch it off). Removal is one-shot from one ranking.

    python -m bench method=depth_ppl ratio=0.35
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from bench import BenchError
from bench.budget import Budget
from bench.methods.base import CalibSpec, as_calib
from bench.methods.grads import backward_folded
from bench.models import decoder_layers
from bench.evals.perplexity import token_nll
from bench.surgery import blocks_view, remove_blocks


@torch.no_grad()
def ppl_scores(model, ids: torch.Tensor, batch_size: int = 10) -> list[float]:
    """Calibration PPL with each block removed in turn, without paying L full forward passes.

    The blocks before block b compute the same hidden states whatever candidate is removed after them, so one
    dense forward records the input of every block; removing b then costs only blocks b+1..L-1 (run on the
    recorded input of b), the final norm and the head. Samples go through in batches, not one by one.
    Same scores as `ppl_scores_reference` (the official loop) to ~1e-6 relative in fp32."""
    n_layers = len(decoder_layers(model))
    nll = torch.zeros(n_layers, dtype=torch.float64)
    for chunk in ids.split(batch_size):
        chunk = chunk.to(model.device)
        # hidden[b] = input of block b; logits_to_keep=1: the dense logits are not needed
        hidden = model(chunk, output_hidden_states=True, logits_to_keep=1, use_cache=False).hidden_states
        for b in range(n_layers):
            with blocks_view(model, list(range(b + 1, n_layers))):
                nll[b] += token_nll(model, chunk, inputs_embeds=hidden[b]).double().sum().cpu()
    n_targets = ids.shape[0] * (ids.shape[1] - 1)
    return [math.exp(x / n_targets) for x in nll.tolist()]


@torch.no_grad()
def ppl_scores_reference(model, ids: torch.Tensor, rebuild: bool = True) -> list[float]:
    """The official PPL criterion as written (shortened-llm src/anal_block_sensitivity_ppl.py): for every block,
    build a copy of the model without it (`get_block_pruned_network`: a model from the shortened config, then the
    surviving weights copied in) and run one forward per sample. `rebuild=False` skips the copy and only hides
    the block. Kept as the baseline that `make bench-scoring` times `ppl_scores` against."""
    from transformers import AutoModelForCausalLM

    n_layers = len(decoder_layers(model))
    scores = []
    for b in range(n_layers):
        keep = [i for i in range(n_layers) if i != b]
        nll = torch.zeros((), dtype=torch.float64)
        with blocks_view(model, keep):
            if rebuild:
                pruned = AutoModelForCausalLM.from_config(model.config, dtype=model.dtype).to(model.device).eval()
                pruned.load_state_dict(model.state_dict())
            else:
                pruned = model
            for sample in ids:
                nll += token_nll(pruned, sample[None].to(model.device)).double().sum().cpu()
        scores.append(math.exp(nll.item() / (ids.shape[0] * (ids.shape[1] - 1))))
    return scores


def _block_weights(model):
    """(block index, weight tensor) for every weight of every block: the official scripts score parameters whose
    name contains "weight" (q, k, v, o, gate, up, down and both RMSNorms: 9 tensors per LLaMA block)."""
    for b, block in enumerate(decoder_layers(model)):
        for name, p in block.named_parameters():
            if "weight" in name:
                yield b, p


def taylor_scores(model, ids: torch.Tensor) -> list[float]:
    """Taylor+ block importance: sum |W * dL/dW| over each block's weights, from one forward/backward of the
    whole calibration batch (loss = mean next-token CE, as `model(x, labels=x).loss`). Each gradient is folded
    into its block's score as it arrives and freed; nothing outside the blocks gets a gradient."""
    scores = torch.zeros(len(decoder_layers(model)), dtype=torch.float64)

    def fold(b, p):
        def consume(grad):
            scores[b] += (p.detach().float() * grad.float()).abs().sum().double().cpu()
        return consume

    backward_folded(model, ids, {p: fold(b, p) for b, p in _block_weights(model)})
    return scores.tolist()


@torch.no_grad()
def magnitude_scores(model) -> list[float]:
    """Sum of |W| over each block's weights (no data)."""
    scores = [0.0] * len(decoder_layers(model))
    for b, p in _block_weights(model):
        scores[b] += p.detach().float().abs().sum(dtype=torch.float64).item()
    return scores


CRITERIA = ("ppl", "taylor", "magnitude")


@dataclass
class DepthPruner:
    name: str
    criterion: str
    keep_first: int = 4           # the "+" keep-set: first 4 and last 2 blocks are never removed
    keep_last: int = 2
    calib: CalibSpec | None = field(default_factory=CalibSpec)
    batch_size: int = 10          # calibration samples per forward in the PPL criterion
    prunes = True

    def __post_init__(self):
        if self.criterion not in CRITERIA:
            raise BenchError(f"method.criterion={self.criterion!r}: allowed values are {', '.join(CRITERIA)}")
        self.calib = as_calib(self.calib, needed=self.criterion != "magnitude")

    @property
    def label(self) -> str:
        """Row label: "+" marks the keep-set, as the paper's "Taylor+"."""
        return self.name + ("+" if self.keep_first or self.keep_last else "")

    def candidates(self, n_layers: int) -> list[int]:
        protected = set(range(self.keep_first)) | set(range(n_layers - self.keep_last, n_layers))
        return [b for b in range(n_layers) if b not in protected]

    def check(self, budget: Budget, model=None) -> None:
        n = len(self.candidates(budget.n_blocks))
        if budget.remove_blocks >= n:
            raise BenchError(f"ratio={budget.ratio} removes {budget.remove_blocks} of {budget.n_blocks} blocks, but "
                             f"only {n} may be removed (keep_first={self.keep_first}, keep_last={self.keep_last}): "
                             f"lower the ratio")

    def score_key(self, budget: Budget | None = None, model=None) -> dict:
        return {"impl": "depth", "criterion": self.criterion}  # the runner adds the calibration tokens

    def score(self, model, calib_ids, budget: Budget | None = None) -> list[float]:
        if self.criterion == "ppl":
            return ppl_scores(model, calib_ids, self.batch_size)
        if self.criterion == "taylor":
            return taylor_scores(model, calib_ids)
        return magnitude_scores(model)

    def plan(self, scores: list[float] | None, budget: Budget, model=None) -> dict:
        """Remove the budget's k lowest-scoring candidate blocks. scores=None (shape-only): the k candidates
        nearest the end, the region every criterion of the paper removes from (speed depends only on k)."""
        self.check(budget)
        n_layers, structural = budget.n_blocks, scores is None
        if structural:
            scores = [-b for b in range(n_layers)]
        # least important first; ties broken by block index so the plan is deterministic
        order = [b for b in sorted(range(n_layers), key=lambda b: (scores[b], b)) if b in self.candidates(n_layers)]
        remove = sorted(order[:budget.remove_blocks])
        return {"kind": "depth", "criterion": None if structural else self.criterion, "n_layers": n_layers,
                "keep_first": self.keep_first, "keep_last": self.keep_last, "order": order,
                "remove": remove, "keep": [b for b in range(n_layers) if b not in remove],
                "target_params": budget.target_params, "predicted_params": budget.target_params,
                "budget_matched": True}

    def apply(self, model, plan: dict):
        return remove_blocks(model, plan["remove"])
