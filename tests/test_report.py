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
    header = next(line for line in md.read_text().splitlines() if line.startswith("| model"))  # after the caption
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
    # bold needs significance against the runner-up, and these records have no per-example files nor speed
    # rounds: depth_ppl+ has the lower PPL and the higher accuracy, but nothing is bold (tests/test_stats.py
    # has the bold case)
    depth = next(line for line in md.read_text().splitlines() if "| depth_ppl+ " in line)
    assert "20.00 ± 0.50" in depth and "60.00 ± 1.00" in depth and "| dense" not in depth
    assert "**" not in md.read_text().split("\n| model", 1)[1]
    latex = tex.read_text()
    assert latex.startswith("% caption:\n") and "\n\\begin{tabular}{lllrr" in latex  # the caption, then the table
    assert "\\toprule" in latex and "\\bottomrule" in latex
    assert "depth\\_ppl+ & 0.2 & 800 & 20.0 & 20.00" in latex and "\\textbf" not in latex


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


# --- caption, cost notice, provenance ----------------------------------------------------------------------------

PROVENANCE = {"sweep": "s1", "eval_preset": "quick", "device": "cpu", "device_name": "CPU X", "dtype": "float32",
              "threads": 2, "torch": "2.13.0", "transformers": "5.24.0", "lm_eval": "0.4.13", "datasets": "5.2.0",
              "peft": "0.21.2", "torch_pruning": "1.6.1"}
NOT_RECORDED = "not recorded"
CALIBRATION = {"calibration": "shared", "calib_dataset": "bookcorpus", "calib_n_samples": 10, "calib_seq_len": 128,
               "calib_seed": 1234, "calib_source": "local:calibration/novel.txt"}


def test_caption_names_what_was_measured(tmp_path):
    from bench.records import load_records
    from bench.report import caption

    for name, records in (("a", rows("flap", "width", 0.2, 800, 30.0, 0.5)),
                          ("b", rows("dense", "dense", 0.0, 1000, 10.0, 0.75))):
        extra = PROVENANCE | (CALIBRATION if name == "a" else {})
        (tmp_path / name).mkdir()
        (tmp_path / name / "records.jsonl").write_text(
            "".join(json.dumps(r | extra | {"seq_len": 128, "prompt_tokens": 11}) + "\n" for r in records))
    text = caption(load_records(tmp_path))
    for part in ("Sweep: s1", "eval preset: quick", "wikitext2 10 x 128; ptb 10 x 128",
                 "2 examples per task (7 tasks)", "batch 1, 4 with 32, 128 new tokens", "prompt tokens: 11",
                 "rounds per point: 1", "eager, compiled", "CPU X (cpu), float32, 2 threads",
                 "shared, bookcorpus 10 x 128 tokens, seed 1234 (local:calibration/novel.txt)",
                 "torch 2.13.0, transformers 5.24.0, lm_eval 0.4.13, datasets 5.2.0, peft 0.21.2, "
                 "torch_pruning 1.6.1",
                 "value ± stderr", "bold"):
        assert part in text, part
    assert NOT_RECORDED not in text
    (tmp_path / "c").mkdir()  # a data-free criterion: no calibration set
    (tmp_path / "c" / "records.jsonl").write_text("".join(
        json.dumps(r | PROVENANCE | {"calibration": "none", "seq_len": 128, "prompt_tokens": 11}) + "\n"
        for r in rows("magnitude_width", "width", 0.2, 800, 60.0, 0.3)))
    text = caption(load_records(tmp_path))
    assert "(local:calibration/novel.txt); none (data-free criteria)." in text
    md, tex, _ = write_tables(tmp_path)
    assert md.read_text().startswith(text + "\n| model")  # the caption paragraph, a blank line, the table
    assert "".join(f"% {line}\n" for line in text.splitlines()) in tex.read_text()


def test_caption_missing_fields_and_differing_cells(tmp_path):
    from bench.records import load_records
    from bench.report import caption

    write_golden(tmp_path)  # records without provenance, calibration or seq_len (older records)
    text = caption(load_records(tmp_path))
    assert "Sweep: not recorded; eval preset: not recorded." in text
    assert "Calibration of the pruned cells: not recorded." in text
    assert "lm_eval not recorded" in text and "torch_pruning not recorded" in text
    assert "wikitext2 10 x not recorded" in text
    # cells that disagree list every variant
    extra = tmp_path / "d"
    extra.mkdir()
    extra.joinpath("records.jsonl").write_text("".join(json.dumps(r | {"n": 512} if r["stage"] == "ppl" else r) + "\n"
                                                       for r in rows("wanda_sp", "width", 0.2, 800, 40, 0.4)))
    assert "wikitext2 10 x not recorded; ptb 10 x not recorded; wikitext2 512 x" in caption(load_records(tmp_path))
    paper = [r for r in rows("dense", "dense", 0.0, 1000, 10.0, 0.75) if r["stage"] == "zeroshot" and r["paper_metric"]]
    zeroshot_only = pd.DataFrame([r | {"n": n} for r, n in zip(paper, [3270, 1838, 10042, 1267, 2376, 1172, 500, 7])])
    text = caption(zeroshot_only)
    assert "Zero-shot: boolq 3270, piqa 1838, hellaswag 10042" in text and "average 7" not in text
    assert "Perplexity, windows x tokens per corpus: not run." in text and "Speed: not run." in text
    assert "Calibration of the pruned cells: no pruned cell." in text


