"""One cell end to end through the CLI and the Python API: files, records, skip on rerun, score cache, errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pandas as pd
import pytest
import torch

import bench.methods.depth as depth
from bench import BenchError
from bench.config import check_choices
from bench.report import write_tables
from bench.runner import run_cell


def cli(*args, data_root, tmp_path):
    env = os.environ | {"BENCH_DATA": str(data_root), "BENCH_CACHE": str(tmp_path / "cache")}
    stages = [] if any(a.startswith("eval.stages=") for a in args) else ["eval.stages=[ppl]"]
    return subprocess.run([sys.executable, "-m", "bench", *args, *stages], capture_output=True, text=True, env=env,
                          cwd=tmp_path)


def test_cli_runs_a_cell_and_skips_it_on_rerun(tmp_path, data_root):
    args = ["model=tiny-llama", "method=depth_taylor", "ratio=0.25", "eval.ppl.max_windows=2",
            f"out_dir={tmp_path / 'res'}"]
    first = cli(*args, data_root=data_root, tmp_path=tmp_path)
    assert first.returncode == 0, first.stderr
    cell = tmp_path / "res" / "tiny-llama" / "depth_taylor+" / "r0.25"
    assert sorted(p.name for p in cell.iterdir()) == ["calib.pt", "config.yaml", "examples", "plan.json",
                                                       "records.jsonl", "scores.csv"]
    assert sorted(p.name for p in (cell / "examples").iterdir()) == [
        f"ppl_{corpus}_{metric}.jsonl.gz" for corpus in ("ptb", "wikitext2") for metric in ("ppl", "ppl_bos")]
    rows = [json.loads(line) for line in (cell / "records.jsonl").read_text().splitlines()]
    rows = [r for r in rows if r["stage"] != "memory"]
    assert len(rows) == 4
    for key in ("model", "method", "ratio", "params", "stage", "task", "metric", "value", "seed", "torch",
                "transformers", "device", "dtype", "elapsed_s", "removed_frac_block_params",
                "removed_frac_total_params"):
        assert key in rows[0]
    plan = json.loads((cell / "plan.json").read_text())
    assert len(plan["remove"]) == 3 and rows[0]["params"] == plan["predicted_params"]
    assert "params" not in plan and rows[0]["calibration"] == "shared" and rows[0]["scores_cached"] is False
    assert rows[0]["protocol"] == "matched" and rows[0]["departures"] == []
    scores = pd.read_csv(cell / "scores.csv")
    assert list(scores.columns) == ["block", "score"] and len(scores) == 12
    calib = torch.load(cell / "calib.pt")
    assert calib.dtype == torch.long and calib.shape == (10, 128)
    mtime = (cell / "records.jsonl").stat().st_mtime_ns
    second = cli(*args, data_root=data_root, tmp_path=tmp_path)
    assert second.returncode == 0 and "done, skipping" in second.stderr + second.stdout
    assert (cell / "records.jsonl").stat().st_mtime_ns == mtime


def test_scores_cached_across_ratios(cfg_for, monkeypatch):
    calls = []
    real = depth.ppl_scores
    monkeypatch.setattr(depth, "ppl_scores", lambda *a, **k: calls.append(1) or real(*a, **k))
    common = ("model=tiny-llama-gqa", "method=depth_ppl", "eval.ppl.max_windows=1")
    first = run_cell(cfg_for(*common, "ratio=0.2"))
    second = run_cell(cfg_for(*common, "ratio=0.35"))
    assert len(calls) == 1
    assert json.loads((second / "records.jsonl").read_text().splitlines()[0])["scores_cached"] is True
    assert (first / "scores.csv").read_text() == (second / "scores.csv").read_text()


def test_dense_then_report(cfg_for, tmp_path):
    run_cell(cfg_for("model=tiny-llama", "method=dense", "eval.ppl.max_windows=2"))
    run_cell(cfg_for("model=tiny-llama", "method=depth_magnitude", "ratio=0.25", "eval.ppl.max_windows=2"))
    md, _, csv = write_tables(tmp_path / "results")
    assert (md.name, csv.name) == ("main.md", "main.csv")
    table = pd.read_csv(csv)
    assert list(table.method) == ["dense", "depth_magnitude+"]
    assert list(table.ratio) == [0.0, 0.25]
    for col in ("params", "WikiText2", "PTB", "WikiText2 (BOS)", "PTB (BOS)"):
        assert table[col].notna().all()
    assert "| dense" in md.read_text()


@pytest.mark.parametrize("override, message", [
    ("model=nope", "model='nope': allowed values are "),
    ("method=nope", "method='nope': allowed values are angular, block_influence, dense, depth_magnitude, depth_ppl, "
                    "depth_random, depth_taylor, flap, llm_pruner, magnitude_width, sleb, slicegpt, wanda_sp"),
])
def test_unknown_choice_is_one_line_error(override, message):
    with pytest.raises(BenchError, match=message):
        check_choices([override])


def test_cli_errors_are_one_line(tmp_path, data_root):
    bad = cli("method=nope", data_root=data_root, tmp_path=tmp_path)
    assert bad.returncode != 0
    lines = bad.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: method='nope': allowed values are angular, block_influence, dense")
    assert "llm_pruner" in lines[0] and "_depth_" not in lines[0]
    ratio = cli("model=tiny-llama", "method=depth_ppl", "ratio=1.5", f"out_dir={tmp_path}", data_root=data_root,
                tmp_path=tmp_path)
    assert ratio.returncode == 2 and "ratio=1.5: must be in (0, 1)" in ratio.stderr + ratio.stdout
    every = cli("model=tiny-llama", "method=depth_ppl", "ratio=0.5", f"out_dir={tmp_path}", data_root=data_root,
                tmp_path=tmp_path)
    assert every.returncode == 2 and "only 6 may be removed" in every.stderr + every.stdout


def test_width_cell_records_budget_match(cfg_for):
    out = run_cell(cfg_for("model=tiny-llama-gqa", "method=flap", "ratio=0.2", "eval.ppl.max_windows=1",
                           "calibration=native", "method.calib.n_samples=8"))
    plan = json.loads((out / "plan.json").read_text())
    rows = [json.loads(line) for line in (out / "records.jsonl").read_text().splitlines()]
    assert plan["kind"] == "width" and rows[0]["calibration"] == "native"
    assert {k: rows[0][f"calib_{k}"] for k in ("dataset", "n_samples", "seq_len", "seed")} == {
        "dataset": "wikitext2", "n_samples": 8, "seq_len": 128, "seed": 0}
    assert rows[0]["calib_source"].endswith("(stand-in for wikitext2)")
    assert rows[0]["params"] == plan["predicted_params"]
    assert rows[0]["target_params"] == plan["target_params"] and rows[0]["budget_matched"] is True
    scores = pd.read_csv(out / "scores.csv")
    assert list(scores.columns) == ["layer", "unit", "index", "score"] and set(scores.unit) == {"q", "kv", "channel"}


def test_shared_calibration_switch(cfg_for):
    out = run_cell(cfg_for("model=tiny-llama-gqa", "method=llm_pruner", "ratio=0.2", "eval.ppl.max_windows=1",
                           "calibration=shared", "shared_calib.n_samples=4"))
    row = json.loads((out / "records.jsonl").read_text().splitlines()[0])
    assert row["calibration"] == "shared" and row["calib_n_samples"] == 4
    assert torch.load(out / "calib.pt").shape == (4, 128)


def test_multirun_sweeps_cells_in_one_process(tmp_path, data_root):
    out = tmp_path / "sweep"
    run = cli("-m", "model=tiny-llama", "method=dense,depth_magnitude", "ratio=0.25,0.4", "eval.ppl.max_windows=1",
              f"out_dir={out}", data_root=data_root, tmp_path=tmp_path)
    assert run.returncode == 0, run.stderr
    cells = sorted(p.parent.relative_to(out).as_posix() for p in out.rglob("records.jsonl"))
    # dense ignores ratio: its second point is skipped, not run twice
    assert cells == ["tiny-llama/dense/r0", "tiny-llama/depth_magnitude+/r0.25", "tiny-llama/depth_magnitude+/r0.4"]
    bad = cli("-m", "method=dense,nope", data_root=data_root, tmp_path=tmp_path)
    assert bad.returncode != 0 and "method='nope': allowed values are" in bad.stderr


def test_interrupted_cell_redoes_only_the_unfinished_units(cfg_for, monkeypatch, tmp_path):
    """A cell killed inside its evaluation keeps its finished units in partial.jsonl; the rerun measures only the
    rest, and its records equal those of an uninterrupted run."""
    import bench.evals.perplexity as ppl

    args = ("model=tiny-llama", "method=depth_magnitude", "ratio=0.25", "eval.ppl.max_windows=2",
            "eval.ppl.bos_modes=[once,every]")
    real, calls = ppl.window_nll, []  # one call per perplexity unit

    def failing_third(*a, **k):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("injected failure in the third unit")
        return real(*a, **k)

    monkeypatch.setattr(ppl, "window_nll", failing_third)
    with pytest.raises(RuntimeError, match="injected"):
        run_cell(cfg_for(*args))
    cell = tmp_path / "results" / "tiny-llama" / "depth_magnitude+" / "r0.25"
    partial = [json.loads(line) for line in (cell / "partial.jsonl").read_text().splitlines()]
    assert [e["unit"] for e in partial] == ["ppl/wikitext2/once", "ppl/wikitext2/every"]
    assert not (cell / "records.jsonl").exists()
    error = json.loads((cell / "error.json").read_text())  # the stage's finished units, as records would hold them
    assert [(r["task"], r["metric"], r["method"]) for r in error["rows"]] == [("wikitext2", "ppl", "depth_magnitude+"),
                                                                             ("wikitext2", "ppl_bos", "depth_magnitude+")]

    calls.clear()
    monkeypatch.setattr(ppl, "window_nll", lambda *a, **k: calls.append(1) or real(*a, **k))
    run_cell(cfg_for(*args))
    assert len(calls) == 2  # the two PTB units only
    assert not (cell / "partial.jsonl").exists() and not (cell / "error.json").exists()
    resumed = [r for r in map(json.loads, (cell / "records.jsonl").read_text().splitlines()) if r["stage"] != "memory"]
    assert [(r["task"], r["metric"]) for r in resumed] == [("wikitext2", "ppl"), ("wikitext2", "ppl_bos"),
                                                           ("ptb", "ppl"), ("ptb", "ppl_bos")]
    fresh = run_cell(cfg_for(*args, f"out_dir={tmp_path / 'fresh'}"))
    expected = [r["value"] for r in map(json.loads, (fresh / "records.jsonl").read_text().splitlines())
                if r["stage"] != "memory"]
    assert [r["value"] for r in resumed] == pytest.approx(expected, rel=1e-9)


def test_a_failure_right_after_a_unit_is_stored_keeps_it_in_error_json(cfg_for, monkeypatch, tmp_path):
    """SLURM's SIGTERM can land just after partial.jsonl is replaced, before the unit's call returns (seen in CI's
    scancel test): error.json must still hold that unit's rows, since the file says it is finished."""
    import bench.records as records

    real, writes = records.write_atomic, []

    def killed_after_second_unit(path, text):
        real(path, text)
        if path.name == "partial.jsonl":
            writes.append(1)
            if len(writes) == 2:
                raise RuntimeError("injected signal after the write")

    monkeypatch.setattr(records, "write_atomic", killed_after_second_unit)
    with pytest.raises(RuntimeError, match="injected"):
        run_cell(cfg_for("model=tiny-llama", "method=depth_magnitude", "ratio=0.25", "eval.ppl.max_windows=1",
                         "eval.ppl.bos_modes=[once]"))
    cell = tmp_path / "results" / "tiny-llama" / "depth_magnitude+" / "r0.25"
    stored = [json.loads(line)["unit"] for line in (cell / "partial.jsonl").read_text().splitlines()]
    error = json.loads((cell / "error.json").read_text())
    assert stored == ["ppl/wikitext2/once", "ppl/ptb/once"]
    assert [r["task"] for r in error["rows"] if r["stage"] == "ppl"] == ["wikitext2", "ptb"]


