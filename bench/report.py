"""Report: paper-style tables from records alone (no torch, no models).

    python -m bench.report results/default        # -> results/default/tables/main.{md,tex,csv}, paired.{md,csv}

Rows are model x method x ratio (dense first; per ratio depth, then width); columns the achieved parameters,
the perplexities (WikiText-2 and PTB with one BOS, the official ppl.csv and the paper's numbers, then with a BOS
on every window, ppl_bos.csv), where the zero-shot stage ran the seven tasks in the paper's order and metric (x100)
with their average, and where the speed stage ran, eager generation at the shortest output length: latency at
the smallest batch, throughput (tokens/s) and the interleaved speedup against dense at every batch size.

Markdown cells show the stderr; in Markdown and LaTeX (booktabs) the best pruned value of each column within a
model and ratio is bold (lowest perplexity and latency, highest accuracy, throughput and speedup) where it is
significantly better than the runner-up (95%, bench.stats: paired bootstrap over the cells' per-document and
per-window records, independent bootstrap over speed rounds); where those records are missing nothing is bold.
paired.{md,csv} (`paired_table`) compare every pruned row with dense and with the other family's best. The CSV holds
every value with its stderr and sample count. main.md opens with a caption (`caption`) built from the same
records: how much was measured, on what, with which calibration and package versions; main.tex carries it as a
`% caption:` comment block. Records from an older version or another tool get the columns they lack filled where
they can be derived (`load`, bench/compat.py), with one warning line per such file.
"""

from __future__ import annotations

import json
import math
import re
import sys
from pathlib import Path

import numpy as np
import pandas as pd

from bench import stats
from bench.records import EXAMPLES, RECORDS, load_records, read_examples, write_atomic

KEYS = ["model", "method", "ratio"]
RETRAIN_ORDER = ["none", "lora", "kd", "cpt"]  # rows grouped by retraining regime; verdicts within a regime
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


RUNTIME_LLAMACPP = "llamacpp"  # bench.evals.llamacpp.RUNTIME (not imported: the report needs no torch)


def llamacpp_rows(df: pd.DataFrame) -> pd.DataFrame:
    """The llama.cpp speed rows (runtime llamacpp, bench/evals/llamacpp.py): measured, shortest output length."""
    if "runtime" not in df or "quant" not in df:
        return df.iloc[0:0]
    sp = df[(df.stage == "speed") & (df.status == "ok") & (df.runtime == RUNTIME_LLAMACPP)]
    return sp[sp.new_tokens == sp.new_tokens.min()]


