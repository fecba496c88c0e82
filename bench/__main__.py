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
from bench.schema import check_out_dir

log = logging.getLogger("bench")


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="config")
def main(cfg) -> str:
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    from bench.records import RECORDS
    from bench.runner import CellBusy, cell, compute_cell, row_label
    from bench.sweep import cell_tag, write_status

    log.setLevel(logging.INFO)
    hc = HydraConfig.get()
    multirun = hc.mode == RunMode.MULTIRUN
    # what status.json says if the job ends some other way (SystemExit for a SLURM requeue: the restarted task
    # writes its own; a task cancelled while held before its restart stays counted as failed)
    status = {"overrides": list(hc.overrides.task), "status": "failed",
              "error": "interrupted before the cell ended (an exit, e.g. a SLURM requeue)"}
    try:
        method, ratio, out = cell(cfg)
        status["cell"] = str(out)
        log.info("%s: %s %s r%g%s", cell_tag(hc), cfg.model.name, row_label(cfg, method), ratio,
                 " (done, skipping)" if (out / RECORDS).exists() else "")
        status |= {"status": compute_cell(cfg)[1], "error": None}
    except CellBusy as e:  # logged by the runner; counted by the sweep's summary
        status |= {"status": "busy", "error": str(e)}
    except Exception as e:  # noqa: BLE001 (a sweep records any failure and goes on)
        status |= {"status": "failed", "error": f"{type(e).__name__}: {e}"}
        line = one_line(e)
        if not multirun:
            if line:
                log.error("%s", line)
                sys.exit(2)
            raise
        if line:
            log.error("cell failed (recorded; the sweep goes on): %s: %s", status.get("cell", status["overrides"]),
                      line)
        else:
            log.exception("cell failed (recorded; the sweep goes on): %s", status.get("cell", status["overrides"]))
    finally:
        if multirun:
            write_status(hc.runtime.output_dir, status)
    return status["status"]


def one_line(e: Exception) -> str | None:
    """The one-line message of an error the user can act on (a bad input, a file that cannot be written or read:
    a full disk names the file), or None for a bug, which keeps its traceback."""
    if isinstance(e, BenchError):
        return str(e)
    if isinstance(e, OSError) and e.filename is not None:
        return f"{e.strerror or e}: {e.filename}"
    return None


def cli() -> None:
    """The `bench` console script: `python -m bench` with the same arguments."""
    try:
        check_choices(sys.argv[1:])
        for arg in sys.argv[1:]:  # Hydra makes its run directory under out_dir before main(): check it first
            key, sep, value = arg.lstrip("+").partition("=")
            if key == "out_dir" and sep:
                check_out_dir(value)
    except BenchError as e:
        sys.exit(f"error: {e}")
    main()


if __name__ == "__main__":
    cli()
