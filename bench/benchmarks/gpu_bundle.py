"""The GPU check's self-contained bundle: wheels and evaluation data for an offline GPU image, and its proof here.

The GPU image has torch (CUDA), transformers 5.17, accelerate, peft, pandas, pyarrow, matplotlib, tqdm and
safetensors (and what they require), no lm-eval, datasets, hydra-core, omegaconf, antlr4 or torch-pruning, and no
network. The bundle brings exactly the distributions the check imports beyond the image (BUNDLE, found by running
the check's cells in a clean venv like the image until nothing was missing; plus pytest for make test-gpu), as
Python 3.12 manylinux x86-64 wheels pinned to the dev venv's versions, and the data files the check reads, in one
folder of at most 48 MiB:

    make gpu-bundle         # where PyPI is reachable: .cache/gpu-bundle/{wheels/, data/, MANIFEST.json}
    make gpu-check          # on the GPU node: pip install --no-index --target .cache/gpu-site, then the check
    make gpu-bundle-check   # the proof on this CPU: a clean venv like the image (the local CPU torch, transformers
                            # 5.17, the rest of the image's set; every bundled or left-out package absent), the
                            # bundle installed by make gpu-site as on the node, the check's cells run offline

`python -m bench.benchmarks.gpu_bundle build|check|requirements` are what those targets run. Where the local Python
is not 3.12 the proof installs the same pins downloaded for the local Python (.cache/gpu-bundle-py3XX/wheels, used
only by the proof); the shipped bundle stays 3.12.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name, parse_wheel_filename

PYTHON = "3.12"                      # the GPU image's Python
PLATFORM = "manylinux_2_28_x86_64"   # its glibc: torch 2.11's CUDA wheels need 2.28 (pip accepts older manylinux too)
MAX_MIB = 48                         # the whole bundle, wheels + data
DATA_MAX_MIB = 16                    # its data part (the rest is for the wheels)

# The image (the list); the proof's clean venv installs these after the local CPU torch.
IMAGE = ("torch", "transformers", "accelerate", "peft", "pandas", "pyarrow", "matplotlib", "tqdm", "safetensors")
IMAGE_PINS = {"transformers": "==5.17.*"}
# Also in the image although the dev venv's closure of IMAGE lacks them: transformers 5.17 requires
# huggingface_hub < 2, and hub 1.x requires httpx (certifi, idna, httpcore, h11); the dev venv's hub 2.x uses httpx2.
IMAGE_VIA_HUB1 = ("httpx", "httpcore", "h11", "certifi", "idna")

# distribution: (version, import name, why the check needs it). Versions are the dev venv's: the Makefile installs
# it with constraints.txt, which pins the same (tests check both).
BUNDLE = {
    "lm_eval": ("0.4.13", "lm_eval", "zero-shot stage"),
    "datasets": ("5.2.0", "datasets", "lm-eval's tasks load the local documents through it"),
    "dill": ("0.4.1", "dill", "datasets (fingerprints)"),
    "multiprocess": ("0.70.19", "multiprocess", "datasets"),
    "xxhash": ("4.1.0", "xxhash", "datasets"),
    "hydra-core": ("1.3.8", "hydra", "the CLI, config composition, multirun"),
    "omegaconf": ("2.3.1", "omegaconf", "the config"),
    "antlr4-python3-runtime": ("4.9.3", "antlr4", "omegaconf's and hydra's grammars"),
    "torch-pruning": ("1.6.1", "torch_pruning", "width surgery (bench/surgery.py)"),
    "sqlitedict": ("2.1.0", "sqlitedict", "lm-eval's request cache (use_cache: a zero-shot task resumes from it)"),
    "sacrebleu": ("2.6.0", "sacrebleu", "lm_eval.api.metrics imports it at module level"),
    "portalocker": ("4.4.2", "portalocker", "sacrebleu"),
    "colorama": ("0.4.6", "colorama", "sacrebleu"),
    "tabulate": ("0.10.0", "tabulate", "sacrebleu; bench.report (pandas to_markdown)"),
    "lxml": ("6.1.3", "lxml", "sacrebleu/__init__ imports sacrebleu.dataset, which imports lxml"),
    "requests": ("2.34.2", "requests", "lm_eval.utils imports it (lm-eval does not declare it)"),
    "urllib3": ("2.8.0", "urllib3", "requests"),
    "charset-normalizer": ("3.5.3", "charset_normalizer", "requests"),
    "pytest": ("9.2.0", "pytest", "make test-gpu (the test suite on CUDA, from the same gpu-site)"),
    "pluggy": ("1.7.0", "pluggy", "pytest"),
    "iniconfig": ("2.3.1", "iniconfig", "pytest"),
}
SDIST_ONLY = ("antlr4-python3-runtime", "sqlitedict")  # no wheel on PyPI: built here with pip wheel (pure Python)

# Requirements of bundled distributions that the check never imports: distribution: (import name, why it is safe).
LEFT_OUT = {
    "evaluate": ("evaluate", "lm_eval.api.registry imports it only for a metric lm-eval does not register itself; "
                             "acc and acc_norm are lm-eval's own"),
    "scikit-learn": ("sklearn", "imported inside lm-eval's f1 and mcc metrics, which none of the seven tasks uses"),
    "pytablewriter": ("pytablewriter", "imported inside lm_eval.utils.make_table, the lm-eval CLI's results table"),
    "rouge-score": ("rouge_score", "imported only by generation tasks' utils, none of the seven"),
    "word2number": ("word2number", "imported only by generation tasks' utils, none of the seven"),
    "more-itertools": ("more_itertools", "imported only by lm_eval.models.vllm_*"),
}

# What the proof runs as make gpu-check's GPU_CHECK_CMD ({out}: its output folder), and the stages its records must
# hold. A stand-in for the Makefile's `-m bench.benchmarks.gpu_check --out {out}` (7 methods and the compiled
# runtime: about 14 minutes on this CPU): two cells, one Hydra multirun, about 2 minutes, covering hydra and
# omegaconf (the CLI), torch-pruning (llm_pruner's surgery), datasets and lm-eval (zero-shot on the bundle's local
# files, with lm-eval's request cache), the perplexity and the speed stage.
PROOF_CMD = ["-m", "bench", "-m", "model=tiny-llama", "method=llm_pruner,depth_ppl", "ratio=0.2", "eval=quick",
             "eval.stages=[ppl,zeroshot,speed]", "eval.ppl.max_windows=2", "eval.zeroshot.limit=2",
             "eval.speed.batch_sizes=[1]", "eval.speed.new_tokens=[4]", "out_dir={out}"]
PROOF_STAGES = ("ppl", "zeroshot", "speed")

MARKER_ENV = {"python_version": PYTHON, "python_full_version": PYTHON + ".0", "sys_platform": "linux",
              "platform_system": "Linux", "platform_machine": "x86_64", "os_name": "posix",
              "implementation_name": "cpython", "platform_python_implementation": "CPython", "extra": ""}


class BundleError(Exception):
    """One line: what is wrong with the bundle or the proof, and what to do."""


def pins() -> dict[str, str]:
    return {dist: version for dist, (version, _, _) in BUNDLE.items()}


def data_files() -> list[str]:
    """The data root's files the check reads: the perplexity corpora and the calibration text (bench.data), the
    seven zero-shot tasks' files (bench.evals.zeroshot), and the data root's README (sources, formats, licences).
    Not alpaca: LoRA is not in the check."""
    from bench.data import LOCAL_FILES as TEXT_FILES
    from bench.evals.zeroshot import LOCAL_FILES as TASK_FILES

    return sorted({"README.md", *TEXT_FILES.values(), *(f for files in TASK_FILES.values() for f in files)})


def requirement_closure(names, env: dict = MARKER_ENV) -> set[str]:
    """Canonical names of `names` and everything they require (no extras; markers for the image), from this
    environment's installed metadata (the dev venv); a requirement not installed here is kept, not followed."""
    from importlib import metadata

    seen, todo = set(), [canonicalize_name(n) for n in names]
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        try:
            requires = metadata.requires(name) or []
        except metadata.PackageNotFoundError:
            continue
        todo += [canonicalize_name(r.name) for r in map(Requirement, requires)
                 if r.marker is None or r.marker.evaluate(env)]
    return seen


