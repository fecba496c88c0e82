"""Paired statistics: bootstrap intervals (bench.stats), paired.{md,csv} and significance bolding (bench.report),
the depth-vs-width figure (bench.plots). Synthetic data only, a few seconds."""

from __future__ import annotations

import gzip
import json

import numpy as np
import pandas as pd
import pytest

from bench import stats
from bench.plots import write_plots
from bench.report import depth_vs_width, write_tables

PAPER_METRIC = {"boolq": "acc", "piqa": "acc", "hellaswag": "acc_norm", "winogrande": "acc", "arc_easy": "acc",
                "arc_challenge": "acc_norm", "openbookqa": "acc_norm"}  # bench.evals.zeroshot.PAPER_METRIC


def test_paper_metric_matches_the_zeroshot_stage():
    from bench.evals.zeroshot import PAPER_METRIC as stage

    assert PAPER_METRIC == stage


def test_paired_bootstrap_covers_a_known_difference_and_is_seeded():
    rng = np.random.default_rng(1)
    x = rng.normal(size=500)
    a, b = x + 0.3 + rng.normal(scale=0.1, size=500), x
    est, low, high = stats.paired_bootstrap(a, b, stats.mean_difference)
    assert est == pytest.approx(np.mean(a - b)) and low < 0.3 < high and low > 0
    assert stats.paired_bootstrap(a, b, stats.mean_difference) == (est, low, high)  # seed 0: the same numbers
    assert stats.paired_bootstrap(a, b, stats.mean_difference, seed=1) != (est, low, high)
    assert stats.verdict(low, high, 0.0, "a", "b") == "a"


def test_zero_difference_is_not_significant():
    rng = np.random.default_rng(2)
    a, b = rng.integers(0, 2, size=400), rng.integers(0, 2, size=400)  # same accuracy, independent documents
    assert stats.verdict(*stats.accuracy_difference(a, b)[1:], 0.0, "depth better", "width better") == \
        "no significant difference"
    assert stats.verdict(*stats.accuracy_difference(a, a)[1:], 0.0, "x", "y") == "no significant difference"


def test_paired_narrower_than_unpaired_on_correlated_data():
    rng = np.random.default_rng(3)
    x = rng.normal(size=300)
    a, b = x + rng.normal(scale=0.2, size=300), x + 0.1 + rng.normal(scale=0.2, size=300)
    _, pl, ph = stats.paired_bootstrap(a, b, stats.mean_difference)
    _, ul, uh = stats.unpaired_bootstrap(a, b, stats.mean_difference)
    assert (ph - pl) < 0.5 * (uh - ul)
    assert ph < 0 < uh  # paired sees the -0.1; unpaired does not


def test_average_ppl_ratio_and_speedup():
    rng = np.random.default_rng(4)
    tasks = [(rng.integers(0, 2, size=n), rng.integers(0, 2, size=n)) for n in (50, 120, 300)]
    est, low, high = stats.average_difference(tasks)
    assert est == pytest.approx(np.mean([a.mean() - b.mean() for a, b in tasks])) and low < est < high
    nll = rng.uniform(300, 500, size=40)
    b = np.stack([nll, np.full(40, 128.0)], axis=1)
    a = b + np.stack([np.full(40, 128 * np.log(2)), np.zeros(40)], axis=1)  # every window: twice the perplexity
    assert stats.ppl_ratio(a, b) == pytest.approx((2.0, 2.0, 2.0))
    est, low, high = stats.speedup_mean([1.1, 1.2, 1.15])
    assert est == pytest.approx(1.15) and 1.1 <= low < est < high <= 1.2


def test_large_task_is_chunked():
    a = np.random.default_rng(5).integers(0, 2, size=10_000)
    est, low, high = stats.accuracy_difference(a, np.roll(a, 1))  # 10,000 x 10,000 indices, drawn in chunks
    assert low < est < high and high - low < 0.05


# --- synthetic cells with example files ----------------------------------------------------------------------------

N_DOCS, N_WINDOWS = 200, 40


def _gz(path, lines):
    path.parent.mkdir(parents=True, exist_ok=True)
    with gzip.open(path, "wt") as f:
        f.write("".join(json.dumps(line) + "\n" for line in lines))


