"""bench.sweep's SIGTERM handling inside a SLURM task, without a cluster (tests/slurm/ runs it on one: make
test-slurm)."""

from __future__ import annotations

import signal

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