def image_closure() -> set[str]:
    return requirement_closure(IMAGE) | {canonicalize_name(n) for n in IMAGE_VIA_HUB1}


def supported_tags(python: str) -> set[str]:
    """Wheel tags a CPython `python` (e.g. "3.12") on manylinux_2_28 x86-64 installs."""
    from packaging import tags

    version = tuple(int(x) for x in python.split("."))
    platforms = [f"manylinux_2_{minor}_x86_64" for minor in range(28, 4, -1)] + \
                ["manylinux2014_x86_64", "manylinux2010_x86_64", "manylinux1_x86_64"]
    abi = f"cp{version[0]}{version[1]}"
    found = [*tags.cpython_tags(version, abis=[abi, "abi3", "none"], platforms=platforms),
             *tags.compatible_tags(version, interpreter=abi, platforms=platforms)]
    return {str(t) for t in found}


def check_wheels(folder: Path, python: str) -> list[Path]:
    """The folder's wheels, checked: exactly one per BUNDLE distribution, at its pin, installable on `python`."""
    wheels = sorted(folder.glob("*.whl"))
    got, ok_tags, want = {}, supported_tags(python), {canonicalize_name(d): v for d, v in pins().items()}
    for wheel in wheels:
        name, version, _, tags = parse_wheel_filename(wheel.name)
        if name in got:
            raise BundleError(f"{folder}: two wheels of {name}")
        if name not in want:
            raise BundleError(f"{folder}: {wheel.name} is not in BUNDLE (bench/benchmarks/gpu_bundle.py)")
        if str(version) != want[name]:
            raise BundleError(f"{folder}: {wheel.name} is not the pinned {name}=={want[name]}")
        if not {str(t) for t in tags} & ok_tags:
            raise BundleError(f"{folder}: {wheel.name} does not install on CPython {python} {PLATFORM}")
        got[name] = wheel
    if missing := sorted(set(want) - set(got)):
        raise BundleError(f"{folder}: no wheel for {', '.join(missing)}")
    return wheels


