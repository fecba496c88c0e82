"""Depth pruning (Shortened LLaMA, Kim et al. 2024): rank whole decoder blocks, remove the k least important.

Criteria (shortened-llm src/anal_block_sensitivity_*.py; ../shared/docs/methods.md section 1), each returning one
score per block, lowest = least important:

    ppl        calibration perplexity of the model with only that block removed
    taylor     sum over the block's weights of |W * dL/dW| (one forward/backward over the calibration batch)
    magnitude  sum over the block's weights of |W| (no data)

and the depth criteria published since (methods.md sections 8-10):

    block_influence  ShortGPT: sum over tokens of 1 - cos(h_b, h_b+1), the block's input and output
    angular          Gromov et al.: the contiguous run of k blocks whose input and output are closest in angle on
                     the last token, (1/pi) arccos cos(x_l, x_l+k), averaged over samples; one score per start l
    sleb             SLEB: iterative greedy, k times: remove the block whose removal gives the lowest calibration
                     loss, then re-score the rest; a block's score is the step that removed it

The "+" keep-set of the official code (first 4 and last 2 blocks never removed) is on by default for the paper's
criteria (`keep_first`, `keep_last`); the others keep their papers' own (none; SLEB: the first and last block).

    python -m bench method=depth_ppl ratio=0.35
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import ClassVar

import torch

from bench import BenchError
from bench.budget import Budget
from bench.methods.base import CalibSpec, as_calib, register
from bench.methods.grads import backward_folded
from bench.evals.perplexity import token_nll
from bench.models import DEPTH_LAYOUT, check_layout, decoder_layers
from bench.progress import bar
from bench.plans import DepthPlan
from bench.surgery import blocks_view, remove_blocks

log = logging.getLogger("bench.depth")


@torch.no_grad()
def ppl_scores(model, ids: torch.Tensor, batch_size: int = 10) -> list[float]:
    """Calibration PPL with each block removed in turn, without paying L full forward passes.

    The blocks before block b compute the same hidden states whatever candidate is removed after them, so one
    dense forward records the input of every block; removing b then costs only blocks b+1..L-1 (run on the
    recorded input of b), the final norm and the head. Samples go through in batches, not one by one.
    Same scores as `ppl_scores_reference` (the official loop) to ~1e-6 relative in fp32."""
    n_layers = len(decoder_layers(model))
    nll = torch.zeros(n_layers, dtype=torch.float64)
    chunks = ids.split(batch_size)
    with bar(total=len(chunks) * n_layers, desc="ppl per block", unit="block") as progress:
        for chunk in chunks:
            chunk = chunk.to(model.device)
            # hidden[b] = input of block b; logits_to_keep=1: the dense logits are not needed
            hidden = model(chunk, output_hidden_states=True, logits_to_keep=1, use_cache=False).hidden_states
            for b in range(n_layers):
                with blocks_view(model, list(range(b + 1, n_layers))):
                    nll[b] += token_nll(model, chunk, inputs_embeds=hidden[b]).double().sum().cpu()
                progress.update()
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


def _hidden_states(model, ids: torch.Tensor, batch_size: int, desc: str):
    """HF's hidden states (embeddings, then every block's output; the last final-normed) per calibration batch,
    with a progress bar over the batches."""
    for chunk in bar(ids.split(batch_size), desc=desc, unit="batch"):
        yield model(chunk.to(model.device), output_hidden_states=True, logits_to_keep=1,
                    use_cache=False).hidden_states


@torch.no_grad()
def block_influence_scores(model, ids: torch.Tensor, batch_size: int = 10) -> list[float]:
    """ShortGPT's Block Influence (shortgpt/metrics.py::block_influence): BI_b = sum over tokens of
    1 - cos(h_b, h_b+1) with HF's hidden states (h_L is the final-normed output, as in ShortGPT); a NaN cosine
    counts 0.5. Summed over every token of every calibration sample."""
    n_layers = len(decoder_layers(model))
    bi = torch.zeros(n_layers, dtype=torch.float64)
    for hidden in _hidden_states(model, ids, batch_size, "block influence"):
        for b in range(n_layers):
            cos = torch.nn.functional.cosine_similarity(hidden[b].float(), hidden[b + 1].float(), dim=-1)
            bi[b] += torch.nan_to_num(1 - cos, nan=0.5).double().sum().cpu()
    return bi.tolist()


@torch.no_grad()
def angular_distances(model, ids: torch.Tensor, n: int, batch_size: int = 10) -> list[float]:
    """Gromov et al.'s angular distance (after short-transformers' angular_distance_last_token): for every start
    l in 0..L-n, (1/pi) arccos(cos(x_l, x_l+n)) on the last token, x_l the input of block l (HF hidden states),
    averaged over samples. Index l = the run of blocks l..l+n-1."""
    n_layers = len(decoder_layers(model))
    total = torch.zeros(n_layers - n + 1, dtype=torch.float64)
    for hidden in _hidden_states(model, ids, batch_size, "angular distance"):
        last = torch.stack([h[:, -1].float() for h in hidden])  # [L + 1, batch, hidden]
        cos = torch.nn.functional.cosine_similarity(last[:-n], last[n:], dim=-1).clamp(-1, 1)
        total += (torch.arccos(cos) / math.pi).double().sum(dim=1).cpu()
    return (total / ids.shape[0]).tolist()


def sleb_order(model, ids: torch.Tensor, n: int, candidates: list[int], batch_size: int = 10) -> list[dict]:
    """SLEB's greedy removal (sleb.py::sleb): n times, score every remaining candidate by the calibration PPL
    with it removed as well (the same exp(mean NLL) ranking as SLEB's summed loss; prefix states reused as in
    `ppl_scores`), remove the best, repeat. The first and last *remaining* blocks are never candidates
    (early_barrier = latter_barrier = 1). Returns one {block, ppl} per step, in removal order. A bar counts
    the rounds; each round's candidate scoring has its own (`ppl_scores`)."""
    n_layers = len(decoder_layers(model))
    removed, steps = [], []
    for _ in bar(range(n), desc="sleb rounds", unit="round"):
        alive = [b for b in range(n_layers) if b not in removed]
        with blocks_view(model, alive):
            ppl = dict(zip(alive, ppl_scores(model, ids, batch_size)))
        allowed = [b for b in alive[1:-1] if b in candidates]
        best = min(allowed, key=lambda b: (ppl[b], b))
        removed.append(best)
        steps.append({"block": best, "ppl": ppl[best]})
        log.info("sleb step %d/%d: remove block %d (calibration PPL %.3f)", len(steps), n, best, ppl[best])
    return steps