def write_cell(root, method, kind, ratio, p_correct, ppl_shift, speedups, examples=True):
    """One cell: records (as the runner writes them) and, with `examples`, its per-document and per-window files.
    Correctness comes from a latent difficulty every cell shares, so the cells are correlated as real ones are."""
    ident = {"model": "m", "method": method, "kind": kind, "ratio": ratio, "params": 800 if ratio else 1000,
             "removed_frac_total_params": 0.2 if ratio else 0.0}
    cell = root / method / f"r{ratio:g}"
    out, accs = [], []
    for k, (task, metric) in enumerate(PAPER_METRIC.items()):
        difficulty = np.random.default_rng(k).uniform(size=N_DOCS)
        correct = (difficulty < p_correct).astype(int)
        other = "acc_norm" if metric == "acc" else "acc"
        accs.append(correct.mean())
        out += [ident | {"stage": "zeroshot", "task": task, "metric": metric, "value": correct.mean(),
                         "stderr": 0.03, "n": N_DOCS, "paper_metric": True},
                ident | {"stage": "zeroshot", "task": task, "metric": other, "value": 0.0, "stderr": 0.0,
                         "n": N_DOCS, "paper_metric": False}]
        if examples:  # the other metric is all wrong: reading it instead of the paper metric would show
            _gz(cell / "examples" / f"zeroshot_{task}.jsonl.gz",
                [{"doc_id": i, metric: int(c), other: 0, "gold": 0, "chosen": 0, "chosen_norm": 0,
                  "loglik": [-1.0, -2.0], "gold_loglik": -1.0} for i, c in enumerate(correct)])
    out.append(ident | {"stage": "zeroshot", "task": "average", "metric": "paper", "value": float(np.mean(accs)),
                        "stderr": None, "n": 7, "paper_metric": True})
    nll = np.random.default_rng(99).uniform(400, 600, size=N_WINDOWS) + ppl_shift * 128
    for task, metric in (("wikitext2", "ppl"), ("ptb", "ppl")):
        out.append(ident | {"stage": "ppl", "task": task, "metric": metric, "n": N_WINDOWS, "stderr": 0.5,
                            "value": float(np.exp(nll.sum() / (128 * N_WINDOWS)))})
        if examples:
            _gz(cell / "examples" / f"ppl_{task}_{metric}.jsonl.gz",
                [{"window": i, "nll_sum": float(v), "tokens": 128} for i, v in enumerate(nll)])
    point = {"stage": "speed", "task": "generate", "runtime": "eager", "new_tokens": 32, "batch_size": 1,
             "status": "ok", "n": 3}
    out.append(ident | point | {"metric": "throughput_tok_s", "value": 10.0 * np.mean(speedups or [1.0]),
                                "stderr": 0.1, "raw": [10.0 * s for s in speedups or [1.0, 1.0, 1.0]]})
    if speedups:
        out.append(ident | point | {"metric": "speedup", "value": float(np.mean(speedups)), "stderr": 0.01,
                                    "raw": speedups})
    cell.mkdir(parents=True, exist_ok=True)
    (cell / "records.jsonl").write_text("".join(json.dumps(r) + "\n" for r in out))


def write_sweep(root):
    write_cell(root, "dense", "dense", 0.0, 0.75, 0.0, None)
    write_cell(root, "depth_ppl+", "depth", 0.2, 0.70, 0.5, [1.30, 1.32, 1.31])  # more accurate and faster
    write_cell(root, "flap", "width", 0.2, 0.50, 0.2, [1.05, 1.06, 1.04])  # lower perplexity
    write_cell(root, "wanda_sp", "width", 0.2, 0.45, 0.2, [1.01, 1.02, 1.00])  # flap's perplexity exactly
    write_cell(root, "magnitude_width", "width", 0.2, 0.30, 2.0, [1.0, 1.0, 1.0], examples=False)


def test_paired_table_and_bolding_from_cells_with_examples(tmp_path):
    write_sweep(tmp_path)
    md, tex, _ = write_tables(tmp_path)
    paired = pd.read_csv(tmp_path / "tables" / "paired.csv")
    text = (tmp_path / "tables" / "paired.md").read_text()
    assert text.startswith("Paired comparisons:") and "| verdict" in text

    def one(method, against, metric):
        sel = paired[(paired.method == method) & (paired.against == against) & (paired.metric == metric)]
        assert len(sel) == 1, (method, against, metric)
        return sel.iloc[0]

    avg = one("depth_ppl+", "flap", "Avg")  # flap is the best width row on accuracy
    table = pd.read_csv(tmp_path / "tables" / "main.csv").set_index("method")
    assert avg.estimate == pytest.approx(table.Avg["depth_ppl+"] - table.Avg["flap"])  # the records' difference
    assert avg.verdict == "depth better" and avg.low > 0
    assert one("depth_ppl+", "dense", "Avg").verdict == "dense better"
    assert one("flap", "depth_ppl+", "BoolQ").verdict == "depth better"
    ppl = one("depth_ppl+", "flap", "WikiText2")
    assert ppl.statistic == "PPL ratio" and ppl.estimate == pytest.approx(np.exp(0.3)) and ppl.verdict == "width better"
    speed = one("depth_ppl+", "dense", "speedup bs1")
    assert speed.statistic == "mean speedup" and speed.estimate == pytest.approx(1.31)
    assert speed.verdict == "depth better"
    assert one("flap", "depth_ppl+", "speedup bs1").verdict == "depth better"
    assert one("magnitude_width", "depth_ppl+", "Avg").verdict == "no per-example records"
    assert one("magnitude_width", "dense", "WikiText2").verdict == "no per-example records"
    assert set(paired.against[paired.method == "depth_ppl+"]) == {"dense", "flap"}  # never its own family

    main = md.read_text()
    assert "significantly better than the runner-up" in main and "no bold where that cannot be computed" in main
    depth = next(line for line in main.splitlines() if "| depth_ppl+ " in line)
    assert "**" in depth.split("|")[-4]  # Avg: depth is significantly above the runner-up (flap)
    flap = next(line for line in main.splitlines() if "| flap " in line)
    wikitext = [c.strip() for c in flap.strip("|").split("|")][5]
    assert "**" not in wikitext  # flap ties wanda_sp on perplexity: best, but not significantly
    assert "\\textbf" in tex.read_text()


