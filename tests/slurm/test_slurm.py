"""Sweeps on a real SLURM controller: one array, the tasks' environment, failures, scancel, the time limit, the
requeue at the time limit, the resubmission, and array_parallelism, on tiny-llama with the quick perplexity evaluation.

    make test-slurm        # tests/slurm/up.sh: installs slurm-wlm and munge if missing, starts a one-node cluster,
                           # runs this module against it, stops the cluster

Skipped unless tests/slurm/up.sh runs them (it exports BENCH_SLURM_CLUSTER and SLURM_CONF), so `make test` never
submits to whatever cluster the machine belongs to. The node has no GPU: every sweep overrides the launcher's
gpus_per_node=1 with 0, partition=debug, one CPU and 2 GB a task.
"""

from __future__ import annotations

import json
import os
import platform
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

if not os.environ.get("BENCH_SLURM_CLUSTER"):
    pytest.skip("no test SLURM cluster (make test-slurm starts one: tests/slurm/up.sh)", allow_module_level=True)

LAUNCHER = ["hydra/launcher=slurm", "hydra.launcher.partition=debug", "hydra.launcher.gpus_per_node=0",
            "hydra.launcher.cpus_per_task=1", "hydra.launcher.mem_gb=2", "hydra.launcher.timeout_min=10"]
QUICK = ["model=tiny-llama", "eval.stages=[ppl]", "eval.ppl.max_windows=1", "eval.ppl.bos_modes=[once]"]
# The perplexity units (two corpora), then a speed stage that runs for at least SPEED_S seconds: a task is
# stopped in it once partial.jsonl holds the perplexity units.
SPEED_S = 5
PPL_UNITS = ["ppl/wikitext2/once", "ppl/ptb/once"]
LONG = ["model=tiny-llama", "eval.stages=[ppl,speed]", "eval.ppl.max_windows=1", "eval.ppl.bos_modes=[once]",
        "eval.speed.batch_sizes=[1]", "eval.speed.new_tokens=[4]", "eval.speed.warmup=0", "eval.speed.repeats=1"]
TIMEOUT_S = 600  # a wedged cluster fails a test, not CI's 90 minutes


def slurm_cmd(args: list[str], tmp_path: Path, data_root: Path, setup: list[str] = ()) -> tuple[list[str], dict]:
    """`python -m bench -m hydra/launcher=slurm ...` as a user submits it. BENCH_DATA and BENCH_CACHE reach the
    tasks only through the launcher's setup lines (the submitting process has neither), after activating this
    virtual environment as a cluster's setup would; each task appends its array ids and VIRTUAL_ENV to setup.log.
    `setup`: more lines, run after those (no `${`: Hydra would read it as an interpolation)."""
    setup = [f"export BENCH_DATA={data_root}", f"export BENCH_CACHE={tmp_path / 'cache'}",
             f'echo "$SLURM_ARRAY_JOB_ID $SLURM_ARRAY_TASK_ID $VIRTUAL_ENV" >> {tmp_path / "setup.log"}', *setup]
    if (Path(sys.prefix) / "bin" / "activate").exists():
        setup.insert(0, f"source {Path(sys.prefix) / 'bin' / 'activate'}")
    lines = ",".join(f"'{line}'" for line in setup)
    env = {k: v for k, v in os.environ.items() if k not in ("BENCH_DATA", "BENCH_CACHE", "VIRTUAL_ENV")}
    return [sys.executable, "-m", "bench", "-m", *LAUNCHER, f"hydra.launcher.setup=[{lines}]", *args], env


def local_cmd(args: list[str], cache: Path, data_root: Path) -> tuple[list[str], dict]:
    """The same sweep with Hydra's in-process launcher."""
    env = os.environ | {"BENCH_DATA": str(data_root), "BENCH_CACHE": str(cache)}
    return [sys.executable, "-m", "bench", "-m", *args], env


def cells(out: Path) -> list[str]:
    return sorted(p.parent.relative_to(out).as_posix() for p in out.rglob("records.jsonl"))


def summaries(out: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted(out.glob(".hydra/*/summary.json"))]


def queue(*options: str) -> list[tuple[str, str, str]]:
    """(task id, state, reason) of every queued task, one line per array task (`--states=all`: also the tasks
    that ended in the last MinJobAge seconds)."""
    lines = subprocess.run(["squeue", "-h", "-r", "-o", "%i|%T|%r", *options], capture_output=True, text=True,
                           check=True).stdout.split()
    return [tuple(line.split("|")) for line in lines]


def wait_for_empty_queue(timeout_s: float = 60) -> None:
    deadline = time.time() + timeout_s
    while queue():
        assert time.time() < deadline, f"tasks still queued: {queue()}"
        time.sleep(0.5)


