"""Many writers, one results tree: a sweep killed with SIGKILL again and again ends with the records of an
uninterrupted run, and two sweeps started at once into one out_dir compute every cell exactly once."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

# Four jobs, three cells: dense listed at two ratios is one cell (r0).
SWEEP = ["-m", "model=tiny-llama", "method=dense,depth_magnitude,depth_taylor", "ratio=0.25,0.4",
         "eval.stages=[ppl]", "eval.ppl.max_windows=2", "eval.ppl.bos_modes=[once]"]
CELLS = ["tiny-llama/dense/r0", "tiny-llama/depth_magnitude+/r0.25", "tiny-llama/depth_magnitude+/r0.4",
         "tiny-llama/depth_taylor+/r0.25", "tiny-llama/depth_taylor+/r0.4"]
# What changes from run to run, or says whether a run was resumed: times, memory, pids, cache hits.
VOLATILE = re.compile(r".*(_s|_mib)$|^(pid|scores_cached|resumed|value|wall_s)$")


def sweep(out: Path, tmp_path: Path, data_root: Path, **popen) -> subprocess.Popen:
    env = os.environ | {"BENCH_DATA": str(data_root), "BENCH_CACHE": str(tmp_path / f"cache-{out.name}")}
    return subprocess.Popen([sys.executable, "-m", "bench", *SWEEP, f"out_dir={out}"], env=env, cwd=tmp_path,
                            start_new_session=True, **popen)


def cells(out: Path) -> list[str]:
    return sorted(p.parent.relative_to(out).as_posix() for p in out.rglob("records.jsonl"))


def table(out: Path) -> dict[str, list[str]]:
    """Each cell's records without memory rows and volatile fields, one JSON string a row (NaN compares equal)."""
    result = {}
    for cell in cells(out):
        rows = [json.loads(line) for line in (out / cell / "records.jsonl").read_text().splitlines()]
        result[cell] = [json.dumps({k: v for k, v in r.items() if not VOLATILE.match(k)}, sort_keys=True)
                        for r in rows if r["stage"] != "memory"]
    return result


def debris(out: Path) -> list[str]:
    """What an interrupted run may leave while it runs, and a finished one must not: partial files, locks,
    temporaries, error files."""
    names = ("partial.jsonl", "cell.lock", "error.json", "partial_units")
    return sorted(str(p.relative_to(out)) for p in out.rglob("*")
                  if ".hydra" not in p.parts and (p.name in names or p.name.endswith(".tmp")))


def test_sigkill_at_several_moments_ends_with_the_uninterrupted_records(tmp_path, data_root):
    """Uninterrupted sweep A; sweep B killed with SIGKILL (the whole process group) when, in turn, the first
    lock appears, the first partial.jsonl appears, the first cell finishes, a partial.jsonl appears in a later cell,
    and shortly after a restart; then run to the end. B's records equal A's, row for row, with no duplicate
    line, and nothing partial is left."""
    a = tmp_path / "a"
    done = sweep(a, tmp_path, data_root, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    assert done.wait(600) == 0 and cells(a) == CELLS

    b = tmp_path / "b"
    moments = [lambda: any(b.rglob("cell.lock")), lambda: any(b.rglob("partial.jsonl")),
               lambda: len(cells(b)) >= 1, lambda: len(cells(b)) >= 2 and any(b.rglob("partial.jsonl")),
               lambda: len(cells(b)) >= 3 and any(b.rglob("cell.lock"))]
    kills = 0
    for moment in moments:
        proc = sweep(b, tmp_path, data_root, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.time() + 300
        while proc.poll() is None and not moment() and time.time() < deadline:
            time.sleep(0.01)
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            kills += 1
        proc.wait()
    assert kills >= 1  # the first moment (a cell holds its lock for seconds) is always reached
    last = sweep(b, tmp_path, data_root, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    log = last.communicate(timeout=600)[0]
    assert last.returncode == 0, log
    assert cells(b) == CELLS and debris(b) == []
    ta, tb = table(a), table(b)
    for cell in CELLS:
        assert len(tb[cell]) == len(set(tb[cell])), cell  # no duplicate line
        assert tb[cell] == ta[cell], cell


def test_two_sweeps_at_once_compute_every_cell_once(tmp_path, data_root):
    """Two identical sweeps started together into one out_dir (two users, or a SLURM array and a local rerun):
    each cell is computed by exactly one of them (the runner's `N records in` line appears once per cell across
    both logs); the other skips it, as done or as being computed, and the summaries add up."""
    out = tmp_path / "shared"
    procs = [sweep(out, tmp_path, data_root, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for _ in range(2)]
    logs = [p.communicate(timeout=900)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], logs
    computed = Counter(Path(m).relative_to(out).as_posix()
                       for log in logs for m in re.findall(r"\] - (\S+): \d+ records in ", log))
    assert computed == Counter(CELLS), computed
    assert cells(out) == CELLS and debris(out) == []
    summaries = [json.loads(p.read_text()) for p in out.glob(".hydra/*/summary.json")]
    assert len(summaries) == 2 and sum(s["ran"] for s in summaries) == len(CELLS)
    assert sum(s["ran"] + s["skipped"] + s["busy"] for s in summaries) == 2 * 6 and not any(s["failed"]
                                                                                           for s in summaries)
