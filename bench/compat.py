"""Records written by an older version or another tool: fill the columns the report and the plots index.

`load_records` (bench/records.py) reads every records.jsonl as it is. A file written before a column existed,
or by another tool, lacks it, and the tables would stop at a KeyError (`Label(s) ['kind', ...] do not exist`)
or silently leave rows out (speed rows without `status`). `upgrade` fills what it can derive, per cell (one
records file), and names each file and the columns it lacked in one warning line:

    kind                       the cell's plan.json (`kind`), else the method's class in the registry
                               (bench/methods; the method YAML whose `name` is the row's method, less any "+"
                               suffix: "+" for the paper's keep-set, "+lora" for retrained rows)
    removed_frac_total_params  (dense_params - params) / dense_params, as bench.budget.achieved (dense_params: the
                               row's own, else the params of the model's dense cell); 0 for a dense cell
    params                     dense_params x (1 - removed_frac_total_params), where both exist
    paper_metric               zero-shot rows: the paper's metric of the task (bench.evals.zeroshot.PAPER_METRIC)
    status, runtime            speed rows: "ok" and "eager" (the only runtime before there were others, and every
                               speed row was a measured point before out-of-memory points were recorded)

Columns a row may leave empty anyway (stderr, n, batch_size, new_tokens, device_name, dtype) are added empty where
no file has them. What nothing stands in for (model, method, ratio, stage, task, metric, value) ends the report in
one line naming the folder and the columns; rows without a model, method or ratio are left out with a warning.

    df = upgrade(load_records(root), cell_dirs(root))     # bench.report.load: what report.py and plots.py read
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pandas as pd

log = logging.getLogger("bench.compat")

KEYS = ["model", "method", "ratio"]
ESSENTIAL = KEYS + ["stage", "task", "metric", "value"]
# columns a row may leave empty anyway: added empty where no file has them, named where the cell has such rows
NULLABLE = {"stderr": None, "n": None, "batch_size": "speed", "new_tokens": "speed", "device_name": "memory",
            "dtype": "memory"}
METHOD_CONF = Path(__file__).parent / "conf" / "method"


def method_kinds() -> dict[str, str]:
    """Method name (a method YAML's `name`) -> its class's kind, from the registry (imports torch: only for
    records without a kind and without a plan.json)."""
    from omegaconf import OmegaConf

    from bench import BenchError
    from bench.methods import resolve_impl

    kinds = {}
    for path in sorted(METHOD_CONF.glob("*.yaml")):
        conf = OmegaConf.load(path)
        if "name" in conf and "impl" in conf:
            try:
                kinds[str(conf.name)] = resolve_impl(conf.impl).kind
            except BenchError:
                continue
    return kinds


def _plan_kind(folder: Path | None) -> str | None:
    """The `kind` of the plan.json in a cell folder, or None."""
    try:
        return json.loads((folder / "plan.json").read_text())["kind"]
    except (TypeError, OSError, ValueError, KeyError):
        return None


def _missing(df: pd.DataFrame, rows, col: str) -> bool:
    """True where the selected rows exist and `col` is absent or empty on every one of them."""
    return bool(rows.any()) and (col not in df or bool(df.loc[rows, col].isna().all()))


def upgrade(df: pd.DataFrame, dirs: dict[tuple, Path], root: str | Path = ".") -> pd.DataFrame:
    """`df` with the columns the report and plots index, derived where a records file lacks them (module
    docstring); `dirs` maps (model, method, ratio) to the cell folder holding its records.jsonl
    (bench.report.cell_dirs). One warning line per file that lacked any."""
    if df.empty:
        return df
    absent = [c for c in ESSENTIAL if c not in df]
    if absent:
        raise SystemExit(f"records below {root} lack {', '.join(absent)}: the report needs them in every row")
    keyless = df[KEYS].isna().any(axis=1).to_numpy()
    if keyless.any():
        log.warning("records below %s: %d rows lack model, method or ratio: left out", root, keyless.sum())
    df = df[~keyless].reset_index(drop=True)
    nowhere = [c for c in NULLABLE if c not in df]
    for col in nowhere + ["params", "dense_params", "removed_frac_total_params"]:
        if col not in df:
            df[col] = float("nan")
    for col in ("kind", "paper_metric", "status", "runtime"):
        df[col] = df[col].astype(object) if col in df else None
    cells = {key: df.index.isin(idx) for key, idx in df.groupby(KEYS, sort=False).groups.items()}
    lacks = {key: [] for key in cells}  # per cell: (column, how it was filled)
    kinds = None
    for key, cell in cells.items():
        if _missing(df, cell, "kind"):
            kind, how = _plan_kind(dirs.get(_key(key))), "from plan.json"
            if kind is None:
                kinds = method_kinds() if kinds is None else kinds
                kind, how = kinds.get(str(key[1]).split("+")[0]), "from the method registry"
            df.loc[cell, "kind"] = kind
            lacks[key].append(("kind", how if kind is not None else "left empty (no plan.json, unknown method)"))
    for col in ("params", "dense_params", "removed_frac_total_params"):
        df[col] = pd.to_numeric(df[col], errors="coerce")
    dense_params = df[df.kind == "dense"].groupby("model").params.first()
    for key, cell in cells.items():
        if _missing(df, cell, "removed_frac_total_params"):
            dense = df.loc[cell, "dense_params"].fillna(dense_params.get(key[0], float("nan")))
            dense_cell = bool((df.loc[cell, "kind"] == "dense").all())
            frac = 0.0 if dense_cell else (dense - df.loc[cell, "params"]) / dense  # as bench.budget.achieved
            df.loc[cell, "removed_frac_total_params"] = frac
            how = ("= 0 (dense)" if dense_cell else "= (dense_params - params) / dense_params" if frac.notna().any()
                   else "left empty (no params or dense_params)")
            lacks[key].append(("removed_frac_total_params", how))
        if _missing(df, cell, "params"):
            df.loc[cell, "params"] = df.loc[cell, "dense_params"] * (1 - df.loc[cell, "removed_frac_total_params"])
            found = df.loc[cell, "params"].notna().any()
            lacks[key].append(("params", "= dense_params x (1 - removed_frac_total_params)" if found else
                               "left empty"))
        zeroshot = cell & (df.stage == "zeroshot").to_numpy()
        if _missing(df, zeroshot, "paper_metric"):
            from bench.evals.zeroshot import PAPER_METRIC

            df.loc[zeroshot, "paper_metric"] = [task == "average" or PAPER_METRIC.get(task) == metric
                                                for task, metric in zip(df.task[zeroshot], df.metric[zeroshot])]
            lacks[key].append(("paper_metric", "from the task (the paper's metric)"))
        speed = cell & (df.stage == "speed").to_numpy()
        for col, value in (("status", "ok"), ("runtime", "eager")):
            if _missing(df, speed, col):
                df.loc[speed, col] = value
                lacks[key].append((col, f"= {value!r} on speed rows"))
        stages = set(df.stage[cell])
        lacks[key] += [(col, "left empty") for col in nowhere if NULLABLE[col] in (None, *stages)]
    for key, cols in lacks.items():
        if cols:
            folder = dirs.get(_key(key))
            log.warning("%s lacks %s (written by an older version or another tool): %s",
                        folder / "records.jsonl" if folder is not None else f"the records of {key} below {root}",
                        ", ".join(col for col, _ in cols), "; ".join(f"{col} {how}" for col, how in cols))
    return df


def _key(key: tuple) -> tuple:
    return (key[0], key[1], float(key[2]))
