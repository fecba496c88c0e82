"""SliceGPT (Ashkboos et al., ICLR'24): rotate the residual stream onto its principal components and slice it.

    python -m bench method=slicegpt ratio=0.2

Every residual-stream site (the embeddings, each block's MLP input, each block's output) gets an orthogonal basis
Q: the eigenvectors of sum_tokens x^T x of the signal there (fp64, damped by 0.01 x mean diagonal), sorted by
eigenvalue. The pruned model works in the first d columns of each basis, so every matrix that reads or writes the
residual stream loses (h - d) rows or columns; each block gains two d x d shortcut matrices that carry the residual
from one basis to the next (../shared/docs/methods.md section 6). The bases are found sequentially, as the
original's `rotate_and_slice_sequential`: each site's signal is the one the already-sliced upstream produces.

Here that is computed without touching the model: an upstream slice is the projection x -> x Q_d Q_d^T, and an
unmodified block fed the projected signal computes exactly what the sliced block computes (its RMSNorm divides by
the full width, as SliceGPT's RMSN does). Scoring = the bases (`pca_rotations`); plan = the width d and the bases;
surgery (`bench.surgery.apply_slice_plan`) fuses the RMSNorm scales into the adjacent linears and rotates.

Budget: d (a multiple of `round_to`: 1 by default; 8 is the original's --round-interval, friendlier to kernels
but one step of 8 is 1.9M parameters on SmolLM2, coarser than the 0.5% match tolerance) is solved so the pruned
model's exact parameter count, shortcut matrices and the then untied lm_head included, is nearest depth pruning's
at the same ratio: the "slicing fraction" 1 - d/h is therefore larger than the ratio (the paper's 25% slicing removes only
~16% of LLaMA-7B). `sparsity=` instead takes the original's nominal rule d = floor((1 - s) h / round_to) x
round_to (with round_to=8 as the original).
lm_head is rotated but not sliced (the original's default). A model with tied embeddings pays for an untied
lm_head: on SmolLM2-135M that is V x h = 28M parameters, so its d is small.

Pre-norm LLaMA-style blocks only: Gemma 3 also normalises the attention and MLP outputs, and a norm on a branch
output is not invariant under the rotation, so it is refused with a one-line error.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import torch

from bench import BenchError
from bench.budget import MATCH_TOLERANCE, Budget, check_budget_match, is_matched, match_target
from bench.methods.base import CalibSpec, as_calib, register
from bench.methods.width_criteria import layer_inputs
from bench.models import SLICE_LAYOUT, check_layout, count_params, decoder_layers
from bench.plans import SlicePlan
from bench.progress import bar
from bench.surgery import apply_slice_plan, slice_sites

BRANCH_NORMS = ("pre_feedforward_layernorm", "post_feedforward_layernorm")  # Gemma 2/3 sandwich norms
DAMP = 0.01


def slice_dims(model, d: int, slice_head: bool = False) -> dict[str, int]:
    """Residual width per site for a uniform width d: every site sliced to d except the last block's output, which
    feeds the unsliced lm_head (`slice_head=False`, the original's default)."""
    n, h = len(decoder_layers(model)), model.config.hidden_size
    dims = {site: d for site in slice_sites(n)}
    if not slice_head:
        dims[f"out{n - 1}"] = h
    return dims


def _linear_params(lin, rows: int, cols: int) -> int:
    return rows * cols + (rows if lin.bias is not None else 0)


def sliced_param_count(model, dims: dict[str, int]) -> int:
    """Exact parameter count of `model` after `apply_slice_plan` with these widths, from its current shapes:
    everything that touches the residual stream is resized, RMSNorm scales fold away, two shortcut matrices per
    block appear, and a tied lm_head becomes its own matrix."""
    emb, head, layers = model.get_input_embeddings(), model.get_output_embeddings(), decoder_layers(model)
    touched = {id(p): p.numel() for m in (emb, head, model.model.norm) for p in m.parameters()}
    new = emb.num_embeddings * dims["embed"] + _linear_params(head, head.out_features, dims[f"out{len(layers) - 1}"])
    d_in = dims["embed"]
    for i, layer in enumerate(layers):
        attn, mlp = layer.self_attn, layer.mlp
        d_mid, d_out = dims[f"mid{i}"], dims[f"out{i}"]
        # the modules that read or write the stream; others (Qwen3's per-head q_norm / k_norm) keep their size
        for m in (attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj, mlp.gate_proj, mlp.up_proj, mlp.down_proj,
                  layer.input_layernorm, layer.post_attention_layernorm):
            touched |= {id(p): p.numel() for p in m.parameters()}
        new += sum(_linear_params(lin, lin.out_features, d_in) for lin in (attn.q_proj, attn.k_proj, attn.v_proj))
        new += _linear_params(attn.o_proj, d_mid, attn.o_proj.in_features)
        new += sum(_linear_params(lin, lin.out_features, d_mid) for lin in (mlp.gate_proj, mlp.up_proj))
        new += _linear_params(mlp.down_proj, d_out, mlp.down_proj.in_features)
        new += d_in * d_mid + d_mid * d_out  # the shortcut matrices
        d_in = d_out
    return count_params(model) - sum(touched.values()) + new


def _pca(signals: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """(eigenvalues, eigenvectors as columns), descending, of sum over all tokens of x^T x, in fp64 with the
    original's damping."""
    gram = None
    for x in signals:
        x = x.reshape(-1, x.shape[-1]).double()
        gram = x.T @ x if gram is None else gram + x.T @ x
    gram.diagonal().add_(DAMP * gram.diagonal().mean())
    values, vectors = torch.linalg.eigh(gram)
    order = values.argsort(descending=True)
    return values[order], vectors[:, order]


def _project(x: torch.Tensor, basis: torch.Tensor) -> torch.Tensor:
    """x restricted to the span of `basis`'s columns, in the original coordinates: what a sliced stream carries."""
    b = basis.to(x.device)
    return ((x.double() @ b) @ b.T).to(x.dtype)


@torch.no_grad()
def pca_rotations(model, ids: torch.Tensor, dims: dict[str, int], batch_size: int = 16) -> dict:
    """The sequential SliceGPT bases: {"rotations": {site: Q[:, :d] (fp32, CPU)}, "eigenvalues": {site: [...]}}.
    Sites: `embed` (block 0's input), `mid<i>` (block i's MLP input), `out<i>` (block i's output)."""
    rotations, eigenvalues = {}, {}

    def slice_site(site: str, signals: list[torch.Tensor]) -> list[torch.Tensor]:
        values, vectors = _pca(signals)
        basis = vectors[:, :dims[site]].cpu()
        rotations[site], eigenvalues[site] = basis.float(), values.cpu().tolist()
        return [_project(x, basis) for x in signals]

    batches = layer_inputs(model, ids, batch_size)
    xs = slice_site("embed", [x for x, _ in batches])
    for i, layer in enumerate(bar(decoder_layers(model), desc="slicegpt pca", unit="block")):
        mids = [x + layer.self_attn(hidden_states=layer.input_layernorm(x), **kw)[0] for x, (_, kw) in zip(xs, batches)]
        mids = slice_site(f"mid{i}", mids)
        outs = [m + layer.mlp(layer.post_attention_layernorm(m)) for m in mids]
        xs = slice_site(f"out{i}", outs)
    return {"rotations": rotations, "eigenvalues": eigenvalues}


@register("slicegpt")
@dataclass
class SlicePruner:
    """SliceGPT. protocol=matched (and native with an explicit `sparsity`): as the module says. protocol=native
    without `sparsity`: the original's budget rule, d from the nominal slicing fraction s = the cell's ratio at
    round interval 8 (experiments/run_slicegpt.py::slicing_main); plan.target_params stays depth's count for
    reference and budget_matched says honestly whether d lands within the tolerance (on LLaMA-7B at 0.2 it does
    not: with the shortcut matrices and the unsliced lm_head, d = 3272 removes 9.4% of the parameters)."""

    kind: ClassVar[str] = "slice"
    native_round_interval: ClassVar[int] = 8   # run_slicegpt.py's --round-interval default
    prunes: ClassVar[bool] = True
    needs_calib: ClassVar[bool] = True
    layout: ClassVar[tuple[str, ...]] = SLICE_LAYOUT
    scores_format: ClassVar[str] = "pt"   # the bases are tensors: the runner caches them with torch.save
    name: str = "slicegpt"
    round_to: int = 1                  # d is a multiple of this (8: the original's --round-interval)
    sparsity: float | None = None      # null: d solved for the budget; a number: the original's nominal slicing
    budget_match: str = "depth"        # depth: depth's achieved params at this ratio; ratio: ratio x block params
    calib: CalibSpec | None = field(default_factory=CalibSpec)
    batch_size: int = 16               # calibration samples per forward
    protocol: str = "matched"          # matched | native (set by build_method from the run config)

    def departures(self) -> list[str]:
        """Under protocol=native: where this method still differs from its original code (into the records).
        The budget rule, the round interval, the unsliced lm_head, the fp64 damped PCA and the sequential order are
        the original's; what remains is below."""
        out = ["PCA signals: each site's signal is the unmodified block fed the projected stream, in the model's "
               "dtype (equal in exact arithmetic to rotate.py::rotate_and_slice_sequential running the already "
               "sliced, rotated blocks); the bases are cached in fp32 and applied in fp64 (the original: its fp64 Q)",
               "final orientation: the PCA eigenvectors as they are (run_slicegpt.py's default "
               "--final-orientation random multiplies each kept basis by a random d x d orthogonal matrix: the same "
               "span, so the same function in exact arithmetic, other rounding)",
               "models: every pre-norm LLaMA-style decoder; a tied embedding is untied into its own V x h lm_head "
               "(the original's adapters: Llama-2/3 by hub name, OPT, Phi-2/3)"]
        if self.calib is not None and self.calib.sampler is None:
            out.insert(0, f"calibration: {self.calib.n_samples} x {self.calib.seq_len} {self.calib.dataset} "
                          f"tokens, seed {self.calib.seed}, drawn by bench.data's default sampler, not "
                          f"data_utils.prepare_dataloader's (random starting rows joined with \\n\\n until "
                          f"max_seqlen, re-tokenized with BOS, torch seed)")
        return out

    def __post_init__(self):
        check_budget_match(self.budget_match)
        if self.sparsity is not None and not 0 <= self.sparsity < 1:
            raise BenchError(f"method.sparsity={self.sparsity}: allowed values are null or a number in [0, 1)")
        if self.round_to < 1:
            raise BenchError(f"method.round_to={self.round_to}: must be a positive integer")
        self.calib = as_calib(self.calib, needed=self.needs_calib)

    @property
    def label(self) -> str:
        return self.name

    # --- deciding ------------------------------------------------------------------------------------------

    def target(self, budget: Budget) -> int:
        return match_target(budget, self.budget_match)

    @property
    def interval(self) -> int:
        """The multiple d is rounded to: `round_to`, except that protocol=native turns the default 1 into the
        original's --round-interval 8 (TransformerCompression experiments/run_slicegpt.py)."""
        return self.native_round_interval if self.protocol == "native" and self.round_to == 1 else self.round_to

    def nominal_sparsity(self, budget: Budget | None) -> float | None:
        """The slicing fraction of the original's nominal rule, or None when d is solved for the budget: an
        explicit `sparsity`, else under protocol=native the cell's ratio (run_slicegpt.py takes --sparsity as
        the fraction of the hidden width to slice, not of the parameters)."""
        if self.sparsity is not None:
            return self.sparsity
        return budget.ratio if self.protocol == "native" and budget is not None else None

    def width(self, budget: Budget, model) -> int:
        """The sliced width d: nominal, d = int((1 - s) h) rounded down to a multiple of the interval
        (run_slicegpt.py::slicing_main, then ConstSlicingScheduler(d) at every site), or the multiple of the
        interval whose exact parameter count is nearest the budget's target (ties: the larger d)."""
        h, step, sparsity = model.config.hidden_size, self.interval, self.nominal_sparsity(budget)
        if sparsity is not None:
            return max(step, int((1 - sparsity) * h) // step * step)
        target = self.target(budget)
        widths = sorted(set(range(step, h, step)) | {h})
        return min(widths, key=lambda d: (abs(sliced_param_count(model, slice_dims(model, d)) - target), -d))

    def check(self, budget: Budget, model=None) -> None:
        if model is None:
            return
        check_layout(model, self.layout, f"method={self.name}")
        layer = decoder_layers(model)[0]
        branch = [name for name in BRANCH_NORMS if hasattr(layer, name)]
        if branch:
            raise BenchError(f"method=slicegpt: {model.config.model_type} blocks normalise their branch outputs "
                             f"({branch[0]}), which a rotation of the residual stream does not commute with; "
                             f"allowed models: pre-norm LLaMA-style ones (llama, mistral, qwen2)")
        smallest = sliced_param_count(model, slice_dims(model, self.interval))
        solved = self.nominal_sparsity(budget) is None
        if solved and smallest > self.target(budget) + MATCH_TOLERANCE * budget.dense_params:
            raise BenchError(f"ratio={budget.ratio}: slicegpt cannot go below {smallest:,} params on this model "
                             f"(the unsliced lm_head and the shortcut matrices), the budget is "
                             f"{self.target(budget):,}: lower the ratio")

    def score_key(self, budget: Budget | None = None, model=None) -> dict:
        # sequential: every basis depends on the widths upstream
        return {"impl": "slicegpt", "dims": slice_dims(model, self.width(budget, model)), "damp": DAMP}

    def score(self, model, calib_ids, budget: Budget | None = None) -> dict:
        return pca_rotations(model, calib_ids, slice_dims(model, self.width(budget, model)), self.batch_size)

    def plan(self, scores: dict | None, budget: Budget, model=None) -> SlicePlan:
        """Widths per site, the bases (tensors, summarised by shape and sha256 in plan.json) and the exact
        parameter count. scores=None (shape-only): identity bases, the same shapes."""
        h, d = model.config.hidden_size, self.width(budget, model)
        dims = slice_dims(model, d)
        target, predicted = self.target(budget), sliced_param_count(model, dims)
        rotations = None if scores is None else scores["rotations"]
        if rotations is not None and {s: r.shape[1] for s, r in rotations.items()} != dims:
            raise BenchError("method=slicegpt: the cached bases were computed for other widths; clear the score "
                             "cache (make clean) and rerun")
        return SlicePlan(criterion=None if scores is None else "slicegpt", hidden_dense=h, hidden=d,
                         slicing_fraction=1 - d / h, sparsity=self.nominal_sparsity(budget), round_to=self.interval,
                         budget_match=self.budget_match, dims=dims, target_params=target,
                         predicted_params=predicted, gap_params=predicted - target,
                         budget_matched=is_matched(budget, predicted, target), rotations=rotations)

    # --- mutating ------------------------------------------------------------------------------------------

    def apply(self, model, plan: SlicePlan):
        return apply_slice_plan(model, plan)
