"""Records: the one place results are written and read.

A cell's `records.jsonl` holds one long row per model x method x ratio x stage x task x metric. Every file is
written atomically (temp file + rename), so a kill never leaves a partial file and a cell whose records exist is
finished.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import tempfile
from pathlib import Path
from typing import Iterable

RECORDS = "records.jsonl"
ERROR = "error.json"  # a failed cell: type, message, traceback and any rows measured before the failure


def write_atomic(path: Path, data: str | bytes) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data.encode() if isinstance(data, str) else data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


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
    """Every records.jsonl below `root` as one DataFrame (empty if none)."""
    import pandas as pd

    rows = []
    for path in sorted(Path(root).rglob(RECORDS)):
        rows += [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return pd.DataFrame(rows)
