"""Progress a person can follow: the bar helper's on/off rule (TQDM_DISABLE, CI, non-tty, forced), log lines
printed above a shown bar, the job count of a sweep, and the `cell i/n:` line every job logs."""

from __future__ import annotations

import io
import json
import logging
import os
import subprocess
import sys

import pytest

from bench.progress import bar, enabled
from bench.sweep import count_jobs


class Tty(io.StringIO):
    def isatty(self):
        return True


@pytest.fixture()
def clean_env(monkeypatch):
    for name in ("TQDM_DISABLE", "BENCH_PROGRESS", "CI"):
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


def test_on_a_terminal_only_and_off_under_ci_or_tqdm_disable(clean_env):
    assert enabled(Tty()) and not enabled(io.StringIO())  # a terminal shows bars, a log file or pipe does not
    clean_env.setenv("CI", "true")
    assert not enabled(Tty())
    clean_env.setenv("BENCH_PROGRESS", "1")  # forced on: a log file or CI shows bars too
    assert enabled(io.StringIO()) and enabled(Tty())
    clean_env.setenv("TQDM_DISABLE", "1")  # the universal off switch wins
    assert not enabled(Tty())
    clean_env.setenv("TQDM_DISABLE", "0")
    clean_env.setenv("BENCH_PROGRESS", "0")
    assert not enabled(Tty())


def test_bar_writes_to_stderr_when_shown_and_nothing_when_not(clean_env):
    clean_env.setattr(sys, "stderr", Tty())
    assert list(bar(range(3), desc="shown")) == [0, 1, 2]
    assert "shown:" in sys.stderr.getvalue() and sys.stderr.getvalue().endswith("\r")  # cleared when done
    clean_env.setattr(sys, "stderr", io.StringIO())  # not a terminal: off
    assert bar(total=3, desc="hidden").disable
    clean_env.setenv("BENCH_PROGRESS", "1")
    with bar(total=2, desc="forced") as b:
        b.update(2)
    assert "forced" in sys.stderr.getvalue()
    clean_env.setenv("TQDM_DISABLE", "1")
    clean_env.setattr(sys, "stderr", Tty())
    assert list(bar(range(2), desc="off")) == [0, 1] and sys.stderr.getvalue() == ""


def test_log_lines_print_above_a_shown_bar(clean_env):
    clean_env.setattr(sys, "stderr", Tty())
    console = logging.StreamHandler(sys.stderr)
    root = logging.getLogger()
    root.addHandler(console)
    try:
        with bar(total=2, desc="scoring") as b:
            assert console not in root.handlers  # redirected through tqdm.write while the bar is shown
            logging.getLogger("bench.test").warning("halfway")
            b.update(2)
        assert console in root.handlers
    finally:
        root.removeHandler(console)
    assert "halfway\n" in sys.stderr.getvalue()


def test_count_jobs_as_the_basic_sweeper():
    assert count_jobs(["model=tiny-llama", "method=a,b,c", "ratio=0.2,0.35"]) == 6
    # the sweep config's params come first; the command line's override of the same key wins
    assert count_jobs(["method=a,b", "ratio=0.2,0.35", "ratio=0.1", "+sweep=default", "seed=range(1,4)"]) == 6


def run_bench(args, tmp_path, data_root, forced: bool = False):
    """`python -m bench` with the test data; bars by the default rule (stderr is a pipe: off), or forced on."""
    env = {k: v for k, v in os.environ.items() if k not in ("BENCH_PROGRESS", "TQDM_DISABLE", "CI")}
    env |= {"BENCH_DATA": str(data_root), "BENCH_CACHE": str(tmp_path / "cache")}
    if forced:
        env["BENCH_PROGRESS"] = "1"
    run = subprocess.run([sys.executable, "-m", "bench", *args], env=env, cwd=tmp_path, capture_output=True,
                         text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    return run


def test_every_job_logs_its_cell_number_and_a_single_run_its_cell(tmp_path, data_root):
    out = tmp_path / "res"
    common = ["model=tiny-llama", "eval.stages=[ppl]", "eval.ppl.max_windows=1", "eval.ppl.bos_modes=[once]",
              f"out_dir={out}"]
    sweep = run_bench(["-m", *common, "method=depth_magnitude,dense", "ratio=0.25,0.4"], tmp_path, data_root)
    logs = sweep.stdout + sweep.stderr
    assert [line.split("] - ", 1)[1] for line in logs.splitlines() if "] - cell " in line] == [
        "cell 1/4: tiny-llama depth_magnitude+ r0.25", "cell 2/4: tiny-llama depth_magnitude+ r0.4",
        "cell 3/4: tiny-llama dense r0", "cell 4/4: tiny-llama dense r0 (done, skipping)"]
    assert json.loads(next(out.glob(".hydra/*/jobs.json")).read_text())["jobs"] == 4
    assert "\r" not in sweep.stderr  # stderr is a pipe here: no bars

    single = run_bench([*common, "method=depth_magnitude", "ratio=0.25"], tmp_path, data_root)
    assert "] - cell: tiny-llama depth_magnitude+ r0.25 (done, skipping)" in single.stdout + single.stderr
    forced = run_bench([*common, "method=depth_magnitude", "ratio=0.3"], tmp_path, data_root, forced=True)
    assert "] - cell: tiny-llama depth_magnitude+ r0.3\n" in forced.stdout + forced.stderr
    assert "ppl wikitext2 ppl" in forced.stderr  # forced on: the perplexity bar, on stderr