@dataclass
class DepthPruner:
    """A depth criterion: rank whole decoder blocks, remove the budget's k least important ones. A criterion is a
    subclass that sets `criterion` and implements `score` (one float per block, lowest = removed first)."""

    kind: ClassVar[str] = "depth"
    prunes: ClassVar[bool] = True
    needs_calib: ClassVar[bool] = True
    layout: ClassVar[tuple[str, ...]] = DEPTH_LAYOUT
    criterion: ClassVar[str] = ""
    budget_dependent: ClassVar[bool] = False   # scores depend on how many blocks go (angular, SLEB)
    native_score_dtype: ClassVar[str | None] = None  # protocol=native: score (and cut) in this dtype
    name: str = ""
    keep_first: int = 4           # the "+" keep-set: first 4 and last 2 blocks are never removed
    keep_last: int = 2
    calib: CalibSpec | None = field(default_factory=CalibSpec)
    batch_size: int = 10          # calibration samples per forward in the PPL criterion
    protocol: str = "matched"     # matched | native (set by build_method from the run config)

    def __post_init__(self):
        self.name = self.name or self.criterion
        self.calib = as_calib(self.calib, needed=self.needs_calib)

    def departures(self) -> list[str]:
        """Under protocol=native: where this method still differs from its original code (into the records)."""
        return []

    @property
    def label(self) -> str:
        """Row label: "+" marks the official keep-set (first 4, last 2), as the paper's "Taylor+"."""
        return self.name + ("+" if (self.keep_first, self.keep_last) == (4, 2) else "")

    def candidates(self, n_layers: int) -> list[int]:
        protected = set(range(self.keep_first)) | set(range(n_layers - self.keep_last, n_layers))
        return [b for b in range(n_layers) if b not in protected]

    def check(self, budget: Budget, model=None) -> None:
        if model is not None:
            check_layout(model, self.layout, f"method={self.name}")
        n = len(self.candidates(budget.n_blocks))
        if budget.remove_blocks >= n:
            raise BenchError(f"ratio={budget.ratio} removes {budget.remove_blocks} of {budget.n_blocks} blocks, but "
                             f"only {n} may be removed (keep_first={self.keep_first}, keep_last={self.keep_last}): "
                             f"lower the ratio")

    def score_key(self, budget: Budget | None = None, model=None) -> dict:
        key = {"impl": "depth", "criterion": self.criterion}  # the runner adds the calibration tokens
        if self.budget_dependent:
            key |= {"n": budget.remove_blocks, "keep": [self.keep_first, self.keep_last]}
        return key

    def score(self, model, calib_ids, budget: Budget | None = None) -> list[float]:
        raise NotImplementedError

    def removal_order(self, scores: list[float], budget: Budget) -> list[int]:
        """The allowed blocks, least important first (ties broken by block index: a deterministic plan)."""
        allowed = set(self.candidates(budget.n_blocks))
        return [b for b in sorted(range(budget.n_blocks), key=lambda b: (scores[b], b)) if b in allowed]

    def plan(self, scores: list[float] | None, budget: Budget, model=None) -> DepthPlan:
        """Remove the budget's k lowest-scoring candidate blocks. scores=None (shape-only): the k candidates
        nearest the end, the region every criterion of the paper removes from (speed depends only on k)."""
        self.check(budget)
        structural = scores is None
        n_layers = budget.n_blocks
        order = (self.removal_order([-b for b in range(n_layers)], budget) if structural
                 else self.chosen_order(scores, budget))
        remove = sorted(order[:budget.remove_blocks])
        return DepthPlan(criterion=None if structural else self.criterion, n_layers=n_layers, remove=remove,
                         keep=[b for b in range(n_layers) if b not in remove], order=order,
                         keep_first=self.keep_first, keep_last=self.keep_last, target_params=budget.target_params,
                         predicted_params=budget.target_params)

    def chosen_order(self, scores: list[float], budget: Budget) -> list[int]:
        """The order the plan removes from; a criterion whose scores are not per block overrides it (angular)."""
        return self.removal_order(scores, budget)

    def apply(self, model, plan: DepthPlan):
        return remove_blocks(model, plan.remove)


