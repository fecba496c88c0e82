"""Report: paper-style tables from records alone (no torch, no models).

    python -m bench.report results/default        # -> results/default/tables/main.{md,tex,csv}

Rows are model x method x ratio (dense first; per ratio depth, then width); columns the achieved parameters,
the perplexities (WikiText-2 and PTB with one BOS, the official ppl.csv and the paper's numbers, then with a BOS
on every window, ppl_bos.csv), where the zero-shot stage ran the seven tasks in the paper's order and metric (x100)
with their average, and where the speed stage ran, eager generation at the shortest output length: latency at
the smallest batch, throughput (tokens/s) and the interleaved speedup against dense at every batch size.

Markdown cells show the stderr; in Markdown and LaTeX (booktabs) the best pruned value of each column within a
model and ratio is bold (lowest perplexity and latency, highest accuracy, throughput and speedup). The CSV holds
every value with its stderr and sample count. main.md opens with a caption (`caption`) built from the same
records: how much was measured, on what, with which calibration and package versions; main.tex carries it as a
`% caption:` comment block.
"""

from __future__ import annotations

import math
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
    """Add value / stderr / n columns for one metric; a metric no record has adds nothing."""
    if sel.empty:
        return base
    sel = sel[KEYS + ["value", "stderr", "n"]].copy()
    sel[["value", "stderr"]] = sel[["value", "stderr"]].astype(float) * scale
    return base.merge(sel.rename(columns={"value": col, "stderr": f"{col} stderr", "n": f"{col} n"}),
                      on=KEYS, how="left")


LOWER_IS_BETTER = ("WikiText2", "PTB", "latency")


def speed_rows(df: pd.DataFrame) -> pd.DataFrame:
    """The speed rows the tables and plots show: eager generation, measured (not OOM), shortest output length."""
    if "runtime" not in df:
        return df.iloc[0:0]
    sp = df[(df.stage == "speed") & (df.status == "ok") & (df.runtime == "eager")]
    return sp[sp.new_tokens == sp.new_tokens.min()]


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
    sp = speed_rows(df)
    if not sp.empty:  # speed: every batch size measured
        smallest = sp[sp.batch_size == sp.batch_size.min()]
        for b in smallest.batch_size.unique():
            base = _column(base, smallest[smallest.metric == "latency_s"], f"latency bs{b:g} (s)")
        for b in sorted(sp.batch_size.unique()):
            at = sp[sp.batch_size == b]
            base = _column(base, at[at.metric == "throughput_tok_s"], f"tok/s bs{b:g}")
            base = _column(base, at[at.metric == "speedup"], f"speedup bs{b:g}")
    base["_kind"] = base.kind.map({"dense": 0, "depth": 1, "width": 2, "slice": 2}).fillna(3)
    return base.sort_values(["model", "ratio", "_kind", "method"]).drop(columns="_kind").reset_index(drop=True)


def metric_columns(table: pd.DataFrame) -> list[str]:
    return [c for c in table if f"{c} stderr" in table]  # every metric, in the table's order


def best_mask(table: pd.DataFrame, col: str) -> pd.Series:
    """True where a pruned row holds the best value of `col` among the pruned rows of its model and ratio."""
    pruned = table[table.kind != "dense"]
    lower = col.startswith(LOWER_IS_BETTER)
    best = pruned.groupby(["model", "ratio"])[col].transform("min" if lower else "max")
    return (table[col] == best.reindex(table.index)) & table[col].notna() & (table.kind != "dense")


def _identity(table: pd.DataFrame) -> pd.DataFrame:
    return pd.DataFrame({"model": table.model, "method": table.method, "ratio": table.ratio.map("{:g}".format),
                         "params": table.params.map("{:,}".format),
                         "removed %": table.removed_pct.map("{:.1f}".format)})


def to_markdown(table: pd.DataFrame) -> str:
    show = _identity(table)
    for col in metric_columns(table):
        best = best_mask(table, col)
        show[col] = [f"**{_cell(v, s)}**" if b else _cell(v, s)
                     for v, s, b in zip(table[col], table[f"{col} stderr"], best)]
    return show.to_markdown(index=False, disable_numparse=True) + "\n"


def _cell(value, stderr) -> str:
    if pd.isna(value):
        return "-"
    return f"{value:.2f} ± {stderr:.2f}" if pd.notna(stderr) and stderr > 0 else f"{value:.2f}"


def _tex(text: str) -> str:
    return str(text).replace("\\", "\\textbackslash{}").replace("&", "\\&").replace("%", "\\%").replace(
        "_", "\\_").replace("#", "\\#")


def to_latex(table: pd.DataFrame) -> str:
    """A booktabs tabular: one block of rows per model and ratio, the best pruned value per column bold."""
    cols = metric_columns(table)
    ident, best = _identity(table), {col: best_mask(table, col) for col in cols}
    head = ["Model", "Method", "Ratio", "Params", "Removed \\%"] + [_tex(c) for c in cols]
    lines = ["\\begin{tabular}{lllrr" + "r" * len(cols) + "}", "\\toprule", " & ".join(head) + " \\\\",
             "\\midrule"]
    previous = None
    for i in range(len(table)):
        group = (table.model.iloc[i], table.ratio.iloc[i])
        if previous is not None and group != previous:
            lines.append("\\midrule")
        previous = group
        cells = [_tex(ident[k].iloc[i]) for k in ident]
        for col in cols:
            value = table[col].iloc[i]
            text = "-" if pd.isna(value) else f"{value:.2f}"
            cells.append(f"\\textbf{{{text}}}" if best[col].iloc[i] else text)
        lines.append(" & ".join(cells) + " \\\\")
    lines += ["\\bottomrule", "\\end{tabular}"]
    return "\n".join(lines) + "\n"