def main_table(df: pd.DataFrame) -> pd.DataFrame:
    """One row per model x method x ratio; value, stderr and n columns per metric."""
    retrain = df["retrain"].fillna("none") if "retrain" in df else pd.Series("none", index=df.index)
    base = df.assign(retrain=retrain).groupby(KEYS, as_index=False).agg(
        kind=("kind", "first"), retrain=("retrain", "first"), params=("params", "first"),
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
    lc = llamacpp_rows(df)
    # llama.cpp, per quantization: decode tok/s, speedup, batch-1 roofline
    for quant in dict.fromkeys(lc.quant) if not lc.empty else []:
        at_quant = lc[lc.quant == quant]
        for b in sorted(at_quant.batch_size.unique()):
            at = at_quant[at_quant.batch_size == b]
            base = _column(base, at[at.metric == "decode_tok_s"], f"llama.cpp {quant} decode tok/s bs{b:g}")
            base = _column(base, at[at.metric == "speedup"], f"llama.cpp {quant} speedup bs{b:g}")
        base = _column(base, at_quant[at_quant.metric == "roofline_frac"], f"llama.cpp {quant} roofline bs1")
    base["_kind"] = base.kind.map({"dense": 0, "depth": 1, "width": 2, "slice": 2}).fillna(3)
    base["_retrain"] = base.retrain.map({r: i for i, r in enumerate(RETRAIN_ORDER)}).fillna(len(RETRAIN_ORDER))
    return base.sort_values(["model", "ratio", "_retrain", "_kind", "method"]).drop(
        columns=["_kind", "_retrain"]).reset_index(drop=True)


def metric_columns(table: pd.DataFrame) -> list[str]:
    return [c for c in table if f"{c} stderr" in table]  # every metric, in the table's order


def best_mask(table: pd.DataFrame, col: str, evidence: "Evidence | None" = None) -> pd.Series:
    """True where a pruned row holds the best value of `col` among the pruned rows of its model and ratio.

    With `evidence` (what write_tables passes), only where that best is also significantly better than the
    runner-up (the next best pruned row of its model and ratio) at 95% (`Evidence.compare`): a tie, a group of one
    pruned row, or a pair whose per-example or per-round records are missing is not bold."""
    pruned = table[table.kind != "dense"]
    lower = col.startswith(LOWER_IS_BETTER)
    best = pruned.groupby(["model", "ratio"])[col].transform("min" if lower else "max")
    mask = (table[col] == best.reindex(table.index)) & table[col].notna() & (table.kind != "dense")
    if evidence is None:
        return mask
    for (model, ratio), group in pruned.dropna(subset=[col]).groupby(["model", "ratio"]):
        ranked = group.sort_values(col, ascending=lower, kind="stable")
        if len(ranked) < 2:
            mask[group.index] = False
            continue
        first, second = ranked.iloc[0], ranked.iloc[1]
        result = evidence.compare(_key(first), _key(second), col)
        if result is None or result["verdict"] != "a better":
            mask[group.index] = False
    return mask


def _identity(table: pd.DataFrame) -> pd.DataFrame:
    return pd.DataFrame({"model": table.model, "method": table.method, "ratio": table.ratio.map("{:g}".format),
                         "params": table.params.map("{:,}".format),
                         "removed %": table.removed_pct.map("{:.1f}".format)})


def to_markdown(table: pd.DataFrame, evidence: "Evidence | None" = None) -> str:
    show = _identity(table)
    for col in metric_columns(table):
        best = best_mask(table, col, evidence)
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


def to_latex(table: pd.DataFrame, evidence: "Evidence | None" = None) -> str:
    """A booktabs tabular: one block of rows per model and ratio, the best pruned value per column bold (with
    `evidence`: only where significantly better than the runner-up, as in main.md)."""
    cols = metric_columns(table)
    ident, best = _identity(table), {col: best_mask(table, col, evidence) for col in cols}
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


LLAMACPP_CAPTION = "; llama.cpp: decode tok/s, speedup against dense's export and batch-1 roofline fraction per quant"


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
        f"{_each(sp, lambda r: _v(r, 'n'), ' / ')} (the table: eager, the shortest output"
        f"{LLAMACPP_CAPTION * (not llamacpp_rows(df).empty)})")
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
        "perplexity and latency, highest accuracy, tokens/s and speedup), only where it is significantly better "
        "than the runner-up at 95% (paired bootstrap over documents or windows, or over speed rounds; "
        "tables/paired.md), so no bold where that cannot be computed (cells without per-example records); "
        "speedup: against dense in the same interleaved rounds."]) + "\n"


# --- paired statistics --------------------------------------------------------------------------------------------

NO_EXAMPLES = "no per-example records"
ACCURACY = {col: task for task, col in ZEROSHOT_COLUMNS if task != "average"}
PPL = {col: (task, metric) for task, metric, col in PPL_COLUMNS}
SPEED = re.compile(r"^(?:(speedup|tok/s) bs(\S+)|latency bs(\S+) \(s\))$")
LLAMACPP = re.compile(r"^llama\.cpp (\S+) speedup bs(\S+)$")  # per-round speedups in llama.cpp, per quant
FAMILY = {"dense": "dense", "depth": "depth", "width": "width", "slice": "width"}


def _raw_key(col: str) -> tuple[str, float] | None:
    """(metric, batch) under which `Evidence.raw` keeps a speed column's per-round values, or None."""
    if m := SPEED.match(col):
        name, b1, b2 = m.groups()
        return ({"speedup": "speedup", "tok/s": "throughput_tok_s", None: "latency_s"}[name],
                float(b1 if b1 is not None else b2))
    if m := LLAMACPP.match(col):
        return f"{RUNTIME_LLAMACPP} {m.group(1)} speedup", float(m.group(2))
    return None


def _key(row) -> tuple:
    return (row["model"], row["method"], float(row["ratio"]))


def cell_dirs(results_dir: str | Path) -> dict[tuple, Path]:
    """(model, method, ratio) -> the cell folder holding its records.jsonl (read from its first row)."""
    dirs = {}
    for path in sorted(Path(results_dir).rglob(RECORDS)):
        try:
            first = json.loads(next(line for line in path.read_text().splitlines() if line.strip()))
            dirs[_key(first)] = path.parent
        except (StopIteration, json.JSONDecodeError, KeyError, TypeError):
            continue  # load_records warns about such a file
    return dirs