@pytest.fixture()
def submit():
    """Start a submitting process (output to `log`); at the end of the test, any still running is killed and the
    cluster's tasks are cancelled, so a failed test leaves nothing queued for the next."""
    started = []

    def start(cmd: list[str], env: dict, log: Path) -> subprocess.Popen:
        started.append(subprocess.Popen(cmd, env=env, cwd=log.parent, stdout=log.open("w"),
                                        stderr=subprocess.STDOUT, text=True))
        return started[-1]

    yield start
    for proc in started:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    jobs = {task.split("_")[0] for task, _, _ in queue()}
    if jobs:
        subprocess.run(["scancel", *sorted(jobs)], check=True)
    wait_for_empty_queue()


def finish(proc: subprocess.Popen, log: Path) -> str:
    """Wait for a submitting process; its output, which must end in success."""
    try:
        proc.wait(timeout=TIMEOUT_S)
    finally:
        if proc.poll() is None:
            proc.kill()
    text = log.read_text()
    assert proc.returncode == 0, text[-4000:]
    return text


def task_of(sweep_dir: Path, method: str) -> str:
    """The SLURM task id (array_index) of the job whose overrides name `method`: the array index is the Hydra job
    number, and submitit names each task's folder after its id."""
    for folder in sorted((sweep_dir / ".submitit").iterdir()):
        if not re.fullmatch(r"\d+_\d+", folder.name):
            continue
        index = folder.name.split("_")[1]
        overrides = sweep_dir / index / ".hydra" / "overrides.yaml"
        if overrides.exists() and f"method={method}" in overrides.read_text():
            return folder.name
    raise AssertionError(f"no task for method={method} in {sweep_dir}")


def units(cell: Path) -> list[str]:
    path = cell / "partial.jsonl"
    return [json.loads(line)["unit"] for line in path.read_text().splitlines()] if path.exists() else []


def test_array_writes_every_cell_like_the_in_process_sweep(tmp_path, data_root, submit):
    """One array of four cells (two of them fail: depth+ cannot remove half of tiny-llama's 12 blocks), one task at
    a time (array_parallelism=1, read from squeue while it runs); the tasks see the setup lines' environment; the
    report of the records is the in-process sweep's, value for value."""
    sweep = [*QUICK, "method=depth_magnitude,depth_taylor", "ratio=0.25,0.5"]
    out, ref = tmp_path / "slurm", tmp_path / "local"
    local = submit(*local_cmd([*sweep, f"out_dir={ref}"], tmp_path / "cache-local", data_root), tmp_path / "local.log")
    cmd, env = slurm_cmd([*sweep, f"out_dir={out}", "hydra.launcher.array_parallelism=1"], tmp_path, data_root)
    proc = submit(cmd, env, tmp_path / "slurm.log")
    running_max, throttled = 0, set()
    while proc.poll() is None:
        tasks = queue()
        running_max = max(running_max, sum(state == "RUNNING" for _, state, _ in tasks))
        throttled |= {task for task, state, reason in tasks if state == "PENDING" and reason == "JobArrayTaskLimit"}
        time.sleep(0.2)
    log = finish(proc, tmp_path / "slurm.log")
    finish(local, tmp_path / "local.log")

    done = ["tiny-llama/depth_magnitude+/r0.25", "tiny-llama/depth_taylor+/r0.25"]
    assert cells(out) == cells(ref) == done
    for failed in ("tiny-llama/depth_magnitude+/r0.5", "tiny-llama/depth_taylor+/r0.5"):
        error = json.loads((out / failed / "error.json").read_text())
        assert "only 6 may be removed" in error["message"], error
    summary = summaries(out)[-1]
    assert (summary["jobs"], summary["ran"], summary["failed"]) == (4, 2, 2)
    assert all("only 6 may be removed" in f["error"] for f in summary["failures"])
    assert "sweep: 4 jobs: 2 cells run, 0 skipped (already done), 2 failed" in log

    # One array, one task per job, each with the setup lines' environment and the submitting virtual environment.
    setup = [line.split() for line in (tmp_path / "setup.log").read_text().splitlines()]
    assert len({array for array, *_ in setup}) == 1 and sorted(int(t[1]) for t in setup) == [0, 1, 2, 3]
    venv = [sys.prefix] if (Path(sys.prefix) / "bin" / "activate").exists() else []
    assert all(t[2:] == venv for t in setup), setup
    script = next(out.glob(".hydra/*/.submitit/*/*_submission.sh")).read_text()
    assert "#SBATCH --array=0-3%1" in script and sys.executable in script
    rows = [json.loads(line) for cell in done for line in (out / cell / "records.jsonl").read_text().splitlines()]
    assert {r["host"] for r in rows} == {platform.node()}
    assert len({r["pid"] for r in rows}) == 2 and os.getpid() not in {r["pid"] for r in rows}
    config = (out / done[0] / "config.yaml").read_text()
    assert f"data_root: {data_root}" in config and f"cache_dir: {tmp_path / 'cache'}" in config

    # array_parallelism=1: never two tasks running, and the others held back by the array's limit.
    assert running_max == 1 and len(throttled) >= 1, (running_max, throttled)

    for root in (out, ref):
        report = subprocess.run([sys.executable, "-m", "bench.report", str(root)], capture_output=True, text=True)
        assert report.returncode == 0, report.stderr[-4000:]
    assert (out / "tables" / "main.csv").read_text() == (ref / "tables" / "main.csv").read_text()
    assert (out / "tables" / "main.md").read_text() == (ref / "tables" / "main.md").read_text()


