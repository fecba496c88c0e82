"""Sweeps: resume after a kill -9, failures recorded without stopping the sweep, the summary, submitit."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import bench.evals.perplexity as perplexity
from bench import BenchError
from bench.config import CONF_DIR, compose
from bench.runner import run_cell

SWEEP = ["-m", "model=tiny-llama", "method=depth_magnitude,depth_taylor", "ratio=0.25,0.4", "eval.stages=[ppl]",
         "eval.ppl.max_windows=1", "eval.ppl.bos_modes=[once]"]


def bench_cmd(args, tmp_path, data_root):
    env = os.environ | {"BENCH_DATA": str(data_root), "BENCH_CACHE": str(tmp_path / "cache")}
    return [sys.executable, "-m", "bench", *args], env


def cells(out):
    return sorted(p.parent.relative_to(out).as_posix() for p in out.rglob("records.jsonl"))


def summaries(out):
    return [json.loads(p.read_text()) for p in sorted(out.glob(".hydra/*/summary.json"))]


def test_sweep_killed_after_first_cell_resumes_without_duplicates(tmp_path, data_root):
    out = tmp_path / "res"
    cmd, env = bench_cmd([*SWEEP, f"out_dir={out}"], tmp_path, data_root)
    proc = subprocess.Popen(cmd, env=env, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    deadline = time.time() + 300
    while not cells(out) and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)  # kill -9 while the second cell runs
    proc.wait()
    first = cells(out)
    assert len(first) == 1, first
    done = out / first[0] / "records.jsonl"
    mtime, rows_before = done.stat().st_mtime_ns, done.read_text()

    rerun = subprocess.run(cmd, env=env, cwd=tmp_path, capture_output=True, text=True)
    assert rerun.returncode == 0, rerun.stderr
    assert cells(out) == ["tiny-llama/depth_magnitude+/r0.25", "tiny-llama/depth_magnitude+/r0.4",
                          "tiny-llama/depth_taylor+/r0.25", "tiny-llama/depth_taylor+/r0.4"]
    assert done.stat().st_mtime_ns == mtime and done.read_text() == rows_before  # finished cell untouched
    for path in out.rglob("records.jsonl"):
        lines = [line for line in path.read_text().splitlines() if json.loads(line)["stage"] != "memory"]
        assert len(lines) == len(set(lines)) == 2  # wikitext2 + ptb, once each
    summary = summaries(out)[-1]
    assert (summary["ran"], summary["skipped"], summary["failed"]) == (3, 1, 0)
    assert "sweep: 4 jobs: 3 cells run, 1 skipped (already done), 0 failed" in rerun.stderr + rerun.stdout


def test_failing_cell_is_recorded_and_the_sweep_goes_on(tmp_path, data_root):
    out = tmp_path / "res"
    # ratio 0.5 of tiny-llama's 12 blocks removes 6, but depth+ may remove only 6 - 1: that cell fails at once
    cmd, env = bench_cmd(["-m", "model=tiny-llama", "method=depth_magnitude", "ratio=0.5,0.25", "eval.stages=[ppl]",
                          "eval.ppl.max_windows=1", f"out_dir={out}"], tmp_path, data_root)
    run = subprocess.run(cmd, env=env, cwd=tmp_path, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    assert cells(out) == ["tiny-llama/depth_magnitude+/r0.25"]
    summary = summaries(out)[-1]
    assert (summary["ran"], summary["failed"]) == (1, 1)
    assert "only 6 may be removed" in summary["failures"][0]["error"]


def test_nan_perplexity_fails_the_cell_with_its_rows(cfg_for, monkeypatch):
    monkeypatch.setattr(perplexity, "window_nll",
                        lambda model, wins, *a, **k: torch.full((len(wins),), float("nan"), dtype=torch.float64))
    cfg = cfg_for("model=tiny-llama", "method=depth_magnitude", "ratio=0.25", "eval.ppl.max_windows=1")
    with pytest.raises(BenchError, match="perplexity on wikitext2 is nan"):
        run_cell(cfg)
    cell = next(Path(cfg.out_dir).rglob("error.json"))
    error = json.loads(cell.read_text())
    assert error["error"] == "BenchError" and len(error["rows"]) == 4 and "Traceback" in error["traceback"]
    assert not (cell.parent / "records.jsonl").exists()
    monkeypatch.undo()
    run_cell(cfg)  # the rerun measures the failed units again, succeeds and clears the error
    assert (cell.parent / "records.jsonl").exists() and not cell.exists()
    rows = [r for r in map(json.loads, (cell.parent / "records.jsonl").read_text().splitlines())
            if r["stage"] != "memory"]
    assert len(rows) == 4 and all(math.isfinite(r["value"]) for r in rows)


def test_submitit_local_runs_cells_in_subprocesses(tmp_path, data_root):
    out = tmp_path / "res"
    cmd, env = bench_cmd(["-m", "hydra/launcher=submitit_local", "model=tiny-llama", "method=dense,depth_magnitude",
                          "ratio=0.25", "eval.stages=[ppl]", "eval.ppl.max_windows=1", f"out_dir={out}"],
                         tmp_path, data_root)
    run = subprocess.run(cmd, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr
    assert cells(out) == ["tiny-llama/dense/r0", "tiny-llama/depth_magnitude+/r0.25"]
    assert list(out.glob(".hydra/*/.submitit")), "the jobs did not go through submitit"
    pids = {json.loads(line)["pid"] for p in out.rglob("records.jsonl") for line in p.read_text().splitlines()}
    assert len(pids) == 2 and os.getpid() not in pids
    assert summaries(out)[-1]["ran"] == 2


def test_example_user_method_runs_through_a_sweep(tmp_path, data_root):
    """The worked example of adding a method (one module + one YAML with impl: module:Class) in a multirun."""
    out = tmp_path / "res"
    cmd, env = bench_cmd(["-m", "model=tiny-llama", "method=depth_random,depth_magnitude", "ratio=0.25",
                          "eval.stages=[ppl]", "eval.ppl.max_windows=1", f"out_dir={out}"], tmp_path, data_root)
    run = subprocess.run(cmd, env=env, cwd=tmp_path, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    assert cells(out) == ["tiny-llama/depth_magnitude+/r0.25", "tiny-llama/depth_random/r0.25"]
    plan = json.loads((out / "tiny-llama/depth_random/r0.25/plan.json").read_text())
    assert len(plan["remove"]) == 3 and all(4 <= b < 10 for b in plan["remove"]) and plan["extra"]["seed"] == 0
    rows = [json.loads(line) for line in (out / "tiny-llama/depth_random/r0.25/records.jsonl").read_text().splitlines()]
    assert rows[0]["params"] == json.loads((out / "tiny-llama/depth_magnitude+/r0.25/plan.json").read_text())[
        "predicted_params"]


def test_method_impl_errors_are_one_line():
    from bench.methods import build_method

    with pytest.raises(BenchError, match="method.impl='nope': allowed values are angular, block_influence, "
                                         "dense, .* or module:Class"):
        build_method({"impl": "nope"})
    with pytest.raises(BenchError, match="cannot import Nope from bench.methods.random_blocks"):
        build_method({"impl": "bench.methods.random_blocks:Nope"})


@pytest.mark.parametrize("sweep", sorted(p.stem for p in (CONF_DIR / "sweep").glob("*.yaml")))
def test_every_sweep_cell_composes(sweep):
    """Each sweep config's grid: every cell composes and passes the checks made before a model is loaded (a typo
    in a method name or an override fails here, not an hour into a sweep)."""
    import itertools

    from omegaconf import OmegaConf

    from bench.runner import cell

    grid = OmegaConf.load(CONF_DIR / "sweep" / f"{sweep}.yaml").hydra.sweeper.params
    params = {k: str(v).split(",") for k, v in grid.items()}
    labels = set()
    for values in itertools.product(*params.values()):
        cfg = compose([f"+sweep={sweep}", *(f"{k}={v}" for k, v in zip(params, values))])
        method, ratio, out = cell(cfg)
        labels.add(out.relative_to(cfg.out_dir).as_posix())
    assert len(labels) >= 1


def test_no_committed_records_where_a_sweep_writes():
    """A fresh clone's `make sweep` computes its cells: nothing is committed under results/<sweep>/ for any sweep
    config (the reference results live in results/reference/, where no sweep writes), and git ignores what a
    sweep writes there."""
    root = CONF_DIR.parents[1]
    if not (root / ".git").exists():
        pytest.skip("not a git checkout")
    git = ["git", "-C", str(root)]
    for sweep in sorted(p.stem for p in (CONF_DIR / "sweep").glob("*.yaml")):
        out = compose([f"+sweep={sweep}"]).out_dir
        assert out != "results/reference" and not out.startswith("results/reference/"), sweep
        tracked = subprocess.run([*git, "ls-files", out], capture_output=True, text=True, check=True).stdout
        assert tracked == "", f"{sweep}: committed files under {out}: {tracked.splitlines()[:3]}"
        probe = f"{out}/smollm2-135m/dense/r0/records.jsonl"
        assert subprocess.run([*git, "check-ignore", "-q", probe]).returncode == 0, f"{probe} is not ignored"
    reference = subprocess.run([*git, "ls-files", "results/reference"], capture_output=True, text=True).stdout
    assert "results/reference/default/tables/main.md" in reference
