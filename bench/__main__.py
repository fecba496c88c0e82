"""Run one cell (or a sweep of cells with -m):

    python -m bench model=smollm2-135m method=depth_ppl ratio=0.35
    python -m bench -m method=depth_ppl,depth_taylor ratio=0.2,0.35 eval=quick
    python -m bench -m +sweep=default                      # a sweep config (conf/sweep/)

A single run exits with the error. In a multirun a failing cell is logged and recorded (the cell's error.json,
the job's status.json) and the sweep goes on; it ends with a summary of the cells run, skipped and failed
(bench/sweep.py). Rerunning the same command redoes only the cells without records.
"""

import logging
import sys

import hydra

from bench import BenchError
from bench.config import CONF_DIR, check_choices

log = logging.getLogger("bench")


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="config")
def main(cfg) -> str:
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    from bench.records import RECORDS
    from bench.runner import cell, row_label, run_cell
    from bench.sweep import cell_tag, write_status

    log.setLevel(logging.INFO)
    hc = HydraConfig.get()
    multirun = hc.mode == RunMode.MULTIRUN
    status = {"overrides": list(hc.overrides.task)}
    try:
        method, ratio, out = cell(cfg)
        done = (out / RECORDS).exists()
        status |= {"cell": str(out), "status": "skipped" if done else "ran"}
        log.info("%s: %s %s r%g%s", cell_tag(hc), cfg.model.name, row_label(cfg, method), ratio,
                 " (done, skipping)" if done else "")
        run_cell(cfg)
    except Exception as e:  # noqa: BLE001 (a sweep records any failure and goes on)
        status |= {"status": "failed", "error": f"{type(e).__name__}: {e}"}
        if not multirun:
            if isinstance(e, BenchError):
                log.error("%s", e)
                sys.exit(2)
            raise
        log.exception("cell failed (recorded; the sweep goes on): %s", status.get("cell", status["overrides"]))
    finally:
        if multirun:
            write_status(hc.runtime.output_dir, status)
    return status["status"]


def cli() -> None:
    """The `bench` console script: `python -m bench` with the same arguments."""
    try:
        check_choices(sys.argv[1:])
    except BenchError as e:
        sys.exit(f"error: {e}")
    main()


if __name__ == "__main__":
    cli()