NOT_RECORDED = "not recorded"
VERSIONS = ("torch", "transformers", "lm_eval", "datasets", "peft", "torch_pruning")


def _v(row: dict, key: str) -> str:
    """A record's field as caption text: whole floats without ".0" (a column with gaps reads 2 as 2.0), a
    field the record lacks as "not recorded" (records older than the field)."""
    value = row.get(key)
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return NOT_RECORDED
    return str(int(value)) if isinstance(value, float) and value.is_integer() else str(value)


def _each(rows: pd.DataFrame, fmt, sep: str = "; ", empty: str = NOT_RECORDED) -> str:
    """The distinct texts fmt(row) gives over the rows, in order of appearance: one value where every cell
    agrees, each variant where they differ; `empty` where there are no rows."""
    texts = list(dict.fromkeys(fmt(r) for r in rows.to_dict("records")))
    return sep.join(texts) if texts else empty


def _calibration(r: dict) -> str:
    """A pruned cell's calibration set (the runner records it per cell; older records lack it): `none` for a
    data-free criterion, `plan_file` for a plan replayed from a file."""
    kind = _v(r, "calibration")
    if kind in (NOT_RECORDED, "none", "plan_file"):
        return {"none": "none (data-free criteria)", "plan_file": "the plan file's"}.get(kind, kind)
    return (f"{_v(r, 'calibration')}, {_v(r, 'calib_dataset')} {_v(r, 'calib_n_samples')} x "
            f"{_v(r, 'calib_seq_len')} tokens, seed {_v(r, 'calib_seed')} ({_v(r, 'calib_source')})")


def caption(df: pd.DataFrame) -> str:
    """The caption main.md opens with, from the records alone: sweep, eval preset and what it measured per
    stage (perplexity windows x tokens per corpus, examples per zero-shot task, speed batch sizes, new tokens
    and rounds), device / dtype / threads, the pruned cells' calibration, package versions, and how to read
    the cells. A sweep's overrides change what a preset measures, so the counts come from the rows (n,
    seq_len, batch_size, new_tokens), not from the preset's name. One line per item (one Markdown paragraph)."""
    ppl = df[df.stage == "ppl"]
    zs = df[(df.stage == "zeroshot") & (df.task != "average")]
    sp = df[(df.stage == "speed") & (df.metric == "throughput_tok_s") & (df.get("status", "ok") == "ok")]
    pruned = df[df.kind != "dense"] if "kind" in df else df
    counts = {n for n in zs.n.dropna()}
    examples = (f"{counts.pop():g} examples per task ({zs.task.nunique()} tasks)" if len(counts) == 1 else
                _each(zs, lambda r: f"{r['task']} {_v(r, 'n')}", ", ", "not run"))
    windows = _each(ppl, lambda r: f"{r['task']} {_v(r, 'n')} x {_v(r, 'seq_len')}", empty="not run")
    speed = "not run" if sp.empty else (
        f"{_each(sp, lambda r: _v(r, 'runtime'), ', ')} generate at batch "
        f"{', '.join(f'{b:g}' for b in sorted(sp.batch_size.unique()))} with "
        f"{', '.join(f'{n:g}' for n in sorted(sp.new_tokens.unique()))} new tokens, prompt tokens: "
        f"{_each(sp, lambda r: _v(r, 'prompt_tokens'), ' / ')}, rounds per point: "
        f"{_each(sp, lambda r: _v(r, 'n'), ' / ')} (the table: eager, the shortest output)")
    return "\n".join([
        f"Sweep: {_each(df, lambda r: _v(r, 'sweep'), ', ')}; "
        f"eval preset: {_each(df, lambda r: _v(r, 'eval_preset'), ', ')}.",
        f"Perplexity, windows x tokens per corpus: {windows}.",
        f"Zero-shot: {examples}.",
        f"Speed: {speed}.",
        "Device: " + _each(df, lambda r: f"{_v(r, 'device_name')} ({_v(r, 'device')}), {_v(r, 'dtype')}, "
                                        f"{_v(r, 'threads')} threads") + ".",
        f"Calibration of the pruned cells: {_each(pruned, _calibration, empty='no pruned cell')}.",
        "Versions: " + _each(df, lambda r: ", ".join(f"{k} {_v(r, k)}" for k in VERSIONS)) + ".",
        "Cells: value ± stderr (over windows, examples or rounds; none for one sample or an average), "
        "- where not measured; bold: the best pruned value of its column within a model and ratio (lowest "
        "perplexity and latency, highest accuracy, tokens/s and speedup); speedup: against dense in the same "
        "interleaved rounds."]) + "\n"


def write_tables(results_dir: str | Path) -> list[Path]:
    results_dir = Path(results_dir)
    df = load_records(results_dir)
    if df.empty:
        raise SystemExit(f"no records.jsonl below {results_dir}")
    table = main_table(df)
    out = results_dir / "tables"
    text = caption(df)
    write_atomic(out / "main.md", text + "\n" + to_markdown(table))
    write_atomic(out / "main.tex", "% caption:\n" + "".join(f"% {line}\n" for line in text.splitlines())
                 + to_latex(table))
    write_atomic(out / "main.csv", table.to_csv(index=False))
    return [out / "main.md", out / "main.tex", out / "main.csv"]


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python -m bench.report RESULTS_DIR")
    for path in write_tables(sys.argv[1]):
        print(path)
    print((Path(sys.argv[1]) / "tables" / "main.md").read_text())