def _run(cmd: list[str], what: str, env: dict | None = None, log: Path | None = None, cwd: Path | None = None) -> None:
    """Run cmd; on failure raise one line naming `what`, with the tail of its output (or the log file)."""
    if log is None:
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=cwd)
        tail = (proc.stdout + proc.stderr).strip().splitlines()
    else:
        with log.open("w") as f:
            proc = subprocess.run(cmd, env=env, stdout=f, stderr=subprocess.STDOUT, text=True, cwd=cwd)
        tail = log.read_text(errors="replace").strip().splitlines()
    if proc.returncode:
        tail = [line for line in tail if "WARNING: Location" not in line][-25:]
        raise BundleError(f"{what} failed (exit {proc.returncode}): {shlex.join(cmd)}"
                          + (f"; log {log}" if log else "") + "\n    " + "\n    ".join(tail))


def download_wheels(dest: Path, python: str) -> list[Path]:
    """BUNDLE's wheels for CPython `python` on PLATFORM into dest (new): pip download --no-deps --only-binary, and
    pip wheel for the sdist-only ones (pure Python, py3-none-any)."""
    dest.mkdir(parents=True)
    abi = "cp" + python.replace(".", "")
    binary = [f"{d}=={v}" for d, v in pins().items() if d not in SDIST_ONLY]
    _run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:",
          "--python-version", python, "--implementation", "cp", "--abi", abi, "--platform", PLATFORM,
          "-d", str(dest), *binary], f"downloading the wheels for Python {python}")
    _run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "-w", str(dest),
          *[f"{d}=={pins()[d]}" for d in SDIST_ONLY]], "building the sdist-only wheels")
    return check_wheels(dest, python)


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def manifest(root: Path, python: str, sources: dict[str, str] | None = None) -> dict:
    """Every file under root (but MANIFEST.json) with bytes and sha256, the pins, and the sizes by part."""
    files = [{"path": str(p.relative_to(root)), "bytes": p.stat().st_size, "sha256": sha256(p)}
             for p in sorted(root.rglob("*")) if p.is_file() and p.name != "MANIFEST.json"]
    def part(prefix: str) -> int:
        return sum(f["bytes"] for f in files if f["path"].startswith(prefix))

    return {"python": python, "platform": PLATFORM, "pins": pins(), "image": list(IMAGE),
            "data_sources": sources or {}, "files": files, "wheels_bytes": part("wheels/"),
            "data_bytes": part("data/"), "total_bytes": part("")}


