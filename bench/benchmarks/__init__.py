"""Benchmarks that print figures (run through `make bench-*`); none of them is a test."""

import logging
import sys

from bench import BenchError


def command_line(main, level: int = logging.INFO) -> None:
    """A benchmark's command line: log lines as `name: message`, then `main(sys.argv[1:])`; a BenchError (a bad
    argument, a missing sweep) ends it with one line and exit status 1."""
    logging.basicConfig(level=level, format="%(name)s: %(message)s")
    try:
        main(sys.argv[1:])
    except BenchError as exc:
        sys.exit(f"error: {exc}")