@register("depth_ppl")
@dataclass
class DepthPPL(DepthPruner):
    """Shortened LLaMA's PPL criterion: calibration perplexity with the block removed."""

    criterion: ClassVar[str] = "ppl"

    def score(self, model, calib_ids, budget=None):
        return ppl_scores(model, calib_ids, self.batch_size)

    def departures(self) -> list[str]:
        return ["the calibration samples go through in batches of batch_size, each candidate running only the blocks "
                "after it on the recorded inputs (the original: a rebuilt model per block, one sample per forward; "
                "the same scores to 1e-6 in fp32, not bit-identical in fp16)"]


@register("depth_taylor")
@dataclass
class DepthTaylor(DepthPruner):
    """Shortened LLaMA's Taylor+ criterion: sum of |W * dL/dW| over the block's weights."""

    criterion: ClassVar[str] = "taylor"
    # protocol=native scores in fp32, as the official script does (anal_block_sensitivity_taylor.py: --device cpu,
    # so the model is never halved); the cell then evaluates in its own dtype
    native_score_dtype: ClassVar[str] = "float32"

    def score(self, model, calib_ids, budget=None):
        return taylor_scores(model, calib_ids)

    def departures(self) -> list[str]:
        return ["scored in fp32 on the cell's device (the original: fp32 on the CPU); gradients folded into the "
                "block scores as they arrive instead of kept"]


@register("depth_magnitude")
@dataclass
class DepthMagnitude(DepthPruner):
    """Shortened LLaMA's magnitude+ criterion: sum of |W| over the block's weights (no data)."""

    criterion: ClassVar[str] = "magnitude"
    needs_calib: ClassVar[bool] = False

    def score(self, model, calib_ids, budget=None):
        return magnitude_scores(model)


@register("block_influence")
@dataclass
class BlockInfluence(DepthPruner):
    """ShortGPT's Block Influence."""

    criterion: ClassVar[str] = "block_influence"

    def score(self, model, calib_ids, budget=None):
        return block_influence_scores(model, calib_ids, self.batch_size)


@register("angular")
@dataclass
class Angular(DepthPruner):
    """Gromov et al.'s angular distance: one score per start of a run of k blocks; the closest run goes."""

    criterion: ClassVar[str] = "angular"
    budget_dependent: ClassVar[bool] = True

    def score(self, model, calib_ids, budget=None):
        return angular_distances(model, calib_ids, budget.remove_blocks, self.batch_size)

    def chosen_order(self, scores: list[float], budget: Budget) -> list[int]:
        # scores[l] = distance across blocks l..l+k-1: the closest run that lies among the candidates
        k, allowed = budget.remove_blocks, set(self.candidates(budget.n_blocks))
        starts = [s for s in range(len(scores)) if all(b in allowed for b in range(s, s + k))]
        start = min(starts, key=lambda s: (scores[s], s))
        return list(range(start, start + k))


@register("sleb")
@dataclass
class SLEB(DepthPruner):
    """SLEB's greedy removal; a block's score is the step that removed it (the plan's order)."""

    criterion: ClassVar[str] = "sleb"
    budget_dependent: ClassVar[bool] = True

    def score(self, model, calib_ids, budget=None):
        n_layers = len(decoder_layers(model))
        steps = sleb_order(model, calib_ids, budget.remove_blocks, self.candidates(n_layers), self.batch_size)
        step = {s["block"]: i for i, s in enumerate(steps)}
        return [float(step.get(b, len(steps))) for b in range(n_layers)]