def read_manifest(root: Path) -> dict:
    path = root / "MANIFEST.json"
    if not path.is_file():
        raise BundleError(f"no {path}: run make gpu-bundle first (where PyPI is reachable)")
    return json.loads(path.read_text())


def verify(root: Path, python: str, with_data: bool = True) -> dict:
    """The bundle at root, checked against its manifest (every file's size and sha256, no extra file), the current
    pins and (with_data) data list, and the size limits; returns the manifest."""
    m = read_manifest(root)
    if m["python"] != python or m["pins"] != pins():
        raise BundleError(f"{root}: built for Python {m['python']} with other pins than BUNDLE: run make gpu-bundle")
    listed = {f["path"]: f for f in m["files"]}
    present = {str(p.relative_to(root)) for p in root.rglob("*") if p.is_file() and p.name != "MANIFEST.json"}
    if extra := sorted(present - set(listed)):
        raise BundleError(f"{root}: files not in MANIFEST.json: {', '.join(extra[:5])}")
    for path, f in listed.items():
        p = root / path
        if not p.is_file() or p.stat().st_size != f["bytes"] or sha256(p) != f["sha256"]:
            raise BundleError(f"{p}: missing or not the file MANIFEST.json lists: run make gpu-bundle")
    check_wheels(root / "wheels", python)
    if with_data and sorted(p[len("data/"):] for p in listed if p.startswith("data/")) != data_files():
        raise BundleError(f"{root}/data: not the files the check reads (gpu_bundle.data_files()): run make gpu-bundle")
    if m["data_bytes"] > DATA_MAX_MIB * 2**20 or m["total_bytes"] > MAX_MIB * 2**20:
        raise BundleError(f"{root}: {mib(m['total_bytes'])} MiB (data {mib(m['data_bytes'])} MiB): over the "
                          f"{MAX_MIB} MiB limit (data {DATA_MAX_MIB} MiB)")
    return m


def mib(n_bytes: int) -> str:
    return f"{n_bytes / 2**20:.1f}"


def summary(m: dict) -> str:
    n_wheels = sum(f["path"].startswith("wheels/") for f in m["files"])
    n_data = sum(f["path"].startswith("data/") for f in m["files"])
    return f"{n_wheels} wheels, {n_data} data files, {mib(m['total_bytes'])} MiB"


