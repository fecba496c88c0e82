"""The report is a pure function of the records: a fixed set of records gives a known table."""

from __future__ import annotations

import json

import pandas as pd
import pytest

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
    return out + [ident | {"stage": "zeroshot", "task": "average", "metric": "paper", "value": acc, "stderr": None,
                           "n": 7, "paper_metric": True}]


def test_main_table_golden(tmp_path):
    for name, records in (("a", rows("flap", "width", 0.2, 800, 30.0, 0.5)),
                          ("b", rows("dense", "dense", 0.0, 1000, 10.0, 0.75)),
                          ("c", rows("depth_ppl+", "depth", 0.2, 800, 20.0, 0.6))):
        (tmp_path / name).mkdir()
        (tmp_path / name / "records.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    md, csv = write_tables(tmp_path)
    table = pd.read_csv(csv)
    assert list(table.method) == ["dense", "depth_ppl+", "flap"]
    assert list(table.params) == [1000, 800, 800]
    assert list(table["WikiText2"]) == [10.0, 20.0, 30.0] and list(table["PTB (BOS)"]) == [13.0, 23.0, 33.0]
    for col in ("BoolQ", "PIQA", "HellaSwag", "WinoGrande", "ARC-e", "ARC-c", "OBQA", "Avg"):
        assert list(table[col]) == pytest.approx([75.0, 60.0, 50.0]), col  # the paper metric, x100
    header = md.read_text().splitlines()[0]
    assert [h.strip() for h in header.strip("|").split("|")] == [
        "model", "method", "ratio", "params", "removed %", "WikiText2", "PTB", "WikiText2 (BOS)", "PTB (BOS)",
        "BoolQ", "PIQA", "HellaSwag", "WinoGrande", "ARC-e", "ARC-c", "OBQA", "Avg"]
    dense = next(line for line in md.read_text().splitlines() if "| dense " in line)
    cells = [c.strip() for c in dense.strip("|").split("|")]
    assert cells[2:6] == ["0", "1,000", "0.0", "10.00 ± 0.50"] and cells[-2:] == ["75.00 ± 1.00", "75.00"]
