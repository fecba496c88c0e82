"""The GPU bundle's spec (bench/benchmarks/gpu_bundle.py), checked here without network: the pins are the dev
venv's, the bundled distributions' requirements are in the image, the bundle or LEFT_OUT, bench's imports and
lm-eval's used path import with nothing but the image and the bundle, the data part fits, and the wheel and
manifest checks catch what they should. The heavy proof (a clean venv like the image, the bundle installed and the
check run) is `make gpu-bundle-check`."""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from bench.benchmarks import gpu_bundle as gb

REPO = Path(__file__).resolve().parents[1]
DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
needs_data = pytest.mark.skipif(not (DATA / "README.md").exists(), reason="../shared/data not present")

# Imported by bench but not on the GPU check's path, so not bundled.
NOT_IN_CHECK = {"gguf": "GGUF export and the GGUF model source (the check builds random weights)",
                "llama_cpp": "the llama.cpp runtime (the check measures eager and compiled)"}
# The modules the check's run imports lazily, beyond bench's own (found by tracing the check's cells): lm-eval's
# evaluator, HFLM, task index and metrics, its request cache, datasets' json builder, hydra's launcher and sweeper.
USED_PATH = ["lm_eval", "lm_eval.evaluator", "lm_eval.models.huggingface", "lm_eval.tasks", "lm_eval.api.metrics",
             "lm_eval.api.model", "lm_eval.filters", "sqlitedict", "datasets", "datasets.packaged_modules.json.json",
             "hydra._internal.core_plugins.basic_launcher", "hydra._internal.core_plugins.basic_sweeper",
             "omegaconf", "torch_pruning", "tabulate"]


def _bundle() -> set[str]:
    return {canonicalize_name(d) for d in gb.BUNDLE}


def test_pins_are_the_dev_venv_versions():
    assert {d: metadata.version(d) for d in gb.BUNDLE} == gb.pins(), "make setup installs constraints.txt's pins"


def test_constraints_pin_exactly_the_bundle():
    """The Makefile installs the dev venv with constraints.txt: it must pin BUNDLE's versions and nothing else."""
    lines = (Path(__file__).parents[1] / "constraints.txt").read_text().splitlines()
    pinned = [Requirement(line) for line in lines if line.strip() and not line.startswith("#")]
    assert {canonicalize_name(r.name): str(r.specifier) for r in pinned} == \
        {canonicalize_name(d): f"=={v}" for d, v in gb.pins().items()}


def test_import_names_belong_to_their_distributions():
    owners = metadata.packages_distributions()
    for dist, (_, name, _) in gb.BUNDLE.items():
        assert canonicalize_name(dist) in {canonicalize_name(o) for o in owners.get(name, [])}, (dist, name)


def test_bundle_requirements_are_in_the_image_the_bundle_or_left_out():
    image, bundle, left_out = gb.image_closure(), _bundle(), {canonicalize_name(d) for d in gb.LEFT_OUT}
    assert not bundle & image, "bundled but in the image"
    assert not left_out & (image | bundle)
    required = set()
    for dist, version in gb.pins().items():
        for req in map(Requirement, metadata.requires(dist) or []):
            if req.marker is not None and not req.marker.evaluate(gb.MARKER_ENV):
                continue
            name = canonicalize_name(req.name)
            required.add(name)
            assert name in image | bundle | left_out, f"{dist} requires {req}: not in the image, BUNDLE or LEFT_OUT"
            if name in bundle:
                pin = next(v for d, v in gb.pins().items() if canonicalize_name(d) == name)
                assert req.specifier.contains(pin, prereleases=True), f"{dist} requires {req}, BUNDLE pins {pin}"
    assert left_out <= required, f"LEFT_OUT names what no bundled distribution requires: {left_out - required}"
    assert gb.unmet_requirements() == []  # the pins meet each other's ranges (here, with every pin installed)


def test_bench_imports_are_in_the_image_or_the_bundle():
    owners, allowed = metadata.packages_distributions(), gb.image_closure() | _bundle()
    for path in sorted((REPO / "bench").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                names = [node.module]
            else:
                continue
            for top in {n.partition(".")[0] for n in names}:
                if top in sys.stdlib_module_names or top == "bench" or top in NOT_IN_CHECK:
                    continue
                dists = {canonicalize_name(d) for d in owners.get(top, [])}
                assert dists & allowed, f"{path.relative_to(REPO)} imports {top} ({dists or 'not installed'}): " \
                                        f"neither in the GPU image nor in gpu_bundle.BUNDLE"


def _image_and_bundle_only(folder: Path) -> Path:
    """A folder with links to the top-level files of the dev venv's image and bundle distributions only: with
    `python -S` and it on PYTHONPATH, everything else is absent, as on the GPU image with the bundle."""
    allowed = gb.image_closure() | _bundle()
    for dist in metadata.distributions():
        if canonicalize_name(dist.metadata["Name"]) not in allowed:
            continue
        for top in {Path(str(f)).parts[0] for f in dist.files or []}:
            src = Path(dist.locate_file(top))
            if top not in ("..", "__pycache__") and not top.endswith(".pth") and src.exists() \
                    and not (folder / top).exists():
                (folder / top).symlink_to(src)
    return folder


def test_the_check_path_imports_with_only_the_image_and_the_bundle(tmp_path):
    site = _image_and_bundle_only(tmp_path)
    bench_modules = sorted(".".join(p.relative_to(REPO).with_suffix("").parts).removesuffix(".__init__")
                           for p in (REPO / "bench").rglob("*.py"))
    code = """
import importlib, importlib.util, sys
blocked = [n for n in sys.argv[1].split(",") if importlib.util.find_spec(n)]
assert not blocked, f"the link folder lets these through: {blocked}"
not_in_check = set(sys.argv[2].split(","))
for mod in sys.argv[3:]:
    try:
        importlib.import_module(mod)
    except ModuleNotFoundError as e:
        if e.name.partition(".")[0] not in not_in_check:
            raise SystemExit(f"import {mod}: {e}")
print("ok")
"""
    left_out = [imp for imp, _ in gb.LEFT_OUT.values()] + ["scipy"]  # scipy: transformers imports it if present
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"} | {"PYTHONPATH": f"{REPO}:{site}",
                                                                          "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-S", "-c", code, ",".join(left_out), ",".join(NOT_IN_CHECK),
                           *bench_modules, *USED_PATH], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), proc.stderr[-3000:] + proc.stdout[-500:]


