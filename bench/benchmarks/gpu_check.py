"""The GPU check: a whole sweep at 7B scale, every stage on CUDA, its time and peak memory, in one call.

Random bf16 weights of the llama-7b shape (no download; `--model llama3-8b` for the GQA shape), the evaluation data
from the bundle (make gpu-bundle), seven cells at 20%: dense, depth_ppl, depth_taylor, llm_pruner, flap, wanda_sp,
slicegpt, each through calibration, scoring, surgery, perplexity (a few windows), zero-shot (a few documents per
task, context-once backend) and eager speed at batch 1, 16, 64 x 128 new tokens with the warm-up at full length;
then the compiled runtime for dense, depth_ppl and llm_pruner at batch 1 and 16 (every batch and model is its own
compiled graph, tens of seconds each on a 7B). Tables (main, paired, memory) and plots follow. Random weights
make the quality numbers meaningless (the summary says so); what counts is that every stage runs on CUDA, how
long it takes and how much memory it holds, against bench.memory's prediction.

Each stage logs its time and peak memory as it ends, unbuffered, so a run cut short still reports; the summary at
the end lists them per cell, the dense batch-1 decode against the bandwidth roofline in both runtimes, and the
speedups per batch size. Without a GPU the same sweep runs on the tiny-llama-gqa shape in about a minute: it checks
the command itself.

    make gpu-check                                    # on the GPU node, from the bundle (make gpu-bundle)
    python -m bench.benchmarks.gpu_check --out results/gpu-check [--model llama3-8b] [hydra overrides]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

METHODS = ["dense", "depth_ppl", "depth_taylor", "llm_pruner", "flap", "wanda_sp", "slicegpt"]
COMPILED_METHODS = ["dense", "depth_ppl", "llm_pruner"]
RATIO = 0.2
COMMON = ["eval=quick", "eval.stages=[ppl,zeroshot,speed]", "eval.zeroshot.backend=context_once",
          "model.source=random", "eval.speed.runtimes=[eager]", "eval.speed.warmup=1", "eval.speed.repeats=2",
          "eval.speed.min_time_s=0", "eval.speed.reference=auto", "sweep_name=gpu-check"]
GPU = ["model.init=device", "dtype=bfloat16", "eval.ppl.max_windows=4", "eval.zeroshot.limit=3",
       "eval.speed.batch_sizes=[1,16,64]", "eval.speed.new_tokens=[128]"]
CPU = ["eval.ppl.max_windows=2", "eval.zeroshot.limit=2", "eval.speed.batch_sizes=[1,4]",
       "eval.speed.new_tokens=[8]"]
COMPILED = ["eval.stages=[speed]", "eval.speed.runtimes=[compiled]"]
COMPILED_BATCHES = {"cuda": "eval.speed.batch_sizes=[1,16]", "cpu": "eval.speed.batch_sizes=[1]"}


def sweep(out: Path, methods: list[str], overrides: list[str]) -> list[str]:
    """One Hydra multirun of `methods` at RATIO into `out`, in a child process whose log streams through. Returns
    its failures: the cells the sweep's summary.json counts as failed (a failed cell does not stop a multirun),
    or the command itself."""
    cmd = [sys.executable, "-u", "-m", "bench", "-m", f"method={','.join(methods)}", f"ratio={RATIO}",
           f"out_dir={out}", *overrides]
    print("+", " ".join(cmd), flush=True)
    if subprocess.run(cmd, env=os.environ | {"PYTHONUNBUFFERED": "1"}).returncode != 0:
        return [" ".join(cmd)]
    summaries = sorted((out / ".hydra").glob("*/summary.json"))
    if not summaries:
        return [f"{out}: no summary.json"]
    return [f"{f['cell']}: {f['error']}" for f in json.loads(summaries[-1].read_text())["failures"]]


def stage_summary(df, model_cfg) -> list[str]:
    """Per cell and stage: wall time, measured peak accelerator memory (else host RSS), bench.memory's prediction."""
    import pandas as pd

    from bench import memory
    from bench.models import hf_config

    shape = memory.Shape.of(hf_config(model_cfg))
    mem = df[df.stage == "memory"]
    if mem.empty:
        return []
    lines = [f"{'cell':<22} {'stage':<16} {'wall_s':>8} {'peak_MiB':>10} {'predicted_MiB':>14}  where"]
    for (method, ratio), cell in mem.groupby(["method", "ratio"], sort=False):
        name = method.rstrip("+")
        pred = memory.predict(shape, method=name, ratio=float(ratio), calib_batch=10, calib_len=128, ppl_batch=8,
                              ppl_len=128, zs_batch=8, speed_batch=64, speed_len=11 + 128,
                              dtype_bytes=2 if cell["dtype"].iloc[0] in ("bfloat16", "float16") else 4)
        for stage, part in cell.groupby("task", sort=False):
            by = part.set_index("metric").value
            accel, host = by.get("peak_accel_mib"), by.get("peak_host_rss_mib")
            value, where = (accel, "accelerator") if pd.notna(accel) else (host, "host RSS")
            predicted = pred.get(stage, {}).get("total")
            lines.append(f"{method + ' r' + format(ratio, 'g'):<22} {stage:<16} {part.wall_s.iloc[0]:>8.1f} "
                         f"{value:>10,.0f} {'-' if predicted is None else format(predicted / 2**20, ',.0f'):>14}  "
                         f"{where}")
    return lines


