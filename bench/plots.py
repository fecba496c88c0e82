"""Figures from records alone (no torch, no models): PNG and PDF per figure.

    python -m bench.plots results/default            # -> plots/default/*.{png,pdf}

    throughput_vs_batch  eager generation tokens/s against batch size (log x), one line per method x ratio
    speedup_vs_batch     interleaved speedup against dense, with its spread (std over rounds)
    accuracy_vs_speedup  zero-shot average against batch-1 speedup; the Pareto front (no other row is both more
                         accurate and faster) is drawn
    ppl_vs_params        WikiText-2 perplexity (log y) against parameters, depth and width apart
    depth_vs_width       per ratio, zero-shot average difference (depth minus width, each family's best by average)
                         against the batch-1 speedup difference, with 95% bootstrap intervals (bench.report.
                         depth_vs_width); drawn where at least one interval can be computed (per-example records
                         or speed rounds); a point without an interval is hollow
"""

from __future__ import annotations

import sys
from pathlib import Path

import pandas as pd

from bench.report import depth_vs_width, load, main_table, speed_rows

KIND_MARKER = {"dense": "*", "depth": "o", "width": "s", "slice": "D"}


def pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _label(row) -> str:
    return row.method if row.kind == "dense" else f"{row.method} {row.ratio:g}"


def _save(fig, out: Path, name: str) -> list[Path]:
    paths = []
    out.mkdir(parents=True, exist_ok=True)
    for ext in ("png", "pdf"):
        path = out / f"{name}.{ext}"
        # no creation date in the PDF: regenerating the same records gives the same bytes
        fig.savefig(path, dpi=130, bbox_inches="tight", metadata={"CreationDate": None} if ext == "pdf" else None)
        paths.append(path)
    return paths


def pareto_front(points: list[tuple[float, float]]) -> list[int]:
    """Indices of the points no other point dominates (higher or equal x and y, one strictly), by x."""
    front = [i for i, (x, y) in enumerate(points)
             if not any(x2 >= x and y2 >= y and (x2, y2) != (x, y) for x2, y2 in points)]
    return sorted(front, key=lambda i: points[i][0])


