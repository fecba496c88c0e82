"""Sweep bookkeeping: the number of jobs, each job's status, and the summary at the end of a multirun.

When a multirun starts, `SweepSummary` (a Hydra callback, conf/config.yaml) counts its jobs from the sweep's
overrides and writes `jobs.json` into the sweep directory, so that every job, in whatever process the launcher
runs it, can log which cell it is (`cell 3/16: smollm2-135m depth_taylor+ r0.2`, `cell_tag`). Every job writes
`status.json` (ran | skipped | busy | failed, the cell, the error) into its Hydra job directory: busy is a cell
another live process was computing (it holds the cell's lock, bench.lock). `SweepSummary` reads them all when the
multirun ends, with any launcher (in-process, submitit local or SLURM: the jobs' directories are on a shared
filesystem), logs the counts and the failures and writes `summary.json` into the sweep directory.

Inside a SLURM task (one cell per process) SIGTERM ends the cell with `Terminated`: SLURM sends it on `scancel`, at
the time limit and on preemption, KillWait seconds (30 by default) before SIGKILL. The cell writes its error.json,
the job its status.json and submitit its result, so the submitting process counts the cell as failed and goes on,
instead of waiting for sacct to report a task that died without a result (a cluster without accounting never does).
The rerun of the same command redoes the cell from its finished units. (What a handler raises while a __del__
runs, where Python drops exceptions, is raised again: `SweepSummary.on_job_start`.)

SIGUSR2, the time limit's warning (`signal_delay_s` before it; SLURM looks every 30 s, so up to 30 s earlier),
goes to submitit's handler, after SIGTERM has been given back to submitit (which only logs it). With no requeue
left (`max_num_timeout`, one used per time limit) the handler raises UncompletedJobError in the cell: error.json,
a failed cell, the rerun redoes it. Otherwise it runs `scontrol requeue` and exits (SystemExit: no error.json, no
result; partial.jsonl keeps the finished units and the cell's lock is released). The requeue makes SLURM send
SIGTERM at once: were it still `Terminated`, the exit would become a failed cell whose result ends the task for
the submitting process while SLURM starts it again. SLURM holds the requeued task for AuthInfo's cred_expire + 1
seconds (121 by default) and the next scheduling pass, then starts it under the same job id (SLURM_RESTART_COUNT
1, 2, ...); it runs the job again, which resumes the cell from its finished units (its log: "reused N
finished units of an interrupted run") and writes the result the submitting process waits for. Where a cluster
preempts with both signals, whichever comes first wins: a requeue (submitit requeues a preempted task whatever
max_num_timeout says), or a failed cell the rerun redoes. tests/slurm/test_slurm.py tests all of this on a
one-node cluster (`make test-slurm`).
"""

from __future__ import annotations

import json
import logging
import math
import os
import signal
import sys
import threading
from collections import Counter
from pathlib import Path

from hydra.experimental.callback import Callback
from omegaconf import OmegaConf

from bench.records import write_json

log = logging.getLogger("bench.sweep")
STATUS = "status.json"
JOBS = "jobs.json"