def load(results_dir: str | Path) -> pd.DataFrame:
    """Every record below `results_dir` (load_records), with the columns the tables and plots index filled in
    where a file from an older version or another tool lacks them (bench.compat.upgrade: one warning line per
    such file)."""
    from bench.compat import upgrade

    return upgrade(load_records(results_dir), cell_dirs(results_dir), results_dir)


class Evidence:
    """What the significance tests read: per-document zero-shot outcomes and per-window NLL sums from each cell's
    examples/ folder, per-round speed values (the `raw` field) from the records. `compare(a, b, col)` gives the
    statistic of row a against row b for one main-table column with its 95% interval and verdict, or None where
    either side lacks the per-example or per-round records."""

    def __init__(self, results_dir: str | Path, df: pd.DataFrame, n_resamples: int = stats.N_RESAMPLES):
        self.dirs, self.n_resamples = cell_dirs(results_dir), n_resamples
        has = "paper_metric" in df
        zs = df[(df.stage == "zeroshot") & (df.paper_metric == True)] if has else df.iloc[0:0]  # noqa: E712
        # the paper metric per task, from the records (bench.evals.zeroshot.PAPER_METRIC, without importing torch)
        self.paper = {t: m for t, m in zip(zs.task, zs.metric) if t != "average"}
        # per-round values: eager rows keyed by their metric, llama.cpp rows by `llamacpp <quant> <metric>`
        self.raw = {}
        for sp, name in ((speed_rows(df), lambda r: r["metric"]),
                         (llamacpp_rows(df), lambda r: f"{RUNTIME_LLAMACPP} {r['quant']} {r['metric']}")):
            if "raw" in sp:
                self.raw |= {(r["model"], r["method"], float(r["ratio"]), name(r), float(r["batch_size"])): r["raw"]
                             for r in sp.to_dict("records") if isinstance(r.get("raw"), list) and r["raw"]}
        self._cache = {}

    def _file(self, key: tuple, name: str) -> list[dict] | None:
        path = self.dirs.get(key, Path("/nonexistent")) / EXAMPLES / name
        if path not in self._cache:
            self._cache[path] = read_examples(path) if path.exists() else None
        return self._cache[path]

    def _aligned(self, a: tuple, b: tuple, name: str, id_field: str, fields) -> tuple | None:
        """Both cells' values of `fields` on the ids both files hold (non-null), in id order, or None."""
        ra, rb = self._file(a, name), self._file(b, name)
        if ra is None or rb is None:
            return None
        va = {r[id_field]: [r.get(f) for f in fields] for r in ra}
        vb = {r[id_field]: [r.get(f) for f in fields] for r in rb}
        ids = sorted(i for i in va.keys() & vb.keys() if None not in va[i] and None not in vb[i])
        if not ids:
            return None
        return np.array([va[i] for i in ids], dtype=float), np.array([vb[i] for i in ids], dtype=float)

    def task_distribution(self, a: tuple, b: tuple, task: str) -> tuple | None:
        """(difference x100, its resamples, documents) of one task's paper metric; cached, because the task
        average reuses every task's resamples. Each task draws from its own seed stream ([0, task index])."""
        cache_key = ("task", a, b, task)
        if cache_key not in self._cache:
            pair = self._aligned(a, b, f"zeroshot_{task}.jsonl.gz", "doc_id", [self.paper.get(task, "acc")])
            self._cache[cache_key] = None if pair is None else (
                *stats.paired_distribution(pair[0][:, 0] * 100, pair[1][:, 0] * 100, stats.mean_difference,
                                           self.n_resamples, [0, list(ACCURACY.values()).index(task)]),
                len(pair[0]))
        return self._cache[cache_key]

    def compare(self, a: tuple, b: tuple, col: str) -> dict | None:
        """Row a against row b on main-table column `col`: accuracy (a task or Avg, x100): difference a - b;
        perplexity: ratio a / b; speedup against dense: a's mean per-round speedup; other speed columns: ratio of
        the two cells' mean per-round values. verdict: `a better`, `b better` or `no significant difference`."""
        higher = not col.startswith(LOWER_IS_BETTER)
        if col in ACCURACY or col == "Avg":
            tasks = [ACCURACY[col]] if col in ACCURACY else [t for t in ACCURACY.values() if t in self.paper]
            found = [self.task_distribution(a, b, t) for t in tasks]
            if not tasks or any(f is None for f in found):
                return None
            est, low, high = (float(np.mean([f[0] for f in found])),
                              *stats.interval(np.mean([f[1] for f in found], axis=0)))
            statistic, null, n = "difference (points)", 0.0, sum(f[2] for f in found)
            fewest = min(f[2] for f in found)
        elif col in PPL:
            corpus, metric = PPL[col]
            pair = self._aligned(a, b, f"ppl_{corpus}_{metric}.jsonl.gz", "window", ["nll_sum", "tokens"])
            if pair is None:
                return None
            (est, low, high), statistic, null, n = (stats.ppl_ratio(*pair, self.n_resamples), "PPL ratio", 1.0,
                                                    len(pair[0]))
            fewest = n
        elif (raw_key := _raw_key(col)) is not None:
            metric, batch = raw_key
            speedup = metric.endswith("speedup")
            ra = self.raw.get((*a, metric, batch))
            if speedup and b[1] == "dense":
                if ra is None:
                    return None
                (est, low, high), statistic, n = stats.speedup_mean(ra, self.n_resamples), "mean speedup", len(ra)
                fewest = n
            else:
                rb = self.raw.get((*b, metric, batch))
                if ra is None or rb is None:
                    return None
                (est, low, high), n = stats.speedup_ratio(ra, rb, self.n_resamples), len(ra) + len(rb)
                fewest = min(len(ra), len(rb))
                statistic = "speedup ratio" if speedup else "ratio of means"
            null = 1.0
        else:
            return None
        # one document, window or round per side has no spread to resample: its interval is a point, not evidence
        verdict = (TOO_FEW if fewest < 2 else stats.verdict(low, high, null, "a better", "b better", higher))
        return {"statistic": statistic, "estimate": est, "low": low, "high": high, "n": n, "verdict": verdict}