def speed_summary(df) -> list[str]:
    """Dense batch-1 decode against the bandwidth roofline per runtime, and every speedup per batch size."""
    sp = df[(df.stage == "speed") & (df.get("status") == "ok")]
    lines = []
    roof = sp[(sp.metric == "roofline_frac") & (sp.method == "dense")]
    for _, r in roof.iterrows():
        lines.append(f"dense {r.runtime} batch 1: {r.bound_tok_s * r.value:,.1f} decode tok/s = "
                     f"{100 * r.value:.1f}% of the {r.bound_tok_s:,.1f} tok/s roofline "
                     f"({r.bandwidth_gb_s:,.0f} GB/s copy bandwidth)")
    ups = sp[sp.metric == "speedup"]
    for (runtime, method), part in ups.groupby(["runtime", "method"], sort=False):
        cells = ", ".join(f"bs{int(r.batch_size)} {r.value:.2f}x" for _, r in part.sort_values("batch_size").iterrows())
        lines.append(f"speedup {runtime:<8} {method:<16} {cells}")
    return lines


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("results/gpu-check"))
    parser.add_argument("--model", default=None, help="default: llama-7b on CUDA, tiny-llama-gqa on a CPU")
    args, overrides = parser.parse_known_args(argv)
    cuda = torch.cuda.is_available()
    model = args.model or ("llama-7b" if cuda else "tiny-llama-gqa")
    base = [f"model={model}", *COMMON, *(GPU if cuda else CPU), *overrides]
    t0 = time.perf_counter()
    failed = sweep(args.out / "eager", METHODS, base)
    failed += sweep(args.out / "compiled", COMPILED_METHODS,
                    base + COMPILED + [COMPILED_BATCHES["cuda" if cuda else "cpu"]])
    wall_s = time.perf_counter() - t0

    from bench.config import compose
    from bench.plots import write_plots
    from bench.records import load_records
    from bench.report import write_tables

    for part in ("eager", "compiled"):
        if any((args.out / part).rglob("records.jsonl")):
            write_tables(args.out / part)
            write_plots(args.out / part, args.out / part / "plots")
    import pandas as pd

    parts = {p: load_records(args.out / p) for p in ("eager", "compiled")}
    parts = {p: df for p, df in parts.items() if not df.empty}
    if not parts:
        print("gpu-check: no records", flush=True)
        return 1
    lines = ["", "random weights: perplexity and accuracy are meaningless here; times and memory are not"]
    for part, df in parts.items():
        lines += ["", f"{part}:"] + stage_summary(df, compose([f"model={model}"]).model) + speed_summary(df)
    lines += [f"failed: {f}" for f in failed]
    print("\n".join(lines), flush=True)
    df = pd.concat(parts.values(), ignore_index=True)
    first = df.iloc[0]
    print(json.dumps({"gpu_check_wall_s": round(wall_s, 1), "device": first["device_name"], "dtype": first["dtype"],
                      "cells": int(df.groupby(["method", "ratio"]).ngroups), "failed_cells": len(failed),
                      "tables": [str(p) for p in sorted(args.out.rglob("tables/*.md"))]}), flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
