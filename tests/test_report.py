"""The report is a pure function of the records: a fixed set of records gives a known table."""

from __future__ import annotations

import json

import pandas as pd
import pytest

from bench.plots import pareto_front, write_plots
from bench.report import write_tables

TASKS = {"boolq": "acc", "piqa": "acc", "hellaswag": "acc_norm", "winogrande": "acc", "arc_easy": "acc",
         "arc_challenge": "acc_norm", "openbookqa": "acc_norm"}


def rows(method, kind, ratio, params, ppl, acc):
    ident = {"model": "m", "method": method, "kind": kind, "ratio": ratio, "params": params,
             "removed_frac_total_params": 1 - params / 1000}
    out = [ident | {"stage": "ppl", "task": t, "metric": m, "value": ppl + i, "stderr": 0.5, "n": 10}
           for i, (t, m) in enumerate([("wikitext2", "ppl"), ("ptb", "ppl"), ("wikitext2", "ppl_bos"),
                                       ("ptb", "ppl_bos")])]
    for task, metric in TASKS.items():
        other = "acc_norm" if metric == "acc" else "acc"
        out += [ident | {"stage": "zeroshot", "task": task, "metric": metric, "value": acc, "stderr": 0.01, "n": 2,
                         "paper_metric": True},
                ident | {"stage": "zeroshot", "task": task, "metric": other, "value": 0.0, "stderr": 0.01, "n": 2,
                         "paper_metric": False}]
    out += [ident | {"stage": "zeroshot", "task": "average", "metric": "paper", "value": acc, "stderr": None,
                     "n": 7, "paper_metric": True}]
    for b in (1, 4):  # speed: eager rows at two lengths (the table shows the shortest) plus a compiled one
        for runtime, n in (("eager", 32), ("eager", 128), ("compiled", 32)):
            point = {"stage": "speed", "task": "generate", "runtime": runtime, "new_tokens": n, "batch_size": b,
                     "status": "ok", "stderr": None, "n": 1}
            tok_s = 1000 * b / ppl + (n == 128) + (runtime == "compiled")
            out.append(ident | point | {"metric": "throughput_tok_s", "value": tok_s})
            if kind != "dense":
                out.append(ident | point | {"metric": "speedup", "value": 100 / ppl})
    return out


def write_golden(root):
    for name, records in (("a", rows("flap", "width", 0.2, 800, 30.0, 0.5)),
                          ("b", rows("dense", "dense", 0.0, 1000, 10.0, 0.75)),
                          ("c", rows("depth_ppl+", "depth", 0.2, 800, 20.0, 0.6))):
        (root / name).mkdir(parents=True)
        (root / name / "records.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))


def test_main_table_golden(tmp_path):
    write_golden(tmp_path)
    md, tex, csv = write_tables(tmp_path)
    table = pd.read_csv(csv)
    assert list(table.method) == ["dense", "depth_ppl+", "flap"]
    assert list(table.params) == [1000, 800, 800]
    assert list(table["WikiText2"]) == [10.0, 20.0, 30.0] and list(table["PTB (BOS)"]) == [13.0, 23.0, 33.0]
    for col in ("BoolQ", "PIQA", "HellaSwag", "WinoGrande", "ARC-e", "ARC-c", "OBQA", "Avg"):
        assert list(table[col]) == pytest.approx([75.0, 60.0, 50.0]), col  # the paper metric, x100
    header = md.read_text().splitlines()[0]
    assert [h.strip() for h in header.strip("|").split("|")] == [
        "model", "method", "ratio", "params", "removed %", "WikiText2", "PTB", "WikiText2 (BOS)", "PTB (BOS)",
        "BoolQ", "PIQA", "HellaSwag", "WinoGrande", "ARC-e", "ARC-c", "OBQA", "Avg", "tok/s bs1", "speedup bs1",
        "tok/s bs4", "speedup bs4"]
    assert list(table["tok/s bs4"]) == pytest.approx([400.0, 200.0, 4000 / 30])  # eager, 32 new tokens
    assert table["speedup bs1"].isna().tolist() == [True, False, False] and table["speedup bs1"][1] == 5.0
    dense = next(line for line in md.read_text().splitlines() if "| dense " in line)
    cells = [c.strip() for c in dense.strip("|").split("|")]
    assert cells[2:6] == ["0", "1,000", "0.0", "10.00 ± 0.50"] and cells[-6:-4] == ["75.00 ± 1.00", "75.00"]
    assert cells[-4:] == ["100.00", "-", "400.00", "-"]
    # best pruned value per column and ratio is bold: depth_ppl+ has the lower PPL and the higher accuracy
    depth = next(line for line in md.read_text().splitlines() if "| depth_ppl+ " in line)
    assert "**20.00 ± 0.50**" in depth and "**60.00 ± 1.00**" in depth and "| dense" not in depth
    latex = tex.read_text()
    assert latex.startswith("\\begin{tabular}{lllrr") and "\\toprule" in latex and "\\bottomrule" in latex
    assert "depth\\_ppl+ & 0.2 & 800 & 20.0 & \\textbf{20.00}" in latex


def test_plots_written_and_not_empty(tmp_path):
    write_golden(tmp_path / "res")
    paths = write_plots(tmp_path / "res", tmp_path / "plots")
    names = sorted({p.stem for p in paths})
    assert names == ["accuracy_vs_speedup", "ppl_vs_params", "speedup_vs_batch", "throughput_vs_batch"]
    assert all(p.stat().st_size > 1000 for p in paths) and {p.suffix for p in paths} == {".png", ".pdf"}


def test_no_accuracy_vs_speedup_without_speed_records(tmp_path):
    # zero-shot and PPL records only (as the zeroshot_full sweep writes): no speedup axis, so no such plot
    write_golden(tmp_path / "res")
    for f in (tmp_path / "res").glob("*/records.jsonl"):
        kept = [line for line in f.read_text().splitlines() if json.loads(line)["stage"] != "speed"]
        f.write_text("".join(line + "\n" for line in kept))
    paths = write_plots(tmp_path / "res", tmp_path / "plots")
    assert sorted({p.stem for p in paths}) == ["ppl_vs_params"]


def test_pareto_front():
    # (speedup, accuracy): the dense point, a dominated one, and two on the front
    assert pareto_front([(1.0, 0.75), (1.2, 0.5), (1.3, 0.6), (1.5, 0.55)]) == [0, 2, 3]