TOO_FEW = "too few samples (n < 2 per side)"
PAIRED_COLUMNS = ["model", "ratio", "method", "kind", "against", "metric", "statistic", "estimate", "low", "high",
                  "n", "verdict"]


def _paired_metrics(table: pd.DataFrame) -> list[str]:
    """The columns paired.md compares: every accuracy and the average, every perplexity, every speedup."""
    return [c for c in metric_columns(table)
            if c in ACCURACY or c == "Avg" or c in PPL or c.startswith("speedup") or LLAMACPP.match(c)]


def paired_table(results_dir: str | Path, df: pd.DataFrame | None = None,
                 n_resamples: int = stats.N_RESAMPLES) -> pd.DataFrame:
    """Every pruned row against dense and against the best row of the other family (depth vs width; SliceGPT
    counts as width) at the same model and ratio, per metric: the best row is the other family's best value of
    that metric. Accuracy: difference in points with a 95% paired bootstrap over documents (the average: each
    task's documents resampled on their own, the mean of the per-task differences); perplexity: the ratio of PPLs,
    paired over windows; speedup (eager, and llama.cpp per quantization): against dense the mean per-round
    speedup, against the other family the ratio of the two mean speedups (rounds resampled independently).
    10,000 resamples, seeded. verdict: `<family> better` or `no significant difference` at 95%; `no per-example
    records` where a side lacks them."""
    df = load(results_dir) if df is None else df
    table = main_table(df)
    evidence = Evidence(results_dir, df, n_resamples)
    out = []
    for _, row in table[table.kind != "dense"].iterrows():
        dense = table[(table.model == row.model) & (table.kind == "dense")]
        other = table[(table.model == row.model) & (table.ratio == row.ratio) & (table.kind != "dense")
                      & (table.kind.map(FAMILY) != FAMILY.get(row.kind)) & (table.retrain == row.retrain)]
        for col in _paired_metrics(table):
            if pd.isna(row[col]):
                continue
            against = [] if dense.empty else [dense.iloc[0]]
            candidates = other.dropna(subset=[col])
            if not candidates.empty:
                lower = col.startswith(LOWER_IS_BETTER)
                against.append(candidates.sort_values(col, ascending=lower, kind="stable").iloc[0])
            for b in against:
                result = evidence.compare(_key(row), _key(b), col)
                line = {"model": row.model, "ratio": row.ratio, "method": row.method, "kind": row.kind,
                        "against": b.method, "metric": col}
                if result is None:
                    line |= {"statistic": "", "estimate": np.nan, "low": np.nan, "high": np.nan, "n": np.nan,
                             "verdict": NO_EXAMPLES}
                else:
                    names = {"a better": f"{FAMILY.get(row.kind, row.kind)} better",
                             "b better": f"{FAMILY.get(b.kind, b.kind)} better"}
                    line |= result | {"verdict": names.get(result["verdict"], result["verdict"])}
                out.append(line)
    return pd.DataFrame(out, columns=PAIRED_COLUMNS)


