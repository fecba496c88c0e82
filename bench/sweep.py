"""Sweep bookkeeping: the number of jobs, each job's status, and the summary at the end of a multirun.

When a multirun starts, `SweepSummary` (a Hydra callback, conf/config.yaml) counts its jobs from the sweep's
overrides and writes `jobs.json` into the sweep directory, so that every job, in whatever process the launcher
runs it, can log which cell it is (`cell 3/16: smollm2-135m depth_taylor+ r0.2`, `cell_tag`). Every job writes
`status.json` (ran | skipped | failed, the cell, the error) into its Hydra job directory; `SweepSummary` reads
them all when the multirun ends, with any launcher (in-process, submitit local or SLURM: the jobs' directories are
on a shared filesystem), logs the counts and the failures and writes `summary.json` into the sweep directory.

Inside a SLURM task (one cell per process) SIGTERM ends the cell with `Terminated`: SLURM sends it on `scancel`, at
the time limit and on preemption, KillWait seconds (30 by default) before SIGKILL. The cell writes its error.json,
the job its status.json and submitit its result, so the submitting process counts the cell as failed and goes on,
instead of waiting for sacct to report a task that died without a result (a cluster without accounting never does).
The rerun of the same command redoes the cell from its finished units. SIGUSR2 (the time limit's warning,
`signal_delay_s`) stays submitit's: it ends the cell with UncompletedJobError, or requeues the task. Where a
cluster preempts with both signals, whichever comes first wins: a requeue, or a failed cell the rerun redoes.
tests/slurm/test_slurm.py tests it on a one-node cluster (`make test-slurm`).
"""

from __future__ import annotations

import json
import logging
import math
import os
import signal
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
    return {"jobs": len(jobs), "ran": counts["ran"], "skipped": counts["skipped"], "failed": counts["failed"],
            "failures": [{"cell": j.get("cell"), "overrides": j["overrides"], "error": j["error"]}
                         for j in jobs if j["status"] == "failed"]}


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

    def on_job_start(self, config, **kwargs) -> None:
        """In a SLURM task, SIGTERM raises `Terminated` in the cell (module docstring), once: SLURM may repeat it
        before the kill, and the second goes to the handler it replaced."""
        task = slurm_task()
        if task is None:
            return

        def terminated(signum, frame):
            signal.signal(signal.SIGTERM, self._sigterm)
            raise Terminated(f"SIGTERM to SLURM task {task} (scancel, the time limit or preemption); rerun the same "
                             f"command to redo the cell from its finished units")

        previous = signal.signal(signal.SIGTERM, terminated)
        self._sigterm = signal.SIG_DFL if previous is None else previous  # None: not set from Python

    def on_job_end(self, config, job_return, **kwargs) -> None:
        if self._sigterm is not None:
            signal.signal(signal.SIGTERM, self._sigterm)
            self._sigterm = None

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
        log.info("sweep: %d jobs: %d cells run, %d skipped (already done), %d failed", summary["jobs"],
                 summary["ran"], summary["skipped"], summary["failed"])
        for failure in summary["failures"]:
            log.error("failed: %s: %s", failure["cell"] or " ".join(failure["overrides"]), failure["error"])