@needs_data
def test_data_part_is_what_the_check_reads_and_fits(tmp_path):
    """A data root holding only gb.data_files() serves every reader the check runs: both perplexity corpora, the
    calibration text and the seven zero-shot tasks; and it fits its share of the 48 MiB."""
    from bench.data import book_rows, text_rows
    from bench.evals.zeroshot import TASKS, local_docs

    files = gb.data_files()
    for rel in files:
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).symlink_to(DATA / rel)
    assert all(len(text_rows(corpus, tmp_path)[0]) > 1000 for corpus in ("wikitext2", "ptb"))
    assert len(book_rows(tmp_path, "bookcorpus")) > 10  # the novel, cut into chapters
    assert all(len(local_docs(task, tmp_path)) > 400 for task in TASKS)
    assert not any(f.startswith("alpaca/") for f in files)  # LoRA is not in the check
    sizes = {f: (DATA / f).stat().st_size for f in files}
    assert sum(sizes.values()) <= gb.DATA_MAX_MIB * 2**20 < gb.MAX_MIB * 2**20, sizes


def _fake_wheels(folder: Path, python_tag: str = "cp312") -> Path:
    folder.mkdir(parents=True)
    native = {"xxhash", "lxml", "charset-normalizer"}
    for dist, version in gb.pins().items():
        stem = dist.replace("-", "_")
        tag = f"{python_tag}-{python_tag}-manylinux_2_28_x86_64" if dist in native else "py3-none-any"
        (folder / f"{stem}-{version}-{tag}.whl").write_bytes(dist.encode())
    return folder


def test_check_wheels_wants_one_pinned_wheel_per_distribution_for_the_image_python(tmp_path):
    wheels = _fake_wheels(tmp_path / "ok")
    assert len(gb.check_wheels(wheels, "3.12")) == len(gb.BUNDLE)
    with pytest.raises(gb.BundleError, match="does not install on CPython 3.12"):
        gb.check_wheels(_fake_wheels(tmp_path / "py311", "cp311"), "3.12")
    (wheels / "lm_eval-0.4.13-py3-none-any.whl").rename(wheels / "lm_eval-0.4.12-py3-none-any.whl")
    with pytest.raises(gb.BundleError, match="not the pinned lm-eval==0.4.13"):
        gb.check_wheels(wheels, "3.12")
    (wheels / "lm_eval-0.4.12-py3-none-any.whl").unlink()
    with pytest.raises(gb.BundleError, match="no wheel for lm-eval"):
        gb.check_wheels(wheels, "3.12")
    (wheels / "lm_eval-0.4.13-py3-none-any.whl").write_bytes(b"x")
    (wheels / "evaluate-0.4.6-py3-none-any.whl").write_bytes(b"x")
    with pytest.raises(gb.BundleError, match="evaluate-0.4.6-py3-none-any.whl is not in BUNDLE"):
        gb.check_wheels(wheels, "3.12")


def test_verify_checks_every_file_against_the_manifest(tmp_path):
    root = tmp_path / "bundle"
    _fake_wheels(root / "wheels")
    for rel in gb.data_files():
        (root / "data" / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / "data" / rel).write_text(rel)
    (root / "MANIFEST.json").write_text(json.dumps(gb.manifest(root, gb.PYTHON)))
    m = gb.verify(root, gb.PYTHON)
    assert m["pins"]["lm_eval"] == "0.4.13" and m["total_bytes"] == m["wheels_bytes"] + m["data_bytes"]
    assert gb.summary(m).startswith(f"{len(gb.BUNDLE)} wheels, {len(gb.data_files())} data files, ")
    (root / "data" / "ptb" / "ptb.valid.txt").write_text("changed")
    with pytest.raises(gb.BundleError, match="ptb.valid.txt: missing or not the file MANIFEST.json lists"):
        gb.verify(root, gb.PYTHON)
    (root / "data" / "ptb" / "ptb.valid.txt").write_text("ptb/ptb.valid.txt")
    (root / "data" / "alpaca.json").write_text("{}")
    with pytest.raises(gb.BundleError, match="files not in MANIFEST.json: data/alpaca.json"):
        gb.verify(root, gb.PYTHON)
    with pytest.raises(gb.BundleError, match="no .*MANIFEST.json: run make gpu-bundle"):
        gb.verify(tmp_path / "none", gb.PYTHON)