def test_cancelled_task_is_redone_alone_from_its_finished_units(tmp_path, data_root, submit):
    """scancel mid-cell (the perplexity units done, the speed stage running): the cell leaves error.json and
    partial.jsonl, never records; the sweep goes on and ends with its summary. Resubmitting the same command skips
    the finished cells and redoes the cancelled one from its perplexity units."""
    out = tmp_path / "res"
    cmd, env = slurm_cmd([*LONG, f"eval.speed.min_time_s={SPEED_S}", "method=dense,depth_magnitude,depth_taylor",
                          "ratio=0.25", f"out_dir={out}", "hydra.launcher.array_parallelism=2"], tmp_path, data_root)
    proc = submit(cmd, env, tmp_path / "first.log")
    victim = out / "tiny-llama/depth_magnitude+/r0.25"
    deadline = time.time() + TIMEOUT_S
    while len(units(victim)) < len(PPL_UNITS):  # wikitext2 and ptb measured: the speed stage runs
        assert proc.poll() is None and time.time() < deadline, (tmp_path / "first.log").read_text()[-4000:]
        time.sleep(0.1)
    sweep_dir = next(out.glob(".hydra/*"))
    task = task_of(sweep_dir, "depth_magnitude")
    subprocess.run(["scancel", task], check=True)
    first = finish(proc, tmp_path / "first.log")
    assert dict((t, state) for t, state, _ in queue("--states=all"))[task] == "CANCELLED"

    assert not (victim / "records.jsonl").exists()
    error = json.loads((victim / "error.json").read_text())
    assert error["error"] == "Terminated" and f"SIGTERM to SLURM task {task}" in error["message"], error
    assert [r["task"] for r in error["rows"] if r["stage"] == "ppl"] == ["wikitext2", "ptb"], error["rows"]
    assert units(victim) == PPL_UNITS
    assert cells(out) == ["tiny-llama/dense/r0", "tiny-llama/depth_taylor+/r0.25"]
    assert "sweep: 3 jobs: 2 cells run, 0 skipped (already done), 1 failed" in first
    finished = {c: (out / c / "records.jsonl").stat().st_mtime_ns for c in cells(out)}
    wait_for_empty_queue()

    second = finish(submit(cmd, env, tmp_path / "second.log"), tmp_path / "second.log")
    assert cells(out) == ["tiny-llama/dense/r0", "tiny-llama/depth_magnitude+/r0.25", "tiny-llama/depth_taylor+/r0.25"]
    assert {c: (out / c / "records.jsonl").stat().st_mtime_ns for c in finished} == finished  # untouched
    assert "sweep: 3 jobs: 1 cells run, 2 skipped (already done), 0 failed" in second
    assert not (victim / "error.json").exists() and not (victim / "partial.jsonl").exists()
    rerun_dir = sorted(out.glob(".hydra/*"))[-1]
    job_logs = "".join(p.read_text() for p in rerun_dir.glob("*/*.log"))
    assert "reused 2 finished units of an interrupted run" in job_logs, job_logs[-4000:]
    rows = [json.loads(line) for line in (victim / "records.jsonl").read_text().splitlines()]
    assert {"ppl", "speed"} <= {r["stage"] for r in rows} and len({r["pid"] for r in rows}) == 1