def per_batch(plt, sp: pd.DataFrame, metric: str, ylabel: str, out: Path, name: str) -> list[Path]:
    sel = sp[sp.metric == metric]
    if sel.empty:
        return []
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    # colour = method, line style = ratio, marker = kind
    methods = sorted(sel.method.unique())
    palette = plt.get_cmap("tab20" if len(methods) > 10 else "tab10")  # one colour per method, up to 20
    colors = {m: palette(i % palette.N) for i, m in enumerate(methods)}
    styles = {r: ls for r, ls in zip(sorted(sel.ratio.unique()), ["-", "--", ":", "-."] * 4)}
    for (method, ratio, kind), part in sel.groupby(["method", "ratio", "kind"], sort=True):
        part = part.sort_values("batch_size")
        label = method if kind == "dense" else f"{method} {ratio:g}"
        yerr = part["std"] if "std" in part and metric == "speedup" else None
        ax.errorbar(part.batch_size, part.value, yerr=yerr, marker=KIND_MARKER.get(kind, "o"), capsize=3,
                    linestyle=styles[ratio], label=label, color=colors[method])
    batches = sorted(sel.batch_size.unique())
    ax.set_xscale("log", base=2)
    ax.set_xticks(batches, [f"{b:g}" for b in batches])
    ax.set_xlabel("batch size")
    ax.set_ylabel(ylabel)
    if metric == "speedup":
        ax.axhline(1.0, color="grey", lw=0.8)
    ax.grid(alpha=0.3)
    # beside the axes: with a dozen lines or more, a legend inside hides the points
    ax.legend(fontsize=7, ncol=1 + len(methods) // 8, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    first = sel.iloc[0]
    ax.set_title(f"{first.model} ({first.get('mode', 'weights')}, {first.get('dtype', '')}, "
                 f"{first.get('device_name', '')}): {first.runtime} generate, {first.new_tokens:g} new tokens",
                 fontsize=8)
    paths = _save(fig, out, name)
    plt.close(fig)
    return paths


def depth_vs_width_figure(plt, pts: pd.DataFrame, out: Path) -> list[Path]:
    """The depth-vs-width figure from bench.report.depth_vs_width's rows: one point per model x ratio, error bars
    from the intervals (none where an interval is missing: the point is then hollow), zero lines: a point up and
    to the right means depth is both more accurate and faster."""
    pts = pts.dropna(subset=["acc_diff", "speedup_diff"]).reset_index(drop=True) if not pts.empty else pts
    if pts.empty or pts[["acc_low", "speedup_low"]].isna().all().all():
        return []
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for i, r in pts.iterrows():
        xerr = None if pd.isna(r.speedup_low) else [[r.speedup_diff - r.speedup_low], [r.speedup_high - r.speedup_diff]]
        yerr = None if pd.isna(r.acc_low) else [[r.acc_diff - r.acc_low], [r.acc_high - r.acc_diff]]
        full = xerr is not None and yerr is not None
        color = plt.get_cmap("tab10")(i % 10)
        ax.errorbar([r.speedup_diff], [r.acc_diff], xerr=xerr, yerr=yerr, marker="o", capsize=3, ls="none",
                    color=color, markerfacecolor=color if full else "none",
                    label=f"{r.model} {r.ratio:g}: {r.depth} - {r.width}")
    ax.axhline(0.0, color="grey", lw=0.8)
    ax.axvline(0.0, color="grey", lw=0.8)
    ax.set_xlabel(f"speedup difference at batch {pts.batch_size.iloc[0]:g} (depth - width)")
    ax.set_ylabel("zero-shot average difference (points, depth - width)")
    ax.set_title("each family's best by average; 95% bootstrap intervals (hollow: no interval on one axis)",
                 fontsize=8)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    paths = _save(fig, out, "depth_vs_width")
    plt.close(fig)
    return paths


def write_plots(results_dir: str | Path, out_dir: str | Path) -> list[Path]:
    df = load(results_dir)
    if df.empty:
        raise SystemExit(f"no records.jsonl below {results_dir}")
    out = Path(out_dir)
    plt = pyplot()
    paths = []
    sp = speed_rows(df)
    paths += per_batch(plt, sp, "throughput_tok_s", "generated tokens / s", out, "throughput_vs_batch")
    paths += per_batch(plt, sp, "speedup", "speedup vs dense (interleaved)", out, "speedup_vs_batch")

    # one row per cell, as the main table has it: zero-shot Avg (%), WikiText-2 PPL
    table = main_table(df)
    rows = table.assign(accuracy=table.get("Avg"), ppl=table.get("WikiText2"))
    # accuracy against speedup at the smallest batch; a zero-shot-only sweep (zeroshot_full) has no speedup axis
    if not sp.empty and rows.accuracy.notna().any():
        b = sp.batch_size.min()
        rows["speedup"] = table.get(f"speedup bs{b:g}")
        rows.loc[rows.kind == "dense", "speedup"] = 1.0  # the reference of every measured speedup
        pts = rows.dropna(subset=["accuracy", "speedup"]).reset_index(drop=True)
        fig, ax = plt.subplots(figsize=(6.4, 4.2))
        for kind, part in pts.groupby("kind"):
            ax.scatter(part.speedup, part.accuracy, marker=KIND_MARKER.get(kind, "o"), s=50, label=kind)
        for _, r in pts.iterrows():
            ax.annotate(_label(r), (r.speedup, r.accuracy), fontsize=7, xytext=(3, 3),
                        textcoords="offset points")
        front = pareto_front(list(zip(pts.speedup, pts.accuracy)))
        ax.plot(pts.speedup[front], pts.accuracy[front], color="grey", lw=1, ls=":", label="Pareto front")
        ax.set_xlabel(f"speedup vs dense at batch {b:g}")
        ax.set_ylabel("zero-shot average accuracy (%)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        paths += _save(fig, out, "accuracy_vs_speedup")
        plt.close(fig)

    pts = rows.dropna(subset=["ppl"]) if rows.ppl.notna().any() else rows.iloc[0:0]
    if not pts.empty:
        fig, ax = plt.subplots(figsize=(6.4, 4.2))
        for kind, part in pts.groupby("kind"):
            ax.scatter(part.params / 1e6, part.ppl, marker=KIND_MARKER.get(kind, "o"), s=50, label=kind)
        for _, r in pts.iterrows():
            ax.annotate(_label(r), (r.params / 1e6, r.ppl), fontsize=7, xytext=(3, 3), textcoords="offset points")
        ax.set_yscale("log")
        ax.set_xlabel("parameters (M)")
        ax.set_ylabel("WikiText-2 perplexity (log)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        paths += _save(fig, out, "ppl_vs_params")
        plt.close(fig)
    return paths + depth_vs_width_figure(plt, depth_vs_width(results_dir, df), out)


if __name__ == "__main__":
    if len(sys.argv) not in (2, 3):
        sys.exit("usage: python -m bench.plots RESULTS_DIR [OUT_DIR]   (default OUT_DIR: plots/<name of RESULTS_DIR>)")
    results = Path(sys.argv[1])
    paths = write_plots(results, sys.argv[2] if len(sys.argv) == 3 else Path("plots") / results.name)
    for path in paths:
        print(path)
    if not paths:
        print(f"no plots for {results}: its records have no speed or WikiText-2 perplexity rows", file=sys.stderr)
