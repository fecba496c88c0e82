"""Sweep bookkeeping: each job's status, and the summary at the end of a multirun.

Every job of a multirun writes `status.json` (ran | skipped | failed, the cell, the error) into its Hydra job
directory; `SweepSummary` (a Hydra callback, conf/config.yaml) reads them all when the multirun ends, with any
launcher (in-process, submitit local or SLURM: the jobs' directories are on a shared filesystem), logs the counts
and the failures and writes `summary.json` into the sweep directory.
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from pathlib import Path

from hydra.experimental.callback import Callback

from bench.records import write_json

log = logging.getLogger("bench.sweep")
STATUS = "status.json"


def write_status(job_dir: str | Path, status: dict) -> None:
    write_json(Path(job_dir) / STATUS, status)


def summarize(sweep_dir: str | Path) -> dict:
    jobs = [json.loads(p.read_text()) for p in sorted(Path(sweep_dir).glob(f"*/{STATUS}"))]
    counts = Counter(job["status"] for job in jobs)
    return {"jobs": len(jobs), "ran": counts["ran"], "skipped": counts["skipped"], "failed": counts["failed"],
            "failures": [{"cell": j.get("cell"), "overrides": j["overrides"], "error": j["error"]}
                         for j in jobs if j["status"] == "failed"]}


class SweepSummary(Callback):
    def on_multirun_end(self, config, **kwargs) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        summary = summarize(sweep_dir)
        write_json(sweep_dir / "summary.json", summary)
        log.info("sweep: %d jobs: %d cells run, %d skipped (already done), %d failed", summary["jobs"],
                 summary["ran"], summary["skipped"], summary["failed"])
        for failure in summary["failures"]:
            log.error("failed: %s: %s", failure["cell"] or " ".join(failure["overrides"]), failure["error"])