PAIRED_CAPTION = (
    "Paired comparisons: every pruned row against dense and against the other family's best row (depth vs width, "
    "SliceGPT as width) of the same metric at the same ratio. Accuracy (paper metric, x100): difference, row minus "
    "against, 95% paired-bootstrap interval (documents resampled jointly; Avg: each task resampled on its own, the "
    "mean of the per-task differences); perplexity: PPL ratio, row over against, bootstrap over windows; speedup "
    "(eager, and llama.cpp per quantization): against dense the mean per-round speedup, against the other family "
    "the ratio of mean speedups (rounds resampled independently). 10,000 resamples, seed 0; verdict at 95%.")


def paired_markdown(paired: pd.DataFrame) -> str:
    show = paired[["model", "ratio", "method", "against", "metric", "statistic"]].copy()
    show["ratio"] = show.ratio.map("{:g}".format)
    show["estimate [95% CI]"] = ["-" if pd.isna(e) else f"{e:.3f} [{lo:.3f}, {hi:.3f}]"
                                 for e, lo, hi in zip(paired.estimate, paired.low, paired.high)]
    show["n"] = paired.n.map(lambda v: "-" if pd.isna(v) else f"{v:g}")
    show["verdict"] = paired.verdict
    return PAIRED_CAPTION + "\n\n" + show.to_markdown(index=False, disable_numparse=True) + "\n"


def depth_vs_width(results_dir: str | Path, df: pd.DataFrame | None = None,
                   n_resamples: int = stats.N_RESAMPLES) -> pd.DataFrame:
    """Per model and ratio, each family's best row by zero-shot average: the accuracy difference depth minus
    width (points, paired bootstrap; the records' difference and a NaN interval without per-example records) and
    the difference of their mean speedups at the smallest batch (rounds resampled independently; the records'
    difference and a NaN interval without rounds)."""
    df = load(results_dir) if df is None else df
    table = main_table(df)
    if "Avg" not in table:
        return pd.DataFrame()
    evidence = Evidence(results_dir, df, n_resamples)
    sp = speed_rows(df)
    batch = None if sp.empty else sp.batch_size.min()
    out = []
    for (model, ratio), group in table[table.kind != "dense"].dropna(subset=["Avg"]).groupby(["model", "ratio"]):
        best = {fam: part.sort_values("Avg", ascending=False, kind="stable").iloc[0]
                for fam, part in group.groupby(group.kind.map(FAMILY))}
        if not {"depth", "width"} <= best.keys():
            continue
        d, w = best["depth"], best["width"]
        acc = evidence.compare(_key(d), _key(w), "Avg")
        line = {"model": model, "ratio": ratio, "depth": d.method, "width": w.method,
                "acc_diff": d.Avg - w.Avg if acc is None else acc["estimate"],
                "acc_low": np.nan if acc is None else acc["low"], "acc_high": np.nan if acc is None else acc["high"],
                "speedup_diff": np.nan, "speedup_low": np.nan, "speedup_high": np.nan, "batch_size": batch}
        if batch is not None and f"speedup bs{batch:g}" in table:  # the point without rounds; replaced below
            line["speedup_diff"] = d[f"speedup bs{batch:g}"] - w[f"speedup bs{batch:g}"]
        rd = evidence.raw.get((*_key(d), "speedup", float(batch))) if batch is not None else None
        rw = evidence.raw.get((*_key(w), "speedup", float(batch))) if batch is not None else None
        if rd is not None and rw is not None:
            line["speedup_diff"], line["speedup_low"], line["speedup_high"] = stats.speedup_difference(
                rd, rw, n_resamples)
        out.append(line)
    return pd.DataFrame(out)


