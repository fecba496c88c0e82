"""Progress bars for the long stages of a cell (scoring, statistics, perplexity, speed, LoRA), so that a 7B cell
that runs for an hour shows where it is.

    from bench.progress import bar
    for batch in bar(batches, desc="flap stats"):        # or bar(total=n, desc=...) and .update()
        ...

`bar` is a tqdm on stderr that clears itself when done (leave=False) and follows the terminal's width. It is off

    - when TQDM_DISABLE is set (to anything but 0 / false / no / empty), or BENCH_PROGRESS=0;
    - under CI (env CI set to 1 / true / yes) and when stderr is not a terminal (a log file, a pipe, pytest),
      unless BENCH_PROGRESS=1 forces it on (e.g. to watch a SLURM job's log).

The rule is read at each call, not when tqdm is imported (tqdm's own TQDM_DISABLE, through tqdm.utils.envwrap,
is read once at import and is lost as soon as a caller passes `disable=`, as lm-eval's bars do). While a bar is
shown, console log lines are written through tqdm.write (tqdm.contrib.logging), so they print above the bar
instead of through it; log files are untouched.
"""

from __future__ import annotations

import os
import sys

from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

OFF = ("", "0", "false", "no", "off")


def _flag(name: str) -> bool | None:
    """An environment switch: True, False, or None when unset or empty."""
    value = os.environ.get(name, "").strip().lower()
    return None if not value else value not in OFF


def enabled(stream=None) -> bool:
    """Whether bars are shown on `stream` (default: stderr), by the rule in the module docstring."""
    if _flag("TQDM_DISABLE"):
        return False
    forced = _flag("BENCH_PROGRESS")
    if forced is not None:
        return forced
    if _flag("CI"):
        return False
    stream = sys.stderr if stream is None else stream
    return bool(getattr(stream, "isatty", lambda: False)())


class Bar(tqdm):
    """A tqdm that, while shown, routes console logging through tqdm.write (see the module docstring)."""

    def __init__(self, *args, **kwargs):
        self._redirect = None
        super().__init__(*args, **kwargs)
        if not self.disable:
            self._redirect = logging_redirect_tqdm()
            self._redirect.__enter__()

    def close(self):
        super().close()
        redirect, self._redirect = getattr(self, "_redirect", None), None
        if redirect is not None:
            redirect.__exit__(None, None, None)


def bar(iterable=None, total: int | None = None, desc: str | None = None, **kwargs) -> Bar:
    """A progress bar over `iterable` (or of `total` steps, advanced with .update()), on stderr, cleared when
    done, shown only where `enabled()` says so. Extra keyword arguments go to tqdm."""
    return Bar(iterable, total=total, desc=desc, file=sys.stderr, leave=False, dynamic_ncols=True,
               disable=not enabled(sys.stderr), **kwargs)
