"""Report: paper-style tables from records alone (no torch, no models).

    python -m bench.report results/default        # -> results/default/tables/ppl.{md,csv}

Rows are model x method x ratio (dense first; per ratio depth, then width); columns the achieved parameters and the
perplexities: WikiText-2 and PTB with one BOS (the official ppl.csv, the paper's numbers) and with a BOS on every
window (ppl_bos.csv). Markdown cells show the stderr when windows were subsampled.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pandas as pd

from bench.records import load_records, write_atomic

PPL_COLUMNS = [("wikitext2", "ppl", "WikiText2"), ("ptb", "ppl", "PTB"),
               ("wikitext2", "ppl_bos", "WikiText2 (BOS)"), ("ptb", "ppl_bos", "PTB (BOS)")]


def ppl_table(df: pd.DataFrame) -> pd.DataFrame:
    """One row per model x method x ratio; value and stderr columns per (corpus, BOS mode)."""
    keys = ["model", "method", "ratio"]
    ppl = df[df.stage == "ppl"]
    base = ppl.groupby(keys, as_index=False).agg(kind=("kind", "first"), params=("params", "first"),
                                                 removed_pct=("removed_frac_total_params", "first"))
    base["removed_pct"] *= 100
    for task, metric, col in PPL_COLUMNS:
        sel = ppl[(ppl.task == task) & (ppl.metric == metric)][keys + ["value", "stderr", "n"]]
        sel = sel.rename(columns={"value": col, "stderr": f"{col} stderr", "n": f"{col} n"})
        base = base.merge(sel, on=keys, how="left")
    base["_kind"] = base.kind.map({"dense": 0, "depth": 1, "width": 2}).fillna(3)
    return base.sort_values(["model", "ratio", "_kind", "method"]).drop(columns="_kind").reset_index(drop=True)


def to_markdown(table: pd.DataFrame) -> str:
    show = pd.DataFrame({"model": table.model, "method": table.method, "ratio": table.ratio.map("{:g}".format),
                         "params": table.params.map("{:,}".format),
                         "removed %": table.removed_pct.map("{:.1f}".format)})
    for _, _, col in PPL_COLUMNS:
        if col in table:
            show[col] = [_cell(v, s) for v, s in zip(table[col], table[f"{col} stderr"])]
    return show.to_markdown(index=False) + "\n"


def _cell(value, stderr) -> str:
    if pd.isna(value):
        return "-"
    return f"{value:.2f} ± {stderr:.2f}" if pd.notna(stderr) and stderr > 0 else f"{value:.2f}"


def write_tables(results_dir: str | Path) -> list[Path]:
    results_dir = Path(results_dir)
    df = load_records(results_dir)
    if df.empty:
        raise SystemExit(f"no records.jsonl below {results_dir}")
    table = ppl_table(df)
    out = results_dir / "tables"
    write_atomic(out / "ppl.md", to_markdown(table))
    write_atomic(out / "ppl.csv", table.to_csv(index=False))
    return [out / "ppl.md", out / "ppl.csv"]


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python -m bench.report RESULTS_DIR")
    for path in write_tables(sys.argv[1]):
        print(path)
    print((Path(sys.argv[1]) / "tables" / "ppl.md").read_text())