def test_depth_vs_width_figure_written_and_deterministic(tmp_path):
    write_sweep(tmp_path / "res")
    pts = depth_vs_width(tmp_path / "res")
    assert list(pts.depth) == ["depth_ppl+"] and list(pts.width) == ["flap"]
    r = pts.iloc[0]
    assert r.acc_low < r.acc_diff < r.acc_high and r.speedup_diff == pytest.approx(0.26)
    assert r.speedup_low <= r.speedup_diff <= r.speedup_high
    paths = [p for p in write_plots(tmp_path / "res", tmp_path / "a") if p.stem == "depth_vs_width"]
    assert sorted(p.suffix for p in paths) == [".pdf", ".png"] and all(p.stat().st_size > 1000 for p in paths)
    again = [p for p in write_plots(tmp_path / "res", tmp_path / "b") if p.stem == "depth_vs_width"]
    assert [p.read_bytes() for p in paths] == [p.read_bytes() for p in again]


def test_one_round_gives_no_verdict(tmp_path):
    """A single speed round (the default sweep's quick preset) has no spread to resample: its interval is a point,
    and the verdict says too few samples rather than calling a winner."""
    write_cell(tmp_path, "dense", "dense", 0.0, 0.75, 0.0, None)
    write_cell(tmp_path, "depth_ppl+", "depth", 0.2, 0.70, 0.5, [1.30])
    write_cell(tmp_path, "flap", "width", 0.2, 0.50, 0.2, [1.05, 1.06, 1.04])
    write_tables(tmp_path)
    paired = pd.read_csv(tmp_path / "tables" / "paired.csv")
    speed = paired[(paired.metric == "speedup bs1") & (paired.method == "depth_ppl+")]
    assert set(speed.verdict) == {"too few samples (n < 2 per side)"} and len(speed) == 2
    avg = paired[(paired.metric == "Avg") & (paired.method == "depth_ppl+") & (paired.against == "flap")]
    assert list(avg.verdict) == ["depth better"]  # 200 documents a task: evidence


def test_llamacpp_speedups_get_paired_verdicts_per_quant(tmp_path):
    """The edge sweep's llama.cpp rows (one per quant) carry per-round speedups: paired.md compares them like the
    eager ones, per quantization, and main.md bolds a significant best."""
    def cell(method, kind, ratio, rounds):
        ident = {"model": "m", "method": method, "kind": kind, "ratio": ratio, "params": 100, "dense_params": 100,
                 "removed_frac_total_params": ratio}
        point = {"stage": "speed", "task": "generate", "runtime": "llamacpp", "new_tokens": 32, "batch_size": 1,
                 "status": "ok", "n": 5}
        rows = [ident | point | {"quant": q, "metric": "decode_tok_s", "value": 100.0, "stderr": None}
                for q in rounds or ("f16", "q4_k_m")]
        rows += [ident | point | {"quant": q, "metric": "speedup", "value": float(np.mean(r)), "stderr": 0.01,
                                  "raw": r} for q, r in (rounds or {}).items()]
        path = tmp_path / method / f"r{ratio}"
        path.mkdir(parents=True)
        (path / "records.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))

    cell("dense", "dense", 0.0, None)
    cell("depth_ppl+", "depth", 0.2, {"f16": [1.30, 1.31, 1.29, 1.30, 1.32], "q4_k_m": [1.10, 1.20, 1.00, 1.15, 1.05]})
    cell("wanda_sp", "width", 0.2, {"f16": [1.10, 1.11, 1.09, 1.10, 1.12], "q4_k_m": [1.12, 1.02, 1.17, 1.07, 1.10]})
    md, _, _ = write_tables(tmp_path)
    paired = pd.read_csv(tmp_path / "tables" / "paired.csv").set_index(["method", "against", "metric"])
    f16 = paired.loc[("depth_ppl+", "wanda_sp", "llama.cpp f16 speedup bs1")]
    assert f16.statistic == "speedup ratio" and f16.estimate == pytest.approx(1.304 / 1.104)
    assert f16.verdict == "depth better"
    assert paired.loc[("depth_ppl+", "dense", "llama.cpp f16 speedup bs1")].verdict == "depth better"
    assert paired.loc[("wanda_sp", "depth_ppl+", "llama.cpp q4_k_m speedup bs1")].verdict == \
        "no significant difference"
    depth = next(line for line in md.read_text().splitlines() if "| depth_ppl+ " in line)
    assert depth.count("**") == 2  # f16's speedup: bold; q4_k_m's: a tie, not bold
