"""Report: paper-style tables from records alone (no torch, no models).

    python -m bench.report results/default        # -> results/default/tables/main.{md,csv}

Rows are model x method x ratio (dense first; per ratio depth, then width); columns the achieved parameters,
the perplexities (WikiText-2 and PTB with one BOS, the official ppl.csv and the paper's numbers, then with a BOS
on every window, ppl_bos.csv) and, where the zero-shot stage ran, the seven tasks in the paper's order and metric
(x100) with their average. Markdown cells show the stderr.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pandas as pd

from bench.records import load_records, write_atomic

KEYS = ["model", "method", "ratio"]
PPL_COLUMNS = [("wikitext2", "ppl", "WikiText2"), ("ptb", "ppl", "PTB"),
               ("wikitext2", "ppl_bos", "WikiText2 (BOS)"), ("ptb", "ppl_bos", "PTB (BOS)")]
ZEROSHOT_COLUMNS = [("boolq", "BoolQ"), ("piqa", "PIQA"), ("hellaswag", "HellaSwag"), ("winogrande", "WinoGrande"),
                    ("arc_easy", "ARC-e"), ("arc_challenge", "ARC-c"), ("openbookqa", "OBQA"), ("average", "Avg")]


def _column(base: pd.DataFrame, sel: pd.DataFrame, col: str, scale: float = 1.0) -> pd.DataFrame:
    sel = sel[KEYS + ["value", "stderr", "n"]].copy()
    sel[["value", "stderr"]] = sel[["value", "stderr"]].astype(float) * scale
    return base.merge(sel.rename(columns={"value": col, "stderr": f"{col} stderr", "n": f"{col} n"}),
                      on=KEYS, how="left")


def main_table(df: pd.DataFrame) -> pd.DataFrame:
    """One row per model x method x ratio; value, stderr and n columns per metric."""
    base = df.groupby(KEYS, as_index=False).agg(kind=("kind", "first"), params=("params", "first"),
                                                removed_pct=("removed_frac_total_params", "first"))
    base["removed_pct"] *= 100
    ppl = df[df.stage == "ppl"]
    for task, metric, col in PPL_COLUMNS:
        base = _column(base, ppl[(ppl.task == task) & (ppl.metric == metric)], col)
    if "paper_metric" in df:
        zs = df[(df.stage == "zeroshot") & (df.paper_metric == True)]  # noqa: E712 (column of objects)
        for task, col in ZEROSHOT_COLUMNS if not zs.empty else []:
            base = _column(base, zs[zs.task == task], col, scale=100.0)
    base["_kind"] = base.kind.map({"dense": 0, "depth": 1, "width": 2}).fillna(3)
    return base.sort_values(["model", "ratio", "_kind", "method"]).drop(columns="_kind").reset_index(drop=True)


def to_markdown(table: pd.DataFrame) -> str:
    show = pd.DataFrame({"model": table.model, "method": table.method, "ratio": table.ratio.map("{:g}".format),
                         "params": table.params.map("{:,}".format),
                         "removed %": table.removed_pct.map("{:.1f}".format)})
    for col in [c for _, _, c in PPL_COLUMNS] + [c for _, c in ZEROSHOT_COLUMNS]:
        if col in table:
            show[col] = [_cell(v, s) for v, s in zip(table[col], table[f"{col} stderr"])]
    return show.to_markdown(index=False, disable_numparse=True) + "\n"


def _cell(value, stderr) -> str:
    if pd.isna(value):
        return "-"
    return f"{value:.2f} ± {stderr:.2f}" if pd.notna(stderr) and stderr > 0 else f"{value:.2f}"


def write_tables(results_dir: str | Path) -> list[Path]:
    results_dir = Path(results_dir)
    df = load_records(results_dir)
    if df.empty:
        raise SystemExit(f"no records.jsonl below {results_dir}")
    table = main_table(df)
    out = results_dir / "tables"
    write_atomic(out / "main.md", to_markdown(table))
    write_atomic(out / "main.csv", table.to_csv(index=False))
    return [out / "main.md", out / "main.csv"]


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python -m bench.report RESULTS_DIR")
    for path in write_tables(sys.argv[1]):
        print(path)
    print((Path(sys.argv[1]) / "tables" / "main.md").read_text())