def test_finished_units_are_reused_only_for_the_same_model_and_config(tmp_path):
    from bench.records import Progress

    path, calls = tmp_path / "partial.jsonl", []
    measure = lambda: calls.append(1) or [{"value": len(calls)}]  # noqa: E731
    assert Progress(path, "model-a").run("ppl/ptb/once", {"max_windows": 2}, measure) == [{"value": 1}]
    assert Progress(path, "model-a").run("ppl/ptb/once", {"max_windows": 2}, measure) == [{"value": 1}]
    assert Progress(path, "model-b").run("ppl/ptb/once", {"max_windows": 2}, measure) == [{"value": 2}]
    assert Progress(path, "model-b").run("ppl/ptb/once", {"max_windows": 4}, measure) == [{"value": 3}]
    assert len(calls) == 3 and len(path.read_text().splitlines()) == 1
    Progress(path, "model-b").finish()
    assert not path.exists()


def test_a_resumable_unit_keeps_its_checkpoints_until_it_finishes(tmp_path):
    from bench.records import UNIT_SCRATCH, Progress

    path, folders = tmp_path / "partial.jsonl", []

    def killed(folder):
        folders.append(folder)
        (folder / "answered").write_text("2 of 4")
        raise KeyboardInterrupt

    def finish(folder):
        folders.append(folder)
        return [{"value": (folder / "answered").read_text() if (folder / "answered").exists() else "fresh"}]

    with pytest.raises(KeyboardInterrupt):
        Progress(path, "model-a").run("zeroshot/piqa", {"limit": None}, killed, resumable=True)
    assert Progress(path, "model-a").run("zeroshot/piqa", {"limit": None}, finish, resumable=True) == [
        {"value": "2 of 4"}]
    assert folders[0] == folders[1] and not folders[0].exists()
    with pytest.raises(KeyboardInterrupt):
        Progress(path, "model-a").run("zeroshot/boolq", {"limit": None}, killed, resumable=True)
    assert Progress(path, "model-b").run("zeroshot/boolq", {"limit": None}, finish, resumable=True) == [
        {"value": "fresh"}]  # another model: the old checkpoints are not used, and go
    assert not folders[2].exists() and folders[3] != folders[2]
    Progress(path, "model-b").finish()
    assert not (tmp_path / UNIT_SCRATCH).exists()
    assert Progress().run("zeroshot/piqa", {}, lambda folder: [{"folder": folder}], resumable=True) == [
        {"folder": None}]
