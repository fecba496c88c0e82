"""Faults injected, not assumed: a full disk (a real tmpfs, and a simulated failing write), a damaged score cache or
partial.jsonl, and the inputs a user tried that ended in a traceback (an out_dir that cannot be created, a plan of
the wrong kind). Each ends in one line naming the file or key, leaves no partial file, and the next run finishes."""

from __future__ import annotations

import errno
import json
import logging
import os
import shutil
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

import bench.records
from bench import BenchError
from bench.records import RECORDS, Progress, write_atomic
from bench.runner import cell as cell_of
from bench.runner import run_cell

QUICK = ["model=tiny-llama", "method=depth_magnitude", "ratio=0.25", "eval.ppl.max_windows=1",
         "eval.ppl.bos_modes=[once]"]
VOLATILE = ("elapsed_s", "wall_s", "host_rss_mib", "value_mib", "pid", "score_s", "prune_s", "scores_cached",
            "peak_rss_mib")


def measured(cell: Path) -> list[dict]:
    """A cell's perplexity rows without what changes from run to run (times, memory, pids)."""
    rows = [json.loads(line) for line in (cell / RECORDS).read_text().splitlines()]
    return [{k: v for k, v in r.items() if k not in VOLATILE} for r in rows if r["stage"] == "ppl"]


def leftovers(root: Path) -> list[str]:
    """Temporary files, locks and JSON files that do not parse, anywhere below `root`: what a failed write must not
    leave behind."""
    bad = [p for p in root.rglob("*") if p.is_file() and (p.name.endswith(".tmp") or p.name == "cell.lock")]
    for p in root.rglob("*.json"):
        try:
            json.loads(p.read_text())
        except ValueError:
            bad.append(p)
    return sorted(str(p.relative_to(root)) for p in bad)


@pytest.fixture()
def tmpfs(tmp_path):
    """A 2 MiB tmpfs mounted for the test (root only; skipped where mount is not allowed)."""
    disk = tmp_path / "disk"
    disk.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(disk)],
                      capture_output=True).returncode != 0:
        pytest.skip("cannot mount a tmpfs here (needs root)")
    yield disk
    subprocess.run(["umount", "-l", str(disk)], check=False)


def fill(disk: Path, leave_bytes: int) -> Path:
    """Fill `disk` until ENOSPC, then give back `leave_bytes` (rounded to pages by tmpfs)."""
    filler = disk / "filler"
    with open(filler, "wb") as f:
        try:
            while True:
                f.write(b"\0" * 65536)
                f.flush()
        except OSError as e:
            assert e.errno == errno.ENOSPC
    size = filler.stat().st_size
    os.truncate(filler, max(0, size - leave_bytes))
    return filler


def test_full_tmpfs_fails_the_cell_cleanly_and_the_rerun_finishes(tmpfs, cfg_for, tmp_path):
    """The cell's results and its score cache on a nearly full 2 MiB tmpfs with 0, 4, 8, ... KiB free, until the
    cell fits: each amount runs out at another write (the lock, config.yaml, the score cache, scores.csv, plan.json,
    an examples file, partial.jsonl, records.jsonl), which fails the cell with an OSError naming that file. Nothing
    partial is left (no records.jsonl, no temporary file, no half-written JSON, no lock); with space freed the rerun
    finishes, and its rows equal a run on a roomy disk."""
    reference = measured(run_cell(cfg_for(*QUICK, f"out_dir={tmp_path / 'roomy'}",
                                          f"cache_dir={tmp_path / 'roomy-cache'}")))
    failed_on = []
    for free_kib in range(0, 256, 4):
        for path in tmpfs.iterdir():
            shutil.rmtree(path) if path.is_dir() else path.unlink()
        cfg = cfg_for(*QUICK, f"out_dir={tmpfs / 'results'}", f"cache_dir={tmpfs / 'cache'}")
        _, _, cell = cell_of(cfg)
        filler = fill(tmpfs, free_kib * 1024)
        try:
            run_cell(cfg)
        except OSError as e:
            assert e.errno == errno.ENOSPC and str(e.filename).startswith(str(tmpfs)), e
            failed_on.append(Path(e.filename).name)
            assert not (cell / RECORDS).exists() and leftovers(tmpfs) == [], (free_kib, leftovers(tmpfs))
            filler.unlink()
            assert run_cell(cfg) == cell and measured(cell) == reference
            assert leftovers(tmpfs) == [] and not (cell / "error.json").exists()
            assert not (cell / "partial.jsonl").exists()
        else:
            break
    assert len(set(failed_on)) >= 5 and RECORDS in failed_on, failed_on


def test_full_disk_from_the_cli_is_one_line(tmpfs, tmp_path, data_root):
    """`python -m bench` on a full disk: exit status 2 and one error line naming the file, no traceback (Hydra's
    own run directory is on another disk here: with out_dir full from the start Hydra fails before the cell)."""
    fill(tmpfs, 0)
    env = os.environ | {"BENCH_DATA": str(data_root), "BENCH_CACHE": str(tmp_path / "cache")}
    run = subprocess.run([sys.executable, "-m", "bench", *QUICK, "eval.stages=[ppl]", f"out_dir={tmpfs / 'res'}",
                          f"hydra.run.dir={tmp_path / 'hydra'}"], capture_output=True, text=True, env=env,
                         cwd=tmp_path)
    errors = [line for line in (run.stdout + run.stderr).splitlines() if "ERROR" in line or "Traceback" in line]
    assert run.returncode == 2 and len(errors) == 1, run.stderr
    assert "No space left on device: " + str(tmpfs / "res") in errors[0]