def test_cost_notice_full_on_cpu_only():
    import torch

    from bench.config import compose
    from bench.evals.cost import REF_PARAMS, cost_notice, stage_seconds

    full = compose(["model=smollm2-135m", "method=depth_ppl", "eval=full"])
    line = cost_notice(full, REF_PARAMS, torch.device("cpu"))
    assert line.startswith("eval=full on cpu: every perplexity window, every zero-shot example and the speed grid")
    assert "about" in line and "hours for smollm2-135m (perplexity" in line and "zero-shot" in line
    assert line.endswith("; eval=quick for a smoke run")
    # the basis: a full zero-shot pass of the 134.5M model on 2 threads took about 3.5 hours (README)
    assert 3.0 < stage_seconds(full, REF_PARAMS, 2)["zero-shot"] / 3600 < 4.0
    assert stage_seconds(full, REF_PARAMS // 2, 2)["perplexity"] == pytest.approx(
        stage_seconds(full, REF_PARAMS, 2)["perplexity"] / 2, rel=1e-6)  # linear in the parameter count
    assert cost_notice(full, torch.nn.Linear(8, 8), "cpu").startswith("eval=full on cpu")  # a model works too
    assert cost_notice(full, REF_PARAMS, "cuda") is None
    for overrides in (["eval=quick"], ["+sweep=showcase"]):  # subsampled: 8 / 512 windows, 5 / 200 examples
        assert cost_notice(compose(["method=depth_ppl", *overrides]), REF_PARAMS, "cpu") is None
    only_zeroshot = cost_notice(compose(["+sweep=zeroshot_full", "method=flap"]), REF_PARAMS, "cpu")
    assert only_zeroshot.startswith("eval=full on cpu: every zero-shot example, about")


def test_provenance_carries_versions_sweep_and_preset():
    from importlib.metadata import version

    import torch

    from bench.config import compose
    from bench.runner import provenance

    prov = provenance(compose(["eval=quick", "sweep_name=mysweep"]), torch.device("cpu"), torch.float32)
    assert prov["sweep"] == "mysweep" and prov["eval_preset"] == "quick"
    assert prov["device"] == "cpu" and prov["dtype"] == "float32"
    for key, dist in (("lm_eval", "lm_eval"), ("datasets", "datasets"), ("peft", "peft"),
                      ("torch_pruning", "torch-pruning"), ("transformers", "transformers")):
        assert prov[key] == version(dist), key
    assert prov["torch"] == torch.__version__
    assert provenance(compose(["eval=full"]), torch.device("cpu"), torch.float32)["eval_preset"] == "full"


def test_rows_grouped_and_verdicts_taken_within_a_retraining_regime(tmp_path):
    """A kd row is compared with the other family's best kd row, never with a one-shot one; rows come grouped by
    regime (one-shot, lora, kd, cpt) whatever the method names."""
    from bench.records import load_records
    from bench.report import main_table, paired_table

    cells = {"a": ("flap", "width", "none", 30.0), "b": ("dense", "dense", "none", 10.0),
             "c": ("depth_ppl+", "depth", "none", 20.0), "d": ("flap+kd", "width", "kd", 12.0),
             "e": ("depth_ppl++kd", "depth", "kd", 15.0), "f": ("angular+kd", "depth", "kd", 16.0)}
    for name, (method, kind, regime, ppl) in cells.items():
        (tmp_path / name).mkdir()
        records = [r | {"retrain": regime} for r in rows(method, kind, 0.2 if kind != "dense" else 0.0,
                                                         1000 if kind == "dense" else 800, ppl, 0.5)]
        (tmp_path / name / "records.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    table = main_table(load_records(tmp_path))
    assert list(table.method) == ["dense", "depth_ppl+", "flap", "angular+kd", "depth_ppl++kd", "flap+kd"]
    paired = paired_table(tmp_path)
    against = paired[(paired.against != "dense")].groupby("method").against.agg(set).to_dict()
    kd_depth = {"angular+kd", "depth_ppl++kd"}  # the best kd depth row of each metric (ties: the first)
    assert against == {"depth_ppl+": {"flap"}, "flap": {"depth_ppl+"}, "depth_ppl++kd": {"flap+kd"},
                       "angular+kd": {"flap+kd"}, "flap+kd": kd_depth}