def test_task_at_its_time_limit_leaves_error_json(tmp_path, data_root, submit):
    """A one-minute time limit with SIGUSR2 15 s before it (signal_delay_s; SLURM sends it up to 30 s earlier) and
    a speed stage that would run for ten minutes: submitit's handler ends the cell (max_num_timeout=0: no requeue),
    which leaves error.json and partial.jsonl, no records; the task ends with a result, so the sweep ends with its
    summary."""
    out = tmp_path / "res"
    cmd, env = slurm_cmd([*LONG, "eval.speed.min_time_s=600", "method=depth_magnitude", "ratio=0.25",
                          f"out_dir={out}", "hydra.launcher.timeout_min=1", "hydra.launcher.signal_delay_s=15"],
                         tmp_path, data_root)
    log = finish(submit(cmd, env, tmp_path / "slurm.log"), tmp_path / "slurm.log")
    cell = out / "tiny-llama/depth_magnitude+/r0.25"
    assert not (cell / "records.jsonl").exists()
    error = json.loads((cell / "error.json").read_text())
    assert error["error"] == "UncompletedJobError" and "timed-out" in error["message"], error
    done = units(cell)  # the perplexity units finished before the signal (both, unless the machine is slow)
    assert done == PPL_UNITS[:len(done)], done
    assert "sweep: 1 jobs: 0 cells run, 0 skipped (already done), 1 failed" in log


def test_task_at_its_time_limit_is_requeued_and_resumes_its_cell(tmp_path, data_root, submit):
    """max_num_timeout=1, a two-minute time limit and SIGUSR2 35 s before it (55 to 85 s after the task starts:
    SLURM looks every 30 s): at the signal submitit requeues the task (scontrol requeue, then exit) instead of
    ending the cell. The first run leaves partial.jsonl with its finished units and no error.json; SLURM holds the
    task (PENDING, BeginTime: cred_expire + 1 s, slurm.conf.in) and starts it again under the same job id with
    SLURM_RESTART_COUNT=1; that run finishes the cell, reusing the first run's units and saying how many in its
    log. The cell needs both runs: min_time_s reads BENCH_TEST_SPEED_S, which a setup line sets to 0 in a restarted
    task only (600 s in the first run), and the dense model is not measured alongside, so the second run (about
    15 s) ends well before its own SIGUSR2."""
    out, restarts = tmp_path / "res", tmp_path / "restarts.log"
    speed = "eval.speed.min_time_s='${oc.decode:${oc.env:BENCH_TEST_SPEED_S,600}}'"
    cmd, env = slurm_cmd([*LONG, speed, "eval.speed.interleave_dense=false", "method=depth_magnitude", "ratio=0.25",
                          f"out_dir={out}", "hydra.launcher.timeout_min=2", "hydra.launcher.signal_delay_s=35",
                          "hydra.launcher.max_num_timeout=1"], tmp_path, data_root,
                         ['[ -z "$SLURM_RESTART_COUNT" ] || export BENCH_TEST_SPEED_S=0',
                          f'echo "$SLURM_JOB_ID restarts=$SLURM_RESTART_COUNT" >> {restarts}'])
    proc = submit(cmd, env, tmp_path / "slurm.log")
    cell = out / "tiny-llama/depth_magnitude+/r0.25"
    states, first, error_after_first = [], None, None
    while proc.poll() is None:  # the task's states; the cell as the first run left it, while the task is held
        state = [(s, reason) for _, s, reason in queue()]
        if state and (not states or states[-1] != state[0]):
            states.append(state[0])
        if first is None and state and state[0][0] == "PENDING" and any(s == "RUNNING" for s, _ in states):
            first, error_after_first = units(cell), (cell / "error.json").exists()
        time.sleep(0.5)
    log = finish(proc, tmp_path / "slurm.log")

    running = ("RUNNING", "None")
    assert running in states and ("PENDING", "BeginTime") in states[states.index(running):], states
    assert first and first == PPL_UNITS[:len(first)] and not error_after_first, (first, error_after_first)
    job = [line.split() for line in restarts.read_text().splitlines()]
    assert job == [[job[0][0], "restarts="], [job[0][0], "restarts=1"]], job
    task_log = "".join(p.read_text() for p in sorted(out.glob(".hydra/*/.submitit/*/*_log.*")))  # both runs
    assert "Requeued job" in task_log and "(0 remaining timeouts)" in task_log, task_log[-4000:]
    reused = f"reused {len(first)} finished units of an interrupted run ({', '.join(first)})"
    assert reused in task_log, task_log[-4000:]
    assert (cell / "records.jsonl").exists() and not (cell / "error.json").exists()
    assert not (cell / "partial.jsonl").exists()
    rows = [json.loads(line) for line in (cell / "records.jsonl").read_text().splitlines()]
    assert [r["task"] for r in rows if r["stage"] == "ppl"] == ["wikitext2", "ptb"]
    assert "speed" in {r["stage"] for r in rows}
    assert "sweep: 1 jobs: 1 cells run, 0 skipped (already done), 0 failed" in log