def test_simulated_failing_fsync_of_records_keeps_the_finished_units(cfg_for, monkeypatch):
    """Where no tmpfs can be mounted: the final write (records.jsonl) fails with ENOSPC in fsync; the cell's
    error names the file, no records.jsonl and no temporary file are left, partial.jsonl keeps the measured units,
    and the rerun reuses them."""
    cfg = cfg_for(*QUICK)
    _, _, cell = cell_of(cfg)
    real = os.fsync

    def fsync(fd):
        if os.readlink(f"/proc/self/fd/{fd}").split("/")[-1].startswith(f".{RECORDS}."):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real(fd)

    monkeypatch.setattr(bench.records.os, "fsync", fsync)
    with pytest.raises(OSError) as err:
        run_cell(cfg)
    assert err.value.errno == errno.ENOSPC and err.value.filename == str(cell / RECORDS)
    assert not (cell / RECORDS).exists() and not list(cell.glob(".*.tmp"))
    assert len(Progress(cell / "partial.jsonl").units) == 2  # wikitext2 and ptb, kept for the rerun
    monkeypatch.setattr(bench.records.os, "fsync", real)
    run_cell(cfg)
    assert (cell / RECORDS).exists() and not (cell / "error.json").exists()


def test_write_atomic_names_the_file_and_removes_its_temporary(tmp_path, monkeypatch):
    def full(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(bench.records.os, "fsync", full)
    with pytest.raises(OSError) as err:
        write_atomic(tmp_path / "plan.json", "{}")
    assert err.value.filename == str(tmp_path / "plan.json") and list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("damage", ["truncate", "garble", "not_an_object"])
def test_damaged_score_cache_is_recomputed_with_one_warning(cfg_for, tmp_path, caplog, damage):
    first = run_cell(cfg_for(*QUICK))
    (cache,) = list((tmp_path / "cache" / "scores").rglob("*.json"))
    good = cache.read_text()
    cache.write_text({"truncate": good[: len(good) // 2], "garble": "\x00\xff" + good[2:],
                      "not_an_object": "[1, 2, 3]"}[damage])
    with caplog.at_level(logging.WARNING, logger="bench.run"):
        again = run_cell(cfg_for(*QUICK, f"out_dir={tmp_path / 'again'}"))
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and warnings[0].startswith(f"score cache {cache} is damaged") \
        and warnings[0].endswith("recomputing it") and "\n" not in warnings[0], warnings
    assert json.loads(cache.read_text()) == json.loads(good)  # rewritten whole
    rows = [json.loads(line) for line in (again / RECORDS).read_text().splitlines()]
    assert rows[0]["scores_cached"] is False
    assert measured(again) == measured(first)


def test_damaged_partial_line_is_measured_again(cfg_for, caplog):
    """partial.jsonl with one finished unit cut short (a copy, a hand edit): that unit is measured again, the
    others are reused, one warning names the file and line."""
    cfg = cfg_for(*QUICK)
    _, _, cell = cell_of(cfg)
    reference = measured(run_cell(cfg))
    (cell / RECORDS).unlink()
    lines = [json.dumps({"unit": "ppl/wikitext2/once", "key": "k1", "rows": []}), '{"unit": "ppl/ptb/once", "ke']
    (cell / "partial.jsonl").write_text("\n".join(lines) + "\n")
    with caplog.at_level(logging.WARNING, logger="bench.records"):
        progress = Progress(cell / "partial.jsonl")
    assert list(progress.units) == ["ppl/wikitext2/once"]
    assert [r.getMessage() for r in caplog.records] == [
        f"{cell / 'partial.jsonl'}: line 2 is not a finished unit (damaged): it is measured again"]
    assert measured(run_cell(cfg)) == reference


def test_unwritable_out_dir_is_one_line_before_hydra(tmp_path, data_root):
    env = os.environ | {"BENCH_DATA": str(data_root), "BENCH_CACHE": str(tmp_path / "cache")}
    run = subprocess.run([sys.executable, "-m", "bench", "model=tiny-llama", "out_dir=/proc/bench-out"],
                         capture_output=True, text=True, env=env, cwd=tmp_path)
    lines = (run.stdout + run.stderr).strip().splitlines()
    assert run.returncode == 1 and len(lines) == 1, lines
    assert lines[0] == ("error: out_dir='/proc/bench-out': cannot create or write it (No such file or directory); "
                        "allowed values are a directory this process can create and write")
    assert not Path("/proc/bench-out").exists()


def test_out_dir_check_leaves_nothing_behind(tmp_path):
    from bench.schema import check_out_dir

    check_out_dir(tmp_path / "a" / "b")
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(BenchError, match=r"out_dir='/proc/x/y': cannot create or write it"):
        check_out_dir("/proc/x/y")


def test_plan_of_the_wrong_kind_is_named_before_the_model_loads(cfg_for, tmp_path, monkeypatch):
    """A width plan given to a depth method says so (not "a width plan needs the fields ..."), before loading."""
    import bench.runner

    plan = tmp_path / f"{uuid.uuid4().hex}.json"
    plan.write_text(json.dumps({"kind": "width"}))
    monkeypatch.setattr(bench.runner, "load_model", lambda *a, **k: pytest.fail("the model was loaded"))
    with pytest.raises(BenchError) as err:
        run_cell(cfg_for("model=tiny-llama", "method=depth_ppl", f"plan_file={plan}"))
    assert str(err.value) == f"plan_file={plan}: a width plan, but method=depth_ppl+ needs a depth plan"
