"""One process per cell (bench/lock.py): the lock file, who counts as gone, takeovers, refresh, and the runner
skipping a cell that a live process holds."""

from __future__ import annotations

import json
import logging
import multiprocessing
import os
import platform
import subprocess
import sys
import time
from dataclasses import asdict, replace

import pytest

from bench.lock import LOCK, CellLock, Owner, read_owner
from bench.runner import CellBusy, run_cell
from bench.runner import cell as cell_of
from bench.sweep import summarize


def write_lock(cell, **fields) -> Owner:
    """A lock file in `cell` as another process would have left it (fields override this process's)."""
    owner = replace(Owner.me(), **fields)
    cell.mkdir(parents=True, exist_ok=True)
    (cell / LOCK).write_text(json.dumps(asdict(owner)))
    return owner


@pytest.fixture()
def sleeper():
    """A live process on this host (not this one)."""
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    yield proc
    proc.kill()
    proc.wait()


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_acquire_writes_owner_and_release_removes(tmp_path):
    cell = tmp_path / "cell"
    with CellLock(cell) as lock:
        assert lock.busy is None
        held = read_owner(cell / LOCK)
        assert (held.host, held.pid) == (platform.node(), os.getpid())
        assert held.started_s <= held.refreshed_s and held.token == lock.owner.token
        assert sorted(p.name for p in cell.iterdir()) == [LOCK]  # no temporary file left
    assert not (cell / LOCK).exists()


def test_live_owner_on_this_host_keeps_the_cell(tmp_path, sleeper):
    cell = tmp_path / "cell"
    other = write_lock(cell, pid=sleeper.pid, pid_start=None, token="other")
    with CellLock(cell) as lock:
        assert lock.busy == other
    assert read_owner(cell / LOCK) == other  # a skipped cell leaves the owner's lock alone


@pytest.mark.parametrize("fields, why", [
    (lambda: {"pid": dead_pid()}, "is not running"),
    (lambda: {"host": "elsewhere", "refreshed_s": time.time() - 1000}, "not refreshed for"),
    (lambda: {"pid_start": -5}, "is not running"),  # this pid now belongs to another process (reused)
])
def test_gone_owner_is_taken_over_with_a_warning(tmp_path, caplog, fields, why):
    cell = tmp_path / "cell"
    write_lock(cell, token="stale", **fields())
    with caplog.at_level(logging.WARNING, logger="bench.lock"), CellLock(cell, stale_s=600) as lock:
        assert lock.busy is None and read_owner(cell / LOCK).token == lock.owner.token
    (line,) = [r.getMessage() for r in caplog.records]
    assert "taking over the lock of" in line and why in line


def test_fresh_owner_on_another_host_keeps_the_cell(tmp_path):
    cell = tmp_path / "cell"
    other = write_lock(cell, host="elsewhere", refreshed_s=time.time() - 30, token="other")
    with CellLock(cell, stale_s=600) as lock:
        assert lock.busy == other


def test_requeued_slurm_task_takes_over_its_own_lock(tmp_path, monkeypatch):
    """A requeued task keeps its job id and array index, lands on any node, and its restart count goes up."""
    cell = tmp_path / "cell"
    write_lock(cell, host="node7", refreshed_s=time.time(), slurm_task="41_3", slurm_restart=0, token="before")
    monkeypatch.setenv("SUBMITIT_EXECUTOR", "slurm")
    monkeypatch.setenv("SLURM_ARRAY_JOB_ID", "41")
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "3")
    monkeypatch.setenv("SLURM_RESTART_COUNT", "0")
    with CellLock(cell) as lock:  # the same task, not restarted: another live holder (two srun steps)
        assert lock.busy is not None
    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")
    with CellLock(cell) as lock:
        assert lock.busy is None and read_owner(cell / LOCK).slurm_restart == 1


def test_unreadable_lock_is_taken_over(tmp_path):
    cell = tmp_path / "cell"
    cell.mkdir()
    (cell / LOCK).write_text('{"host": "a", "pid"')  # cut short
    with CellLock(cell) as lock:
        assert lock.busy is None


def test_refresh_moves_the_time_while_held(tmp_path):
    cell = tmp_path / "cell"
    with CellLock(cell, refresh_s=0.05) as lock:
        first = read_owner(cell / LOCK).refreshed_s
        deadline = time.time() + 300  # a hang guard: the refresh comes every 0.05 s
        while read_owner(cell / LOCK).refreshed_s == first and time.time() < deadline:
            time.sleep(0.02)
        assert read_owner(cell / LOCK).refreshed_s > first
        assert read_owner(cell / LOCK).token == lock.owner.token


def _contend(cell, barrier, won):
    barrier.wait()
    lock = CellLock(cell)
    if lock.acquire() is None:
        won.put(os.getpid())
        barrier.wait()  # hold the lock until every contender has tried
        lock.release()
    else:
        barrier.wait()


def test_processes_taking_over_one_stale_lock_end_with_one_owner(tmp_path):
    cell = tmp_path / "cell"
    write_lock(cell, pid=dead_pid(), token="stale")
    ctx = multiprocessing.get_context("fork")
    barrier, won = ctx.Barrier(6), ctx.Queue()
    procs = [ctx.Process(target=_contend, args=(cell, barrier, won)) for _ in range(6)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
    winners = [won.get(timeout=5) for _ in range(won.qsize())] if not won.empty() else []
    assert len(winners) == 1, winners
    assert not (cell / LOCK).exists() and not list(cell.glob(".cell.lock*"))


def test_runner_skips_a_cell_a_live_process_holds(cfg_for, sleeper, caplog):
    cfg = cfg_for("model=tiny-llama", "method=depth_magnitude", "ratio=0.25", "eval.ppl.max_windows=1",
                  "eval.ppl.bos_modes=[once]")
    _, _, cell = cell_of(cfg)
    write_lock(cell, pid=sleeper.pid, pid_start=None, token="other")
    with caplog.at_level(logging.INFO, logger="bench.run"), pytest.raises(CellBusy):
        run_cell(cfg)
    assert not (cell / "records.jsonl").exists()
    assert any(f"cell {cell} is being computed by {platform.node()}:{sleeper.pid} since" in r.getMessage()
               and r.getMessage().endswith(": skipped") for r in caplog.records)
    sleeper.kill()
    sleeper.wait()
    assert run_cell(cfg) == cell and (cell / "records.jsonl").exists() and not (cell / LOCK).exists()


def test_summary_counts_busy_cells(tmp_path):
    for n, status in enumerate(["ran", "busy", "skipped", "busy"]):
        (tmp_path / str(n)).mkdir()
        (tmp_path / str(n) / "status.json").write_text(json.dumps({"status": status, "overrides": []}))
    summary = summarize(tmp_path)
    assert (summary["ran"], summary["busy"], summary["skipped"], summary["failed"]) == (1, 2, 1, 0)
