"""Run one cell (or a sweep of cells with -m):

    python -m bench model=smollm2-135m method=depth_ppl ratio=0.35
    python -m bench -m method=depth_ppl,depth_taylor ratio=0.2,0.35 eval=quick
"""

import logging
import sys

import hydra

from bench import BenchError
from bench.config import CONF_DIR, check_choices


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="config")
def main(cfg) -> None:
    from bench.runner import run_cell

    logging.getLogger("bench").setLevel(logging.INFO)
    try:
        run_cell(cfg)
    except BenchError as e:
        logging.getLogger("bench").error("%s", e)
        sys.exit(2)


if __name__ == "__main__":
    try:
        check_choices(sys.argv[1:])
    except BenchError as e:
        sys.exit(f"error: {e}")
    main()
