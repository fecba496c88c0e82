"""Records: the one place results are written and read.

A cell's `records.jsonl` holds one long row per model x method x ratio x stage x task x metric. Every file is
written atomically (temp file + rename), so a kill never leaves a partial file and a cell whose records exist is
finished. While a cell runs, `partial.jsonl` holds its finished evaluation units (`Progress`), so a rerun after a
kill redoes only the unit that was running: a full zero-shot pass is hours on a CPU.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Iterable

RECORDS = "records.jsonl"
ERROR = "error.json"  # a failed cell: type, message, traceback and any rows measured before the failure
PARTIAL = "partial.jsonl"  # an unfinished cell: its finished evaluation units (Progress)
UNIT_SCRATCH = "partial_units"  # an unfinished unit's own checkpoints (lm-eval's request cache), one folder per unit
log = logging.getLogger("bench.records")
EXAMPLES = "examples"  # per-document / per-window values of a unit (gzipped JSONL), for paired bootstrap statistics


def is_writer() -> bool:
    """Whether this process writes files: a single process, or rank 0 of a torchrun / accelerate launch (RANK):
    every other rank computes the same deterministic stages and helps retrain, and writes nothing."""
    return int(os.environ.get("RANK", "0")) == 0


def write_atomic(path: Path, data: str | bytes) -> None:
    """Write `data` to `path` through a temporary file in the same folder, fsynced, then renamed into place: a
    reader sees the old file or the whole new one, never part of it. A failed write (ENOSPC on a full disk, EDQUOT,
    EIO, a read-only mount) removes the temporary file and raises an OSError naming `path` itself, so the error
    line says which file could not be written. On a rank other than 0 it writes nothing (`is_writer`)."""
    if not is_writer():
        return
    path = Path(path)
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        with os.fdopen(fd, "wb") as f:
            f.write(data.encode() if isinstance(data, str) else data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
        if isinstance(e, OSError) and e.errno is not None:
            raise OSError(e.errno, e.strerror, str(path)) from e
        raise


def write_examples(path: Path, rows: Iterable[dict]) -> None:
    """Per-example rows (one zero-shot document or perplexity window a line) as gzipped JSONL, atomically. The
    gzip header holds no time stamp, so the same values give the same bytes (the files are committed)."""
    text = "".join(json.dumps(r) + "\n" for r in rows)
    write_atomic(path, gzip.compress(text.encode(), mtime=0))


def read_examples(path: Path) -> list[dict]:
    """The rows of a `write_examples` file, in order."""
    with gzip.open(path, "rt", encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def examples_dir(progress) -> Path | None:
    """Where a cell's units write their per-example files: `examples/` next to its partial.jsonl, or None for a
    run without a cell directory (`Progress()`), which writes none."""
    return Path(progress.path).parent / EXAMPLES if progress.path is not None else None


def _tensor_summary(obj):
    """JSON stand-in for a tensor inside a plan (SliceGPT's bases): its shape, dtype and content hash."""
    import torch

    if not isinstance(obj, torch.Tensor):
        raise TypeError(f"{type(obj).__name__} is not JSON serializable")
    data = obj.detach().cpu().contiguous()
    return {"tensor": list(data.shape), "dtype": str(data.dtype).removeprefix("torch."),
            "sha256": hashlib.sha256(data.view(torch.uint8).numpy().tobytes()).hexdigest()}


def write_json(path: Path, obj) -> None:
    """Indented JSON with every list of numbers on one line (plans hold long index lists); a tensor is written as
    its shape and sha256 (the tensors themselves live in the score cache)."""
    text = json.dumps(obj, indent=2, default=_tensor_summary)
    text = re.sub(r"\[\s+([-+0-9.eE,\s]*?)\s+\]", lambda m: "[" + " ".join(m.group(1).split()) + "]", text)
    write_atomic(path, text + "\n")


def write_records(path: Path, rows: Iterable[dict]) -> None:
    write_atomic(path, "".join(json.dumps(r, sort_keys=False) + "\n" for r in rows))


def load_records(root: str | Path):
    """Every records.jsonl below `root` as one DataFrame (empty if none). A file with a line that is not a JSON
    object (corrupted by hand or by a copy) is skipped whole, with a one-line warning naming it: one bad cell
    must not take down the report of a whole sweep, and half a cell's rows would make a misleading table row."""
    import logging

    import pandas as pd

    rows = []
    for path in sorted(Path(root).rglob(RECORDS)):
        cell, bad = [], None
        for n, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                row = None
            if not isinstance(row, dict):
                bad = n
                break
            cell.append(row)
        if bad:
            logging.getLogger("bench.records").warning("skipping %s: line %d is not a JSON object", path, bad)
            continue
        rows += cell
    return pd.DataFrame(rows)


def fingerprint(*parts) -> str:
    """sha256 of JSON-serialisable parts (tensors by content hash)."""
    text = json.dumps(parts, sort_keys=True, default=_tensor_summary)
    return hashlib.sha256(text.encode()).hexdigest()


class Progress:
    """The finished evaluation units of an unfinished cell, kept in `partial.jsonl`: one line per unit with its
    name, a key (the fingerprint of the model and of the config the unit was measured with) and its rows.

    A unit is one perplexity corpus x BOS mode, one zero-shot task, or the speed stage. `run(unit, config, fn)`
    returns the stored rows when the unit was finished with the same key, else runs `fn` and stores its rows
    (the file rewritten atomically). So a rerun after kill -9 redoes only the unit that was running (a zero-shot
    task only its unanswered requests, see `run`), and a changed model or stage config redoes what it touches.
    `Progress()` (no path) just runs.
    """

    def __init__(self, path: Path | None = None, model_key: str = ""):
        # done: the units this run has returned, in order (reused or measured); a measured one is listed before its
        # line is written, so a signal between the two never leaves a stored unit out of an error.json
        self.path, self.model_key, self.units, self.reused, self.done = path, model_key, {}, [], []
        if path is not None and Path(path).exists():
            for n, line in enumerate(Path(path).read_text(errors="replace").splitlines(), 1):
                try:
                    entry = json.loads(line)
                    self.units[entry["unit"]] = entry
                except (ValueError, TypeError, KeyError):  # a copy cut short, a hand edit: that unit is redone
                    log.warning("%s: line %d is not a finished unit (damaged): it is measured again", path, n)

    def run(self, unit: str, config, fn, resumable: bool = False) -> list[dict]:
        """The unit's rows: stored ones when it finished with the same key, else `fn()`'s, then stored.

        `resumable=True`: `fn(folder)` gets a folder of its own for checkpoints inside the unit (lm-eval's
        per-request cache: one HellaSwag pass is two hours here), or None without a path. The folder is named by
        the unit's key, so a changed model or config starts afresh; it goes once the unit's rows are stored.
        """
        key = fingerprint(self.model_key, config)
        entry = self.units.get(unit)
        if entry is not None and entry["key"] == key:
            self.reused.append(unit)
            self.done.append(unit)
            return entry["rows"]
        folder = self._scratch(unit, key) if resumable else None
        rows = fn(folder) if resumable else fn()
        self.units[unit] = {"unit": unit, "key": key, "rows": rows}
        self.done.append(unit)
        self._write()
        if folder is not None:
            shutil.rmtree(folder, ignore_errors=True)
        return rows

    def _scratch(self, unit: str, key: str) -> Path | None:
        if self.path is None:
            return None
        name = re.sub(r"[^\w.-]", "_", unit)
        folder = Path(self.path).parent / UNIT_SCRATCH / f"{name}-{key[:16]}"
        for stale in folder.parent.glob(f"{name}-*"):
            if stale != folder:  # checkpoints of another model or config
                shutil.rmtree(stale, ignore_errors=True)
        folder.mkdir(parents=True, exist_ok=True)
        return folder

    def rows_since(self, mark: int) -> list[dict]:
        """The rows of the units returned since `len(self.done)` was `mark`: a stage's finished units when it
        fails midway (the runner puts them in error.json)."""
        return [row for unit in self.done[mark:] for row in self.units[unit]["rows"]]

    def drop(self, bad) -> None:
        """Forget the units holding a row for which `bad(row)` is true (a NaN perplexity): a rerun measures them."""
        self.units = {u: e for u, e in self.units.items() if not any(bad(r) for r in e["rows"])}
        self._write()

    def _write(self) -> None:
        if self.path is not None:
            write_atomic(self.path, "".join(json.dumps(e) + "\n" for e in self.units.values()))

    def finish(self) -> None:
        """The cell's records are written: its partial file and any unit checkpoints go."""
        if self.path is not None:
            Path(self.path).unlink(missing_ok=True)
            shutil.rmtree(Path(self.path).parent / UNIT_SCRATCH, ignore_errors=True)