PAIRED_MD, PAIRED_CSV = "paired.md", "paired.csv"
MEMORY_MD = "memory.md"
MEMORY_STAGES = ["load", "speed_reference", "score", "prune", "retrain", "ppl", "zeroshot", "speed"]


def memory_table(df: pd.DataFrame) -> pd.DataFrame:
    """One row per cell: each stage's peak accelerator memory and peak host RSS in MiB (the `memory` rows,
    bench/memory.py), with the device and where the speed stage kept its dense reference. Empty without memory
    rows (records from before they existed)."""
    if "stage" not in df or not (df.stage == "memory").any():
        return pd.DataFrame()
    mem = df[df.stage == "memory"]
    speed = df[df.stage == "speed"]
    refs = (speed.dropna(subset=["speed_reference"]).groupby(KEYS).speed_reference.unique()
            if "speed_reference" in speed else pd.Series(dtype=object))
    out = []
    for key, cell in mem.groupby(KEYS, sort=False):
        row = dict(zip(KEYS, key)) | {"device": cell.device_name.iloc[0], "dtype": cell["dtype"].iloc[0]}
        row["speed_reference"] = ",".join(map(str, refs[key])) if key in refs.index else "-"
        for stage in [s for s in MEMORY_STAGES if s in set(cell.task)]:
            part = cell[cell.task == stage].set_index("metric").value
            row[f"{stage} accel MiB"] = part.get("peak_accel_mib")
            row[f"{stage} host MiB"] = part.get("peak_host_rss_mib")
        out.append(row)
    return pd.DataFrame(out)


def memory_markdown(table: pd.DataFrame) -> str:
    """memory.md: the peaks per cell and stage, accelerator and host tables apart (a CPU run has no accelerator
    column: its model lives in host memory)."""
    text = ["Peak memory per stage, MiB. Accelerator: torch.cuda.max_memory_allocated, reset at each stage's start "
            "(weights included). Host: peak RSS (VmHWM, reset at each stage's start). speed_reference: where the "
            "speed stage kept its dense reference (resident, cpu, reload; bench/memory.py).", ""]
    ident = ["model", "method", "ratio", "device", "dtype", "speed_reference"]
    for side, title in (("accel", "Accelerator"), ("host", "Host RSS")):
        cols = [c for c in table.columns if c.endswith(f" {side} MiB") and table[c].notna().any()]
        if not cols:
            continue
        part = table[ident + cols].rename(columns={c: c.replace(f" {side} MiB", "") for c in cols})
        part = part.assign(ratio=part.ratio.map(lambda r: f"{r:g}"))
        for c in cols:
            col = c.replace(f" {side} MiB", "")
            part[col] = part[col].map(lambda v: "-" if v is None or pd.isna(v) else f"{v:,.0f}")
        text += [f"## {title}", "", part.to_markdown(index=False), ""]
    return "\n".join(text)



def write_tables(results_dir: str | Path) -> list[Path]:
    """tables/main.{md,tex,csv} and tables/paired.{md,csv}; returns the three main paths (callers unpack them)."""
    results_dir = Path(results_dir)
    df = load(results_dir)
    if df.empty:
        raise SystemExit(f"no records.jsonl below {results_dir}")
    table = main_table(df)
    out = results_dir / "tables"
    text = caption(df)
    evidence = Evidence(results_dir, df)
    write_atomic(out / "main.md", text + "\n" + to_markdown(table, evidence))
    write_atomic(out / "main.tex", "% caption:\n" + "".join(f"% {line}\n" for line in text.splitlines())
                 + to_latex(table, evidence))
    write_atomic(out / "main.csv", table.to_csv(index=False))
    paired = paired_table(results_dir, df)
    write_atomic(out / PAIRED_MD, paired_markdown(paired))
    write_atomic(out / PAIRED_CSV, paired.to_csv(index=False))
    memory = memory_table(df)
    if not memory.empty:
        write_atomic(out / MEMORY_MD, memory_markdown(memory))
        write_atomic(out / "memory.csv", memory.to_csv(index=False))
    return [out / "main.md", out / "main.tex", out / "main.csv"]  # paired.{md,csv} beside them (PAIRED_MD, ..)


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python -m bench.report RESULTS_DIR")
    for path in write_tables(sys.argv[1]):
        print(path)
    for name in (PAIRED_MD, PAIRED_CSV):
        print(Path(sys.argv[1]) / "tables" / name)
    print((Path(sys.argv[1]) / "tables" / "main.md").read_text())
