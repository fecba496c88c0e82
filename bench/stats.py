"""Bootstrap intervals for comparing two cells (numpy only: no torch, no models).

Two cells evaluated on the same documents (zero-shot) or windows (perplexity) are *paired*: resampling the same
indices for both keeps the per-document correlation (an easy document is easy for both models), so the interval
of a difference is much narrower than two independent intervals would suggest. Speed rounds are not paired across
cells (each cell is interleaved with its own dense runs), so speed comparisons resample each cell's rounds
independently.

Every interval is a percentile interval (2.5% and 97.5% of `n_resamples` resampled statistics), seeded: the same
inputs give the same numbers. Index matrices are drawn in chunks of at most CHUNK_ELEMENTS indices, so 10,000
resamples of a 10,000-document task stay at a few tens of MB.
"""

from __future__ import annotations

import numpy as np

N_RESAMPLES = 10_000
LEVEL = 0.95
CHUNK_ELEMENTS = 2 ** 21  # indices per chunk (16 MB of int64)


def _distribution(n: int, fn, n_resamples: int, seed) -> np.ndarray:
    """fn(idx) for `n_resamples` rows of indices drawn with replacement from range(n); fn maps an (r, n) index
    matrix to r statistics. The chunk size depends on n only, so a seed gives the same draws every time."""
    if n < 1:
        raise ValueError("a bootstrap needs at least one sample")
    rng = np.random.default_rng(seed)
    chunk = max(1, CHUNK_ELEMENTS // n)
    out = []
    for start in range(0, n_resamples, chunk):
        out.append(np.asarray(fn(rng.integers(0, n, size=(min(chunk, n_resamples - start), n))), dtype=float))
    return np.concatenate(out)


def interval(samples: np.ndarray, level: float = LEVEL) -> tuple[float, float]:
    """The percentile interval of bootstrap samples."""
    tail = (1 - level) / 2 * 100
    low, high = np.percentile(samples, [tail, 100 - tail])
    return float(low), float(high)


def paired_distribution(a, b, stat, n_resamples: int = N_RESAMPLES, seed=0) -> tuple[float, np.ndarray]:
    """(stat on the data, stat on each resample): a and b share their first axis (documents, windows) and are
    resampled with the same indices. stat(a, b) gets arrays with a leading resample axis, (r, n, ...), and
    returns r values."""
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if len(a) != len(b):
        raise ValueError(f"paired samples differ in length: {len(a)} vs {len(b)}")
    estimate = float(stat(a[None], b[None])[0])
    return estimate, _distribution(len(a), lambda idx: stat(a[idx], b[idx]), n_resamples, seed)


def paired_bootstrap(a, b, stat, n_resamples: int = N_RESAMPLES, seed=0) -> tuple[float, float, float]:
    """(estimate, low, high): stat(a, b) with its 95% paired-bootstrap interval (same indices for a and b)."""
    estimate, samples = paired_distribution(a, b, stat, n_resamples, seed)
    return (estimate, *interval(samples))


def unpaired_bootstrap(a, b, stat, n_resamples: int = N_RESAMPLES, seed=0) -> tuple[float, float, float]:
    """(estimate, low, high) with a and b resampled independently (two samples that share nothing: speed rounds
    of two cells; also the baseline the paired interval is compared with). Same chunking as the paired case."""
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    rng_a, rng_b = (np.random.default_rng(s) for s in np.random.SeedSequence(seed).spawn(2))
    chunk = max(1, CHUNK_ELEMENTS // max(len(a), len(b)))
    out = []
    for start in range(0, n_resamples, chunk):
        r = min(chunk, n_resamples - start)
        out.append(stat(a[rng_a.integers(0, len(a), size=(r, len(a)))], b[rng_b.integers(0, len(b), size=(r, len(b)))]))
    return (float(stat(a[None], b[None])[0]), *interval(np.concatenate(out)))


def mean_difference(a, b):
    """Mean of a minus mean of b along the sample axis (accuracy: per-document 0/1)."""
    return np.mean(a, axis=-1) - np.mean(b, axis=-1)


def accuracy_difference(a, b, n_resamples: int = N_RESAMPLES, seed=0) -> tuple[float, float, float]:
    """One task: mean accuracy of a minus b over the same documents (0/1 per document, in the same order)."""
    return paired_bootstrap(a, b, mean_difference, n_resamples, seed)


def average_difference(tasks: list[tuple], n_resamples: int = N_RESAMPLES, seed=0) -> tuple[float, float, float]:
    """The task average (the mean of the per-task accuracies, as the paper averages) of a minus b: `tasks` is a
    list of (a, b) per task. Each task's documents are resampled on their own (tasks are separate samples, of
    different sizes), with the same indices for a and b, and the per-task resampled differences are averaged."""
    if not tasks:
        raise ValueError("no tasks to average")
    estimates, samples = zip(*(paired_distribution(a, b, mean_difference, n_resamples, [seed, k])
                               for k, (a, b) in enumerate(tasks)))
    return (float(np.mean(estimates)), *interval(np.mean(samples, axis=0)))


def _ppl_ratio(a, b):
    """a, b: (..., n, 2) arrays of (nll_sum, tokens) per window; exp(sum nll / sum tokens) of a over that of b."""
    return np.exp(a[..., 0].sum(-1) / a[..., 1].sum(-1) - b[..., 0].sum(-1) / b[..., 1].sum(-1))


def ppl_ratio(a, b, n_resamples: int = N_RESAMPLES, seed=0) -> tuple[float, float, float]:
    """Perplexity of a over perplexity of b on the same windows: a and b are (n, 2) arrays of (nll_sum, tokens)
    per window; a perplexity is exp(sum nll / sum tokens) of the (resampled) windows."""
    return paired_bootstrap(a, b, _ppl_ratio, n_resamples, seed)


def _ratio_of_means(a, b):
    return np.mean(a, axis=-1) / np.mean(b, axis=-1)


def speedup_mean(rounds, n_resamples: int = N_RESAMPLES, seed=0) -> tuple[float, float, float]:
    """The mean per-round speedup (each round: pruned against dense interleaved with it) with its interval over
    rounds. Few rounds (3 in the showcase) give a rough interval: the bootstrap cannot see beyond the rounds."""
    rounds = np.asarray(rounds, dtype=float)
    estimate = float(rounds.mean())
    return (estimate, *interval(_distribution(len(rounds), lambda idx: rounds[idx].mean(-1), n_resamples, seed)))


def speedup_ratio(a, b, n_resamples: int = N_RESAMPLES, seed=0) -> tuple[float, float, float]:
    """Mean per-round speedup of cell a over that of cell b, rounds of each resampled independently (they were
    not measured together)."""
    return unpaired_bootstrap(a, b, _ratio_of_means, n_resamples, seed)


def speedup_difference(a, b, n_resamples: int = N_RESAMPLES, seed=0) -> tuple[float, float, float]:
    """Mean per-round speedup of a minus that of b, rounds resampled independently (the depth-vs-width figure)."""
    return unpaired_bootstrap(a, b, mean_difference, n_resamples, seed)


def verdict(low: float, high: float, null: float, better_a: str, better_b: str, higher_is_better: bool = True) -> str:
    """Which side the 95% interval of (a vs b) favours: `better_a` when it lies wholly on a's good side of `null`
    (0 for a difference, 1 for a ratio), `better_b` when wholly on b's, else no significant difference."""
    if low > null:
        return better_a if higher_is_better else better_b
    if high < null:
        return better_b if higher_is_better else better_a
    return "no significant difference"
