"""Speed-reference benchmark: the same pruned cell's speedup against dense under the three reference modes.

`eval.speed.reference` (bench/memory.py) keeps the dense reference of a cell's speedups resident beside the pruned
model, parked in host memory (cpu: moved in for its turns), or measured alone before pruning (reload: not
interleaved). This runs one cell per mode, one after the other in one process (same base weights, same config
otherwise), and prints, per mode and batch size, the per-round speedups (median, mean, std, min, max, rounds),
whether they were interleaved, and each median over resident's. On a CPU resident and cpu are the same
measurement (the host is the accelerator), so their difference is the machine's noise; reload adds what not
interleaving costs. These are figures to read, not to test: on this 2-core VM under load, tiny-llama's batch-1
medians were once 1.20 (resident), 1.94 (cpu) and 1.45 (reload), a factor of 1.6 apart (issue 30).

    make bench-speed-reference    # smollm2-135m on this CPU, depth_magnitude at 0.2, batch 1 and 4, 10 rounds
    python -m bench.benchmarks.speed_reference --out /tmp/speed-ref model=tiny-llama ratio=0.45
    python -m bench.benchmarks.speed_reference --modes resident,cpu model=llama-7b shape_only=true \\
        method=depth_ppl eval.speed.batch_sizes=[1,16] eval.speed.new_tokens=[128]    # on a GPU

Each run writes its cells under --out/<date-time>/<mode>/ (records.jsonl as any cell), so a rerun measures anew.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

from bench import BenchError
from bench.benchmarks import command_line

MODES = ("resident", "cpu", "reload")
# The cell each mode runs, unless an override names the key: a data-free depth criterion, speed only.
DEFAULTS = ("method=depth_magnitude", "ratio=0.2", "eval=quick", "eval.stages=[speed]", "eval.speed.batch_sizes=[1]",
            "eval.speed.new_tokens=[32]", "eval.speed.warmup=1", "eval.speed.repeats=10", "eval.speed.min_time_s=0")


def merged(overrides: list[str]) -> list[str]:
    """DEFAULTS with the command line's overrides in place of those naming the same key."""
    by_key = {o.split("=", 1)[0].lstrip("+~"): o for o in (*DEFAULTS, *overrides)}
    return list(by_key.values())


def run(modes: list[str], overrides: list[str], out: Path) -> list[dict]:
    """One cell per mode into out/<mode>; its speed rows (model x batch x metric), each with speed_reference."""
    from bench.config import compose
    from bench.runner import run_cell

    rows = []
    for mode in modes:
        cfg = compose([*merged(overrides), f"eval.speed.reference={mode}", f"out_dir={out / mode}"])
        cell = run_cell(cfg)
        rows += [r for r in map(json.loads, (cell / "records.jsonl").read_text().splitlines())
                 if r["stage"] == "speed"]
    return rows


def table(rows: list[dict]) -> list[dict]:
    """Per mode x runtime x new tokens x batch: the speedup's per-round ratios summarized, the pruned model's
    median latency, and the median over resident's at the same point (None without a resident row)."""
    speedups = [r for r in rows if r["metric"] == "speedup" and r.get("status") == "ok"]
    latency = {(r["speed_reference"], r["runtime"], r["new_tokens"], r["batch_size"]): r for r in rows
               if r["metric"] == "latency_s" and r.get("status") == "ok"}
    resident = {(r["runtime"], r["new_tokens"], r["batch_size"]): r["median"] for r in speedups
                if r["speed_reference"] == "resident"}
    out = []
    for r in speedups:
        point = (r["runtime"], r["new_tokens"], r["batch_size"])
        ref = resident.get(point)
        out.append({"mode": r["speed_reference"], "runtime": r["runtime"], "new_tokens": r["new_tokens"],
                    "batch_size": r["batch_size"], "interleaved": r.get("interleaved", True), "rounds": r["n"],
                    "median": r["median"], "mean": r["value"], "std": r["std"], "min": min(r["raw"]),
                    "max": max(r["raw"]), "latency_s": latency[(r["speed_reference"], *point)]["median"],
                    "vs_resident": r["median"] / ref if ref else None})
    return sorted(out, key=lambda t: (t["runtime"], t["new_tokens"], t["batch_size"], MODES.index(t["mode"])))


def render(lines: list[dict]) -> str:
    head = (f"{'mode':<9} {'runtime':<8} {'out':>4} {'bs':>4} {'interl.':>7} {'rounds':>6} {'median':>7} "
            f"{'mean':>7} {'std':>6} {'min':>6} {'max':>6} {'latency_s':>10} {'vs resident':>11}")
    body = [f"{t['mode']:<9} {t['runtime']:<8} {t['new_tokens']:>4} {t['batch_size']:>4} "
            f"{'yes' if t['interleaved'] else 'no':>7} {t['rounds']:>6} {t['median']:>7.3f} {t['mean']:>7.3f} "
            f"{t['std']:>6.3f} {t['min']:>6.3f} {t['max']:>6.3f} {t['latency_s']:>10.4f} "
            f"{'-' if t['vs_resident'] is None else format(t['vs_resident'], '.3f'):>11}" for t in lines]
    return "\n".join([head, *body])


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--modes", default=",".join(MODES), help=f"a comma list of {', '.join(MODES)}")
    parser.add_argument("--out", type=Path, default=Path("results/bench-speed-reference"))
    args, overrides = parser.parse_known_args(argv)
    modes = args.modes.split(",")
    bad = [m for m in modes if m not in MODES]
    if bad:
        raise BenchError(f"--modes={args.modes}: {', '.join(bad)} not allowed; allowed values are {', '.join(MODES)}")
    out = args.out / time.strftime("%Y%m%d-%H%M%S")
    t0 = time.perf_counter()
    rows = run(modes, overrides, out)
    lines = table(rows)
    if not lines:
        raise BenchError(f"no speedup rows in {out}: the cell must prune (method=dense has no reference)")
    text = render(lines)
    (out / "summary.txt").write_text(text + "\n")
    first = rows[0]
    print(f"{first['model']} {first['method']} r{first['ratio']:g}, {first['device_name']} ({first['device']}), "
          f"{first['dtype']}, {first['threads']} threads; speedup = dense latency / pruned latency, per round")
    print(text)
    medians = [t["median"] for t in lines]
    print(json.dumps({"out": str(out), "wall_s": round(time.perf_counter() - t0, 1),
                      "max_over_min_median": round(max(medians) / min(medians), 3)}))


if __name__ == "__main__":
    command_line(main, logging.WARNING)
