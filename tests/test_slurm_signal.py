"""bench.sweep's SIGTERM handling inside a SLURM task, without a cluster (tests/slurm/ runs it on one: make
test-slurm)."""

from __future__ import annotations

import pickle
import signal
import sys
import time

import cloudpickle
import pytest

from bench.sweep import SweepSummary, Terminated


def test_sigterm_ends_the_cell_only_inside_a_slurm_task(monkeypatch):
    before = signal.getsignal(signal.SIGTERM)
    logged = []
    try:
        signal.signal(signal.SIGTERM, lambda signum, frame: logged.append(signum))  # stands in for submitit's
        stand_in = signal.getsignal(signal.SIGTERM)
        callback = SweepSummary()

        monkeypatch.delenv("SUBMITIT_EXECUTOR", raising=False)  # in-process or submitit_local: left alone
        callback.on_job_start(None, task_function=None)
        assert signal.getsignal(signal.SIGTERM) is stand_in
        callback.on_job_end(None, None)

        monkeypatch.setenv("SUBMITIT_EXECUTOR", "slurm")
        monkeypatch.setenv("SLURM_ARRAY_JOB_ID", "12")
        monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "3")
        callback.on_job_start(None, task_function=None)
        with pytest.raises(Terminated, match=r"SIGTERM to SLURM task 12_3 \(scancel, the time limit or preemption\)"):
            signal.raise_signal(signal.SIGTERM)
        signal.raise_signal(signal.SIGTERM)  # the second goes to the handler it replaced
        assert logged == [signal.SIGTERM]
        callback.on_job_start(None, task_function=None)
        callback.on_job_end(None, None)  # a cell that ended without SIGTERM gives the handler back
        assert signal.getsignal(signal.SIGTERM) is stand_in
    finally:
        signal.signal(signal.SIGTERM, before)


def started_in_task(monkeypatch) -> SweepSummary:
    """The callback after on_job_start inside SLURM task 12 (submitit's environment)."""
    monkeypatch.setenv("SUBMITIT_EXECUTOR", "slurm")
    monkeypatch.setenv("SLURM_JOB_ID", "12")
    callback = SweepSummary()
    callback.on_job_start(None, task_function=None)
    return callback


def test_the_time_limit_warning_gives_sigterm_back_before_submitit_requeues(monkeypatch):
    """SIGUSR2 (submitit's requeue, which has SLURM send SIGTERM at once) first gives SIGTERM back to submitit's
    handler, then runs submitit's own: a SIGTERM during the requeue is only logged, never `Terminated`."""
    before = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGUSR2)
    calls = []
    try:
        signal.signal(signal.SIGTERM, lambda signum, frame: calls.append("logged SIGTERM"))  # submitit's bypass
        signal.signal(signal.SIGUSR2, lambda signum, frame: (calls.append("requeue"),
                                                             signal.raise_signal(signal.SIGTERM)))
        stand_ins = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGUSR2)
        callback = started_in_task(monkeypatch)
        signal.raise_signal(signal.SIGUSR2)
        assert calls == ["requeue", "logged SIGTERM"]
        callback.on_job_end(None, None)
        assert (signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGUSR2)) == stand_ins
    finally:
        signal.signal(signal.SIGTERM, before[0])
        signal.signal(signal.SIGUSR2, before[1])


def test_an_exception_a_del_drops_is_raised_again(monkeypatch):
    """SIGTERM handled inside a __del__ (garbage collection): Python drops the Terminated raised there; the
    callback raises it again at the next safe point, so the cell still ends."""
    before = signal.getsignal(signal.SIGTERM), sys.unraisablehook

    class Collected:
        def __del__(self):
            signal.raise_signal(signal.SIGTERM)

    try:
        signal.signal(signal.SIGTERM, lambda signum, frame: None)
        callback = started_in_task(monkeypatch)
        with pytest.raises(Terminated, match="SIGTERM to SLURM task 12"):
            Collected()
            deadline = time.time() + 10
            while time.time() < deadline:
                time.sleep(0.01)
        callback.on_job_end(None, None)
        assert sys.unraisablehook is before[1]
    finally:
        signal.signal(signal.SIGTERM, before[0])
        sys.unraisablehook = before[1]


def test_pickles_without_its_handlers(monkeypatch):
    before = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGUSR2), sys.unraisablehook
    try:
        signal.signal(signal.SIGUSR2, lambda signum, frame: None)
        callback = started_in_task(monkeypatch)
        copy = pickle.loads(cloudpickle.dumps(callback))
        assert copy._sigterm is None and copy._unraisable is None
        callback.on_job_end(None, None)
    finally:
        signal.signal(signal.SIGTERM, before[0])
        signal.signal(signal.SIGUSR2, before[1])
        sys.unraisablehook = before[2]