def count_jobs(overrides: list[str]) -> int:
    """How many jobs Hydra's basic sweeper makes of `overrides` (the sweep config's params, then the command
    line's): per key the number of values of a sweep (`a=1,2`, `range(...)`) or 1, the last override of a key
    winning as in the sweeper; the jobs are their product. Parsed with Hydra's own override parser."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    values = {}
    for override in OverridesParser.create().parse_overrides(overrides):
        values[override.get_key_element()] = (len(list(override.sweep_string_iterator()))
                                              if override.is_sweep_override() else 1)
    return math.prod(values.values())


def cell_tag(hc) -> str:
    """"cell 3/16" for job 3 of a 16-job multirun (the 1-based job number; the total from the sweep's jobs.json),
    "cell 3" when there is no jobs.json, "cell" in a single run. `hc`: the job's HydraConfig."""
    from hydra.types import RunMode

    if hc.mode != RunMode.MULTIRUN:
        return "cell"
    path = Path(hc.sweep.dir) / JOBS
    total = json.loads(path.read_text())["jobs"] if path.exists() else None
    return f"cell {hc.job.num + 1}" + (f"/{total}" if total else "")


def write_status(job_dir: str | Path, status: dict) -> None:
    write_json(Path(job_dir) / STATUS, status)


def summarize(sweep_dir: str | Path) -> dict:
    jobs = [json.loads(p.read_text()) for p in sorted(Path(sweep_dir).glob(f"*/{STATUS}"))]
    counts = Counter(job["status"] for job in jobs)
    failures = [{"cell": j.get("cell"), "overrides": j["overrides"], "error": j["error"]}
                for j in jobs if j["status"] == "failed"]
    return {"jobs": len(jobs), "ran": counts["ran"], "skipped": counts["skipped"], "busy": counts["busy"],
            "failed": counts["failed"], "failures": failures}


class Terminated(Exception):
    """SLURM sent SIGTERM to the task running this cell: scancel, the time limit or preemption."""


def slurm_task() -> str | None:
    """The SLURM task this process runs for submitit (`12_3` in an array, `12` alone), or None outside one: submitit's
    batch script exports SUBMITIT_EXECUTOR=slurm, so a sweep run in-process inside an allocation is not a task."""
    if os.environ.get("SUBMITIT_EXECUTOR") != "slurm":
        return None
    array, index = os.environ.get("SLURM_ARRAY_JOB_ID"), os.environ.get("SLURM_ARRAY_TASK_ID")
    return f"{array}_{index}" if array and index else os.environ.get("SLURM_JOB_ID", "?")


class SweepSummary(Callback):
    _sigterm = None  # the SIGTERM handler a SLURM task had before on_job_start (submitit's, which only logs it)
    _warning = None  # (signal, submitit's handler) of the time limit's warning, which on_job_start wraps
    _unraisable = None  # sys.unraisablehook before on_job_start
    _raised = None  # the exception a signal handler of this task raised last
    _dropped = None  # that exception, dropped by a __del__, to be raised again

    def __getstate__(self) -> dict:
        """None of this process's signal handling: submitit pickles the launcher, this callback included, at the
        time limit's warning (to requeue it), and the handlers it holds need not pickle (sys.unraisablehook)."""
        return {}

    def on_job_start(self, config, **kwargs) -> None:
        """In a SLURM task, SIGTERM raises `Terminated` in the cell (module docstring), once: SLURM may repeat it
        before the kill, and the second goes to the handler it replaced. The time limit's warning (SIGUSR2, or
        what SUBMITIT_PREEMPT_SIGNAL names, as submitit reads it) first gives SIGTERM back to that handler, then
        runs submitit's: its `scontrol requeue` has SLURM send SIGTERM at once, which must not turn submitit's exit
        for the requeue into a failed cell (and a result that tells the submitting process the task is done).

        Python runs a signal handler wherever the main thread is, also in a __del__ or a weakref callback (garbage
        collection: seen in a tokenizer's regex objects), and drops what is raised there ("Exception ignored in"):
        the cell would run on until SLURM's SIGKILL and leave no result. sys.unraisablehook catches the handler's
        exception, and a SIGTERM this process sends itself from a thread raises it again at the next safe point."""
        task = slurm_task()
        if task is None:
            return

        def terminated(signum, frame):
            signal.signal(signal.SIGTERM, self._sigterm)
            self._raised = self._dropped or Terminated(f"SIGTERM to SLURM task {task} (scancel, the time limit or "
                                                       f"preemption); rerun the same command to redo the cell from "
                                                       f"its finished units")
            self._dropped = None
            raise self._raised

        def warned(signum, frame):
            signal.signal(signal.SIGTERM, self._sigterm)
            try:
                self._warning[1](signum, frame)
            except BaseException as e:  # UncompletedJobError, or SystemExit after a requeue
                self._raised = e
                raise

        def unraisable(args):
            if args.exc_value is None or args.exc_value is not self._raised:
                self._unraisable(args)
                return
            log.warning("%s raised while %r ran, which dropped it: raising it again", type(args.exc_value).__name__,
                        args.object)
            self._dropped = args.exc_value
            signal.signal(signal.SIGTERM, terminated)
            threading.Timer(0.01, os.kill, (os.getpid(), signal.SIGTERM)).start()  # after this hook returns

        previous = signal.signal(signal.SIGTERM, terminated)
        self._sigterm = signal.SIG_DFL if previous is None else previous  # None: not set from Python
        warning = getattr(signal, "SIG" + os.environ.get("SUBMITIT_PREEMPT_SIGNAL", "USR2"))
        if callable(signal.getsignal(warning)):  # submitit's handler (process_job sets it before the job starts)
            self._warning = (warning, signal.signal(warning, warned))
        self._unraisable, sys.unraisablehook = sys.unraisablehook, unraisable

    def on_job_end(self, config, job_return, **kwargs) -> None:
        if self._sigterm is not None:
            signal.signal(signal.SIGTERM, self._sigterm)
            self._sigterm = None
        if self._warning is not None:
            signal.signal(*self._warning)
            self._warning = None
        if self._unraisable is not None:
            sys.unraisablehook, self._unraisable = self._unraisable, None

    def on_multirun_start(self, config, **kwargs) -> None:
        """Write the number of jobs into <sweep dir>/jobs.json (the basic sweeper only: other sweepers choose
        their jobs as they go, and their cells are logged unnumbered)."""
        sweeper = config.hydra.sweeper
        if not str(sweeper.get("_target_", "")).endswith(".BasicSweeper"):
            return
        params = OmegaConf.to_container(sweeper.params, resolve=False) if sweeper.get("params") else {}
        overrides = [f"{k}={v}" for k, v in params.items()] + list(config.hydra.overrides.task)
        try:
            jobs = count_jobs(overrides)
        except Exception as e:  # noqa: BLE001 (e.g. a glob sweep, which needs the config groups): no total
            log.warning("could not count the sweep's jobs (%s: %s); cells are logged without the total",
                        type(e).__name__, e)
            return
        write_json(Path(config.hydra.sweep.dir) / JOBS, {"jobs": jobs, "overrides": overrides})

    def on_multirun_end(self, config, **kwargs) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        summary = summarize(sweep_dir)
        write_json(sweep_dir / "summary.json", summary)
        busy = f", {summary['busy']} skipped (being computed by another process)" if summary["busy"] else ""
        log.info("sweep: %d jobs: %d cells run, %d skipped (already done)%s, %d failed", summary["jobs"],
                 summary["ran"], summary["skipped"], busy, summary["failed"])
        for failure in summary["failures"]:
            log.error("failed: %s: %s", failure["cell"] or " ".join(failure["overrides"]), failure["error"])