def build(out: Path, data_root: Path) -> dict:
    """Write the bundle to out (next to it first, then renamed into place); up to date already: left as it is."""
    sources = {}
    for rel in data_files():
        if not (data_root / rel).is_file():
            raise BundleError(f"no {data_root / rel}: --data (env BENCH_DATA) must be a data root laid out as "
                              f"../shared/data")
        sources[rel] = sha256(data_root / rel)
    try:
        m = verify(out, PYTHON)
        if m["data_sources"] == sources:
            print(f"gpu-bundle: {out} is up to date")
            return m
    except BundleError:
        pass
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    download_wheels(tmp / "wheels", PYTHON)
    for rel in data_files():
        (tmp / "data" / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(data_root / rel, tmp / "data" / rel)
    m = manifest(tmp, PYTHON, sources)
    (tmp / "MANIFEST.json").write_text(json.dumps(m, indent=1) + "\n")
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return verify(out, PYTHON)


def local_wheels(cache: Path) -> Path:
    """The wheels the proof installs: the bundle's own on Python 3.12, else the same pins downloaded for this
    Python into cache/gpu-bundle-py3XX/wheels (kept while the pins are the same)."""
    here = f"{sys.version_info.major}.{sys.version_info.minor}"
    root = cache / f"gpu-bundle-py{here.replace('.', '')}"
    try:
        verify(root, here, with_data=False)
    except BundleError:
        shutil.rmtree(root, ignore_errors=True)
        download_wheels(root / "wheels", here)
        (root / "MANIFEST.json").write_text(json.dumps(manifest(root, here), indent=1) + "\n")
    return root / "wheels"


def image_venv(venv: Path, torch_req: str) -> Path:
    """A venv like the GPU image: no system site packages, the local CPU torch first (a bare torch pulls a CUDA
    build), then IMAGE from PyPI with torch pinned to it. Kept while the spec is the same; its python."""
    py, stamp = venv / "bin" / "python", venv / "gpu-image.json"
    image = [f"{name}{IMAGE_PINS.get(name, '')}" for name in IMAGE if name != "torch"]
    spec = {"python": sys.version, "torch": torch_req, "image": image}
    if not (stamp.is_file() and json.loads(stamp.read_text()) == spec and py.is_file()):
        shutil.rmtree(venv, ignore_errors=True)
        print(f"gpu-bundle-check: creating {venv}: {torch_req}, then {' '.join(image)}", flush=True)
        _run([sys.executable, "-m", "venv", str(venv)], "creating the venv")
        _run([str(py), "-m", "pip", "install", "--quiet", torch_req], f"installing {torch_req}")
        torch_version = _python(py, "import torch; print(torch.__version__)")
        _run([str(py), "-m", "pip", "install", "--quiet", f"torch=={torch_version}", *image],
             "installing the image's packages")
        stamp.write_text(json.dumps(spec))
    if _python(py, "import torch; print(torch.version.cuda)") != "None":
        raise BundleError(f"{venv} has a CUDA torch; the proof needs the local CPU build (--torch {torch_req})")
    if not _python(py, "import transformers; print(transformers.__version__)").startswith("5.17."):
        raise BundleError(f"{venv}: transformers is not 5.17 (the image's)")
    return py


def _python(py: Path, code: str, env: dict | None = None) -> str:
    proc = subprocess.run([str(py), "-c", code], capture_output=True, text=True, env=env)
    if proc.returncode:
        raise BundleError(f"{py} -c {code!r} failed: {proc.stderr.strip().splitlines()[-1:]}")
    return proc.stdout.strip()


def importable(py: Path, names: list[str], env: dict) -> list[str]:
    """Those of the top-level import names that py finds under env."""
    code = "import importlib.util as u, sys; print(' '.join(n for n in sys.argv[1:] if u.find_spec(n)))"
    proc = subprocess.run([str(py), "-c", code, *names], capture_output=True, text=True, env=env)
    if proc.returncode:
        raise BundleError(f"{py}: checking imports failed: {proc.stderr.strip()[-300:]}")
    return proc.stdout.split()


# The bundled modules that import with nothing from the image: imported under CPython 3.12 from the shipped wheels.
SELF_CONTAINED = ("xxhash", "lxml.etree", "charset_normalizer", "multiprocess", "dill", "antlr4", "sqlitedict",
                  "tabulate", "colorama", "portalocker", "urllib3")


def find_python(version: str) -> Path | None:
    """A working CPython `version` interpreter: python3.X on PATH, else pyenv's."""
    found = [shutil.which(f"python{version}"),
             *sorted(Path.home().glob(f".pyenv/versions/{version}.*/bin/python{version}"))]
    for py in filter(None, found):
        proc = subprocess.run([str(py), "-c", "import sys; print(sys.version_info[:2])"], capture_output=True,
                              text=True)
        if proc.returncode == 0 and proc.stdout.strip() == str(tuple(int(x) for x in version.split("."))):
            return Path(py)
    return None


def shipped_wheels_on_image_python(wheels: Path, work: Path, cache: Path) -> str:
    """Where a CPython 3.12 is at hand: the shipped wheels installed under it by pip --no-index --no-deps --target
    (as make gpu-site does; kept while the wheels are the same) and SELF_CONTAINED imported from them, the native
    xxhash, lxml, charset-normalizer and 3.12-only multiprocess among them. No CPU torch for 3.12 here (PyPI has
    CUDA builds only), so the cells run on the local Python's wheels. Returns a line saying what was shown."""
    py312 = find_python(PYTHON)
    if py312 is None:
        return f"no CPython {PYTHON} here: the shipped wheels are checked by their tags only"
    venv, site = cache / f"gpu-bundle-py{PYTHON.replace('.', '')}-venv", work / f"site{PYTHON.replace('.', '')}"
    if not (venv / "bin" / "python").is_file():
        _run([str(py312), "-m", "venv", str(venv)], f"creating a Python {PYTHON} venv")
    names = "\n".join(sorted(w.name for w in wheels.glob("*.whl")))
    if not ((site / ".wheels").is_file() and (site / ".wheels").read_text() == names):
        shutil.rmtree(site, ignore_errors=True)
        _run([str(venv / "bin" / "python"), "-m", "pip", "install", "--quiet", "--no-index", "--no-deps",
              "--target", str(site), *map(str, sorted(wheels.glob("*.whl")))], f"installing the bundle under {PYTHON}",
             env=os.environ | {"PIP_CONFIG_FILE": os.devnull, "PIP_NO_INDEX": "1"})
        (site / ".wheels").write_text(names)
    code = "import importlib, sys; [importlib.import_module(m) for m in sys.argv[1:]]"
    _run([str(venv / "bin" / "python"), "-S", "-c", code, *SELF_CONTAINED], f"importing the bundle under {PYTHON}",
         env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"} | {"PYTHONPATH": str(site)})
    return (f"the shipped {PYTHON} wheels install under {py312} (pip --no-index --target) and "
            f"{len(SELF_CONTAINED)} of their modules import there ({', '.join(SELF_CONTAINED[:4])}, ...)")


def unmet_requirements() -> list[str]:
    """Requirements of the installed BUNDLE distributions that this environment does not meet (LEFT_OUT aside):
    a missing distribution, or a version outside the range (e.g. an image's huggingface_hub older than datasets
    needs)."""
    from importlib import metadata

    lines = []
    for dist in BUNDLE:
        for req in map(Requirement, metadata.requires(dist) or []):
            name = canonicalize_name(req.name)
            if (req.marker is not None and not req.marker.evaluate({"extra": ""})) or name in map(canonicalize_name,
                                                                                                  LEFT_OUT):
                continue
            try:
                have = metadata.version(name)
            except metadata.PackageNotFoundError:
                lines.append(f"{dist} requires {req}; not installed")
                continue
            if not req.specifier.contains(have, prereleases=True):
                lines.append(f"{dist} requires {req}; this python has {name} {have}")
    return lines


def check(bundle: Path, repo: Path, torch_req: str, fresh: bool = False) -> str:
    """The proof: bundle verified, a clean venv like the image, the bundle absent from it, then installed by
    `make gpu-site` and the check run by `make gpu-check` (GPU_CHECK_CMD = PROOF_CMD) exactly as on the node,
    offline; the records must hold PROOF_STAGES and name the bundled versions. Returns the final line.

    The venv and the installed site are kept for the next proof while their spec and wheels are the same (as
    make gpu-site keeps .cache/gpu-site on the node; deleting ~20k files takes a minute on this disk); `fresh`
    starts both anew. A fresh clone (CI) always builds both."""
    t_start = time.perf_counter()
    m = verify(bundle, PYTHON)
    print(f"gpu-bundle-check: bundle {bundle}: {summary(m)}, sha256 checked", flush=True)
    cache = repo / ".cache"
    wheels = local_wheels(cache)
    if wheels != bundle / "wheels":
        print(f"gpu-bundle-check: Python {sys.version_info.major}.{sys.version_info.minor} here: installing the same "
              f"pins from {wheels} (the bundle ships {PYTHON})", flush=True)
    work = cache / "gpu-bundle-check"
    site, out = work / "site", work / "out"
    if fresh:
        for old in (cache / "gpu-image-venv", site, work / f"site{PYTHON.replace('.', '')}"):
            shutil.rmtree(old, ignore_errors=True)
    py = image_venv(cache / "gpu-image-venv", torch_req)
    venv_s = time.perf_counter() - t_start

    for old in (out, work / "cache"):  # a cell whose records exist would be skipped
        shutil.rmtree(old, ignore_errors=True)
    work.mkdir(parents=True, exist_ok=True)
    env = {k: v for k, v in os.environ.items()
           if k not in ("PYTHONPATH", "PIP_FIND_LINKS", "PIP_EXTRA_INDEX_URL", "PIP_INDEX_URL", "BENCH_DATA",
                        "MAKEFLAGS", "MFLAGS", "MAKELEVEL", "VIRTUAL_ENV")}
    env |= {"PYTHONNOUSERSITE": "1", "PIP_NO_INDEX": "1", "PIP_CONFIG_FILE": os.devnull, "HF_HUB_OFFLINE": "1",
            "HF_DATASETS_OFFLINE": "1", "BENCH_CACHE": str(work / "cache"), "PATH": f"{py.parent}:{env['PATH']}"}
    absent = [imp for _, imp, _ in BUNDLE.values()] + [imp for imp, _ in LEFT_OUT.values()]
    if found := importable(py, absent, env):
        raise BundleError(f"{py.parent.parent} is not like the image: it already has {', '.join(found)}")

    make = ["make", "--no-print-directory", "-C", str(repo), f"GPU_PY={py}", f"GPU_BUNDLE={bundle}",
            f"GPU_WHEELS={wheels}", f"GPU_SITE={site}", f"OUT={out}",
            f"GPU_CHECK_CMD={shlex.join(a.format(out=out) for a in PROOF_CMD)}"]
    t0 = time.perf_counter()
    shown = (f"Python {PYTHON} here: the cells run on the shipped wheels themselves" if wheels == bundle / "wheels"
             else shipped_wheels_on_image_python(bundle / "wheels", work, cache))
    print(f"gpu-bundle-check: {shown}", flush=True)
    py312_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    _run([*make, "gpu-site"], "make gpu-site (installing the bundle)", env, work / "gpu-site.log")
    install_s = time.perf_counter() - t0
    if warnings := [line for line in (work / "gpu-site.log").read_text().splitlines() if "gpu-site: warning" in line]:
        raise BundleError("the image's packages do not meet the bundle's requirements:\n    " + "\n    ".join(warnings))
    installed = sorted(canonicalize_name(p.name.split("-")[0]) for p in site.glob("*.dist-info"))
    if installed != sorted(canonicalize_name(d) for d in BUNDLE):
        raise BundleError(f"{site}: holds {', '.join(installed)}, not BUNDLE's distributions")
    did = "installed" if "gpu-site: installing" in (work / "gpu-site.log").read_text() else "kept (same wheels)"
    print(f"gpu-bundle-check: make gpu-site {did} {len(installed)} distributions in {install_s:.0f} s", flush=True)
    t0 = time.perf_counter()
    _run([*make, "gpu-check"], "make gpu-check", env, work / "gpu-check.log")
    cell_s = time.perf_counter() - t0

    rows = [json.loads(line) for p in sorted(out.rglob("records.jsonl")) for line in p.read_text().splitlines()]
    if missing := sorted(set(PROOF_STAGES) - {r["stage"] for r in rows}):
        raise BundleError(f"{out}: no records of stage {', '.join(missing)}; log {work / 'gpu-check.log'}")
    versions = {(k, r.get(k)) for r in rows for k in ("lm_eval", "datasets", "torch_pruning")}
    if versions != {("lm_eval", pins()["lm_eval"]), ("datasets", pins()["datasets"]),
                    ("torch_pruning", pins()["torch-pruning"])}:
        raise BundleError(f"{out}: the records name other versions than the bundle's: {sorted(versions)}")
    if {r.get("transformers", "")[:5] for r in rows} != {"5.17."}:
        raise BundleError(f"{out}: the records' transformers is not the image's 5.17")
    env_site = env | {"PYTHONPATH": f"{repo}:{site}"}
    if found := importable(py, [imp for imp, _ in LEFT_OUT.values()], env_site):
        raise BundleError(f"the installed bundle brings {', '.join(found)}, which LEFT_OUT says it leaves out")
    _run([str(py), "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_gpu_bundle.py", "-k",
          "check_wheels or verify"], "pytest from the bundle (make test-gpu)", env_site, work / "pytest.log", repo)
    print(f"gpu-bundle-check: pytest from the bundle (make test-gpu): "
          f"{(work / 'pytest.log').read_text().strip().splitlines()[-1]}")
    print(f"gpu-bundle-check: {len({r['method'] for r in rows})} cells, {len(rows)} records "
          f"(stages {', '.join(sorted({r['stage'] for r in rows}))}) in {out}; log {work / 'gpu-check.log'}")
    print(f"gpu-bundle-check: wall {time.perf_counter() - t_start:.0f} s: bundle, wheels and venv {venv_s:.0f} s, "
          f"{PYTHON} install {py312_s:.0f} s, install {install_s:.0f} s, cells {cell_s:.0f} s")
    n_wheels = len(check_wheels(bundle / "wheels", PYTHON))
    return f"gpu-bundle-check: ok (bundle {mib(m['total_bytes'])} MiB, {n_wheels} wheels, cell wall {cell_s:.0f} s)"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.benchmarks.gpu_bundle", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("build", help="write the bundle (make gpu-bundle)")
    b.add_argument("--out", type=Path, default=Path(".cache/gpu-bundle"))
    b.add_argument("--data", default=os.environ.get("BENCH_DATA", ""), help="the data root (env BENCH_DATA)")
    c = sub.add_parser("check", help="the proof in a clean venv like the image (make gpu-bundle-check)")
    c.add_argument("--bundle", type=Path, default=Path(".cache/gpu-bundle"))
    c.add_argument("--torch", default="torch==2.13.0", help="the local CPU torch to install first")
    c.add_argument("--fresh", action="store_true", help="a new venv and a new install (else kept while the same)")
    sub.add_parser("requirements", help="warn about bundled requirements this python does not meet (make gpu-site)")
    args = parser.parse_args(argv)
    try:
        if args.cmd == "build":
            if not args.data:
                raise BundleError("no data root: --data DIR or env BENCH_DATA (laid out as ../shared/data)")
            print(f"gpu-bundle: {summary(build(args.out.absolute(), Path(args.data)))}")
        elif args.cmd == "check":
            print(check(args.bundle.absolute(), Path(__file__).resolve().parents[2], args.torch, args.fresh))
        else:
            for line in unmet_requirements():
                print(f"gpu-site: warning: {line}", file=sys.stderr)
    except BundleError as e:
        print(f"gpu-bundle: error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
