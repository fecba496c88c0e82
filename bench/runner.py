"""One cell, start to finish: load -> budget -> calibrate -> score (cached) -> plan -> prune -> retrain (optional)
-> evaluate -> record.

    python -m bench model=smollm2-135m method=depth_taylor ratio=0.2
    python -m bench model=llama-7b shape_only=true method=depth_ppl eval.stages=[speed]    # no download

The base model is loaded once per process and each pruning cell prunes a copy, so a multirun reads it from disk
once; the untouched base is also the dense reference the speed stage interleaves with. On a GPU the base waits in
host memory and a cell copies it onto the accelerator, so one copy of the weights is there while the cell scores,
prunes and evaluates quality; the speed stage's reference is resident, parked on the host or measured before
pruning, as memory allows (bench/memory.py, `eval.speed.reference`). Every stage records its peak accelerator
memory and host RSS (rows with stage `memory`). A plan can come from a
saved plan.json (`plan_file=`) instead of scoring; in shape-only mode (random weights built from the
architecture) a method without a plan file uses its structural plan (units chosen by index), and only the speed
stage may run.

Writes to <out_dir>/<model>/<method>/r<ratio>/ (dense: r0):
    config.yaml    the resolved config
    calib.pt       calibration token ids, LongTensor [n, seq_len] (to re-check the scores)
    scores.csv     per-unit scores (depth: columns block, score; lower = less important)
    plan.json      the decision (depth: removed and kept block indices)
    retrain.json   with retrain=lora: the loss curve, the selected step, the data source
    partial.jsonl  while the cell evaluates: its finished units (a corpus, a task, the speed stage), so a rerun
                   after a kill redoes only the unit that was running (bench.records.Progress); removed at the end
    partial_units/ while a zero-shot task runs: lm-eval's cache of the requests it answered, so a killed task
                   resumes where it stopped; removed with the unit
    records.jsonl  one row per stage x task x metric, with provenance; its presence marks the cell done
    cell.lock      while a process computes the cell: its owner (bench.lock); another process skips the cell
    error.json     only after a failure: the error, its traceback and the rows measured before it
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import io
import json
import logging
import math
import os
import platform
import time
import traceback
from pathlib import Path

import torch
from omegaconf import OmegaConf

import bench
from bench import BenchError
from bench import plans
from bench.budget import achieved, resolve_budget
from bench.data import calibration_ids
from bench.evals import STAGES
from bench.evals import speed
from bench.evals.cost import cost_notice
from bench.lock import CellLock
from bench.memory import StagePeak, device_copy, host_available_bytes, predicted_speed_bytes, speed_reference, \
    weight_bytes
from bench.methods import build_method
from bench.methods.base import CalibSpec
from bench.plans import Plan
from bench.models import DTYPES, count_params, load_model, resolve_device, weight_sums
from bench.distill import CHECKPOINT, agree
from bench.records import (ERROR, PARTIAL, RECORDS, Progress, fingerprint, is_writer, write_atomic, write_json,
                           write_records)
from bench.retrain import RETRAIN, retrain
from bench.surgery import save_pruned
from bench.schema import validate

log = logging.getLogger("bench.run")


def cell_dir(cfg, label: str, ratio: float) -> Path:
    return Path(cfg.out_dir) / cfg.model.name / label / f"r{ratio:g}"


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.machine()


def provenance(cfg, device: torch.device, dtype: torch.dtype) -> dict:
    """What every record carries besides its measurement: where and how it ran, the sweep and the eval preset it
    started from (a sweep's overrides keep the preset's name; the effective windows, examples and batch sizes
    are in the rows themselves), and the versions of every package that shapes a number (None: not installed)."""
    from importlib import metadata

    import transformers

    def version(dist: str) -> str | None:
        try:
            return metadata.version(dist)
        except metadata.PackageNotFoundError:
            return None

    return {"seed": int(cfg.seed), "device": str(device), "device_name": device_name(device),
            "threads": torch.get_num_threads(), "dtype": str(dtype).removeprefix("torch."),
            "host": platform.node(), "pid": os.getpid(), "sweep": cfg.get("sweep_name"),
            "eval_preset": cfg.eval.get("preset"),
            "torch": torch.__version__, "transformers": transformers.__version__,
            "lm_eval": version("lm_eval"), "datasets": version("datasets"), "peft": version("peft"),
            "torch_pruning": version("torch-pruning"), "bench": bench.__version__,
            "python": platform.python_version()}


def cached_scores(cfg, method, model, calib_ids, budget) -> tuple[list[float], bool]:
    """Scores from the on-disk cache keyed by (model, dtype, criterion, calibration tokens), else computed and
    stored. Returns (scores, hit)."""
    key = {"model": OmegaConf.to_container(cfg.model, resolve=True),
           "dtype": str(model.dtype), "device": model.device.type, "method": method.score_key(budget, model)}
    h = hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode())
    if calib_ids is not None:
        h.update(calib_ids.numpy().tobytes())
    fmt = getattr(method, "scores_format", "json")  # "pt": scores holding tensors (SliceGPT's bases)
    path = Path(cfg.cache_dir) / "scores" / cfg.model.name / f"{h.hexdigest()[:20]}.{fmt}"
    stored = read_cached_scores(path, fmt) if path.exists() else None
    if stored is not None:
        return stored, True
    scores = method.score(model, calib_ids, budget)
    if fmt == "pt":
        buf = io.BytesIO()
        torch.save({"key": key, "scores": scores}, buf)
        write_atomic(path, buf.getvalue())
    else:
        write_json(path, {"key": key, "scores": scores})
    return scores, False


def read_cached_scores(path: Path, fmt: str):
    """The scores stored at `path`, or None, with one warning line, when the file is truncated or garbled (a
    copy cut short, a disk error): the caller recomputes and rewrites it, never uses it."""
    try:
        stored = torch.load(path, weights_only=True) if fmt == "pt" else json.loads(path.read_text())
        return stored["scores"]
    except Exception as e:  # noqa: BLE001 (pickle, zip, JSON, key and decode errors alike)
        first = (str(e).strip().splitlines() or [""])[0][:200]
        log.warning("score cache %s is damaged (%s: %s): recomputing it", path, type(e).__name__, first)
        return None


_BASE: dict[str, tuple] = {}
QUALITY_FREE_STAGES = ("speed",)  # the stages that mean something on random weights


def run_dtype(cfg) -> str:
    """The dtype the cell evaluates in: `dtype=auto` is bf16 on CUDA under protocol=matched, and fp16 under
    protocol=native, as the originals load, evaluate and time their models (shortened-llm src/utils.py
    `set_model_device_evalmode`: .half() on cuda); fp32 on a CPU either way."""
    if cfg.dtype == "auto" and cfg.get("protocol") == "native" and resolve_device(cfg.device).type == "cuda":
        return "float16"
    return cfg.dtype


def base_model(cfg):
    """(model, tokenizer) of the cell's base model, loaded once per process (the latest one is kept;
    `reuse_base=false` reloads it for every cell). On a CUDA device the base is parked in host memory when the
    host can hold it (the cells take copies onto the accelerator: `device_copy`); else it stays on the device."""
    dtype = run_dtype(cfg)
    key = json.dumps([OmegaConf.to_container(cfg.model, resolve=True), cfg.device, dtype,
                      bool(cfg.get("shape_only"))], sort_keys=True, default=str)
    if key not in _BASE or not cfg.get("reuse_base", True):
        _BASE.clear()
        model, tokenizer = load_model(cfg.model, cfg.cache_dir, cfg.device, dtype, bool(cfg.get("shape_only")))
        if model.device.type == "cuda" and (host_available_bytes() or 0) > 1.2 * weight_bytes(model):
            model.to("cpu")
            torch.cuda.empty_cache()
            log.info("base model parked in host memory (%.0f MiB); each cell copies it to %s",
                     weight_bytes(model) / 2**20, cfg.device)
        _BASE[key] = (model, tokenizer)
    return _BASE[key]


_DENSE_SPEED: dict[str, dict] = {}  # speed.reference=reload: the dense model's latencies, once per process


def dense_reference(cfg, method, base, model, tokenizer, device: torch.device,
                    mem: list) -> "speed.Reference | None":
    """The speed stage's dense reference for a pruning cell, decided before it prunes (bench.memory). For
    `reload` the dense model (the cell's copy, not yet pruned) is measured now, once per process and speed
    config, its peak memory recorded as the `speed_reference` stage."""
    scfg = cfg.eval.speed
    if not method.prunes or "speed" not in cfg.eval.stages or not scfg.interleave_dense:
        return None
    parked = base is not model and next(base.parameters()).device.type == "cpu" and device.type == "cuda"
    mode = speed_reference(scfg.get("reference", "auto"), device, weight_bytes(base),
                           predicted_speed_bytes(model, scfg), parked)
    log.info("speed reference: %s", mode)
    if mode == "resident":
        return speed.Reference(mode, model=lambda: base if next(base.parameters()).device == device
                               else device_copy(base, device))
    if mode == "cpu":
        return speed.Reference(mode, model=lambda: base)
    key = fingerprint(OmegaConf.to_container(cfg.model, resolve=True), str(device), run_dtype(cfg),
                      OmegaConf.to_container(scfg, resolve=True), int(cfg.seed), bool(cfg.get("shape_only")))
    if key not in _DENSE_SPEED:
        with StagePeak(device) as peak:
            _DENSE_SPEED[key] = speed.reference_latencies(model, tokenizer, cfg)
        mem += peak.rows("speed_reference")
    return speed.Reference(mode, prior=_DENSE_SPEED[key])


def saved_plan(plan_file, method, budget, structure_only: bool = False) -> Plan:
    """A plan.json of an earlier run (`plan_file=`), read as its own kind (bench.plans) and checked against this
    cell's method and model. A SliceGPT plan.json keeps only the hashes of its bases, so it serves only callers
    that need the structure (shape-only runs, the speed benchmark): identity bases, the same shapes."""
    path = Path(plan_file)
    if not path.is_file():
        raise BenchError(f"plan_file={plan_file}: no such file")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise BenchError(f"plan_file={plan_file}: not valid JSON ({e}); allowed: a plan.json a cell wrote") from e
    check_plan_kind(plan_file, data, method)
    plan = plans.from_json(data)
    if plan.kind == "slice" and plan.rotations is None and not structure_only:
        raise BenchError(f"plan_file={plan_file}: a SliceGPT plan.json holds only the hashes of its bases; "
                         f"allowed with shape_only=true, else run without plan_file")
    if plan.kind == "depth" and plan.n_layers != budget.n_blocks:
        raise BenchError(f"plan_file={plan_file}: made for {plan.n_layers} blocks, the model has "
                         f"{budget.n_blocks}")
    return plan


def check_plan_kind(plan_file, data, method) -> None:
    """The plan's kind must be the method's: a width plan given to a depth method is named as such, before its
    fields are read (and before the model loads, from `cell`)."""
    kind = data.get("kind") if isinstance(data, dict) else None
    if kind != method.kind:
        raise BenchError(f"plan_file={plan_file}: a {kind} plan, but method={method.label} needs a {method.kind} "
                         f"plan")


def prune(cfg, method, model, tokenizer, budget, out: Path, timing: dict, mem: list) -> tuple[Plan, dict]:
    """Calibrate, score (cached), plan and apply; writes calib.pt and scores.csv. Returns the plan and the facts
    of how it was made, for the records (calibration, its source, whether the scores came from the cache, the
    plan file). With a plan file or in shape-only mode there is nothing to score. The peak memory of scoring
    (calibration included) and of surgery go to `mem` (stages score and prune)."""
    if cfg.get("plan_file") or cfg.get("shape_only"):
        plan = (saved_plan(cfg.plan_file, method, budget, structure_only=bool(cfg.get("shape_only")))
                if cfg.get("plan_file") else method.plan(None, budget, model))
        return _apply(method, model, plan, timing, mem), {"plan_file": cfg.get("plan_file"),
                                                           "calibration": "plan_file" if cfg.get("plan_file")
                                                           else "none"}
    calib = calib_spec(cfg, method)
    eval_dtype = model.dtype
    score_dtype = DTYPES[method.native_score_dtype] if native(cfg) and getattr(method, "native_score_dtype",
                                                                                   None) else eval_dtype
    with StagePeak(model.device) as peak:
        calib_ids, calib_source = calibrate(cfg, calib, tokenizer, out)
        model.to(score_dtype)  # the original's precision for scoring and surgery (LLM-Pruner, Taylor+: fp32)
        t0 = time.perf_counter()
        scores, hit = cached_scores(cfg, method, model, calib_ids, budget)
        timing["score_s"] = time.perf_counter() - t0
    mem += peak.rows("score", scores_cached=hit)
    log.info("scores %s in %.1f s", "from cache" if hit else "computed", timing["score_s"])
    write_atomic(out / "scores.csv", scores_csv(scores))
    facts = {"plan_file": None, "calibration": calibration_kind(cfg) if calib else "none", "scores_cached": hit,
             "score_dtype": str(score_dtype).removeprefix("torch.")}
    if calib:
        facts |= {f"calib_{k}": v for k, v in vars(calib).items()} | {"calib_source": calib_source}
    plan = _apply(method, model, method.plan(scores, budget, model), timing, mem)
    model.to(eval_dtype)
    return plan, facts


def calibrate(cfg, calib: CalibSpec | None, tokenizer, out: Path) -> tuple[torch.Tensor | None, str | None]:
    """The calibration token ids of `calib` (None: the method needs none) and their source; writes calib.pt."""
    if calib is None:
        return None, None
    calib_ids, calib_source = calibration_ids(tokenizer, calib.dataset, calib.n_samples, calib.seq_len,
                                              calib.seed, cfg.get("data_root") or None, sampler=calib.sampler,
                                              bos_every=calib.bos_every)
    buf = io.BytesIO()
    torch.save(calib_ids, buf)
    write_atomic(out / "calib.pt", buf.getvalue())
    return calib_ids, calib_source


def native(cfg) -> bool:
    return cfg.get("protocol") == "native"


def _apply(method, model, plan: Plan, timing: dict, mem: list) -> Plan:
    t0 = time.perf_counter()
    with StagePeak(model.device) as peak:
        method.apply(model, plan)
    mem += peak.rows("prune")
    timing["prune_s"] = time.perf_counter() - t0
    params = count_params(model)
    if params != plan.predicted_params:
        raise RuntimeError(f"surgery left {params} params, the plan predicts {plan.predicted_params}")
    return plan


def calibration_kind(cfg) -> str:
    """native | shared: `calibration=auto` follows the protocol (matched: the one shared set; native: each
    method's own)."""
    if cfg.calibration == "auto":
        return "native" if cfg.get("protocol") == "native" else "shared"
    return cfg.calibration


def calib_spec(cfg, method) -> CalibSpec | None:
    """The method's own calibration (its paper's), or the one set every method gets (`shared_calib`). A model
    that needs a BOS on every window (Gemma: `model.ppl_bos_every`) gets one in calibration too, as the official
    Gemma scripts do (--add_bos_to_every)."""
    if not method.needs_calib:
        return None
    spec = method.calib if calibration_kind(cfg) == "native" else CalibSpec(**cfg.shared_calib)
    if cfg.model.get("ppl_bos_every") and not spec.bos_every:
        spec = dataclasses.replace(spec, bos_every=True)
    return spec


def scores_csv(scores) -> str:
    """Depth: one row per block (block, score). Width: one row per unit (layer, unit = q | kv | channel, index,
    score). SliceGPT: one row per principal direction (site, index, eigenvalue)."""
    if isinstance(scores, list):
        return "block,score\n" + "".join(f"{i},{s!r}\n" for i, s in enumerate(scores))
    if "eigenvalues" in scores:
        return "site,index,eigenvalue\n" + "".join(f"{site},{i},{v!r}\n" for site, values in
                                                    scores["eigenvalues"].items() for i, v in enumerate(values))
    rows = ["layer,unit,index,score\n"]
    for unit in ("q", "kv", "channel"):
        for layer, values in enumerate(scores[unit]):
            rows += [f"{layer},{unit},{i},{s!r}\n" for i, s in enumerate(values)]
    return "".join(rows)


def cell(cfg):
    """(method, ratio, cell directory) of a config, after checking what can be checked without a model."""
    validate(cfg)
    method = build_method(cfg.method, cfg.get("protocol", "matched"))
    unknown = [stage for stage in cfg.eval.stages if stage not in STAGES]
    if unknown:
        raise BenchError(f"eval.stages: {unknown[0]!r} is not a stage; allowed values are {', '.join(STAGES)}")
    quality = [stage for stage in cfg.eval.stages if stage not in QUALITY_FREE_STAGES]
    if cfg.get("shape_only") and quality:
        raise BenchError(f"eval.stages: {quality[0]!r} needs real weights, but shape_only=true builds random ones; "
                         f"allowed values with shape_only are {', '.join(QUALITY_FREE_STAGES)}")
    if cfg.get("plan_file") and not method.prunes:
        raise BenchError(f"plan_file is set but method={method.label} does not prune; allowed: a depth or width "
                         f"method")
    if cfg.get("plan_file"):  # validate() checked it is a JSON object with a kind
        check_plan_kind(cfg.plan_file, json.loads(Path(cfg.plan_file).expanduser().read_text()), method)
    if cfg.retrain.name not in RETRAIN:
        raise BenchError(f"retrain={cfg.retrain.name!r}: allowed values are {', '.join(RETRAIN)}")
    if cfg.get("shape_only") and cfg.retrain.name != "none":
        raise BenchError(f"retrain={cfg.retrain.name} needs real weights, but shape_only=true builds random ones; "
                         f"allowed values with shape_only are none")
    if cfg.retrain.name == "kd" and not method.prunes:
        raise BenchError(f"retrain=kd distills the pruned model from the unpruned one, but method={method.label} "
                         f"prunes nothing; allowed: a depth or width method, or retrain=cpt")
    ratio = float(cfg.ratio) if method.prunes else 0.0
    return method, ratio, cell_dir(cfg, row_label(cfg, method), ratio)


def row_label(cfg, method) -> str:
    """The method's row label, with a suffix for retrained models (depth_ppl+ -> depth_ppl++lora)."""
    return method.label + ("" if cfg.retrain.name == "none" else f"+{cfg.retrain.name}")


class CellBusy(Exception):
    """Another live process holds the cell's lock (bench.lock): this one skipped it."""


def run_cell(cfg) -> Path:
    """Run one cell (`compute_cell`); returns the cell directory."""
    return compute_cell(cfg)[0]


def compute_cell(cfg) -> tuple[Path, str]:
    """Run one cell; skip it if its records already exist. Returns the cell directory and what happened to the
    cell: `ran`, or `skipped` (its records were there, or were written meanwhile by the process holding its lock).

    The cell is computed under its lock (bench.lock, `lock.*` in conf/config.yaml): a cell that another live
    process is computing is skipped with one log line and `CellBusy` (or waited for, `lock.on_busy=wait`), so two
    sweeps into one out_dir compute every cell once. A failure leaves error.json (type, message, traceback, any rows
    already measured) and re-raises; a later success removes it. A failed write (a full disk) raises an OSError
    naming the file (bench.records.write_atomic) and leaves no partial file; the next run finishes the cell from its
    finished units."""
    method, ratio, out = cell(cfg)
    lk = cfg.get("lock") or {}
    if (out / RECORDS).exists():
        log.info("%s: done, skipping", out)
        if is_writer() and CellLock(out, lk.get("stale_s", 600)).abandoned():  # killed between records and cleanup
            Progress(out / PARTIAL).finish()
        return out, "skipped"
    # under torchrun rank 0 alone takes the lock, and every rank follows its decision
    lock = CellLock(out, lk.get("stale_s", 600), lk.get("refresh_s", 30)) if is_writer() else None
    with lock or contextlib.nullcontext():
        if lock is not None and lock.busy is not None and lk.get("on_busy", "skip") == "wait":
            log.info("cell %s is being computed by %s: waiting", out, lock.busy.describe())
            lock.wait_for(poll_s=min(5.0, float(lk.get("refresh_s", 30))))
        busy = agree(lock.busy.describe() if lock is not None and lock.busy is not None else None)
        if busy is not None:
            log.info("cell %s is being computed by %s: skipped", out, busy)
            raise CellBusy(f"cell {out} is being computed by {busy}")
        if agree((out / RECORDS).exists()):  # finished by the process that held the lock
            log.info("%s: done by another process, skipping", out)
            return out, "skipped"
        partial: list[dict] = []
        memory: list[dict] = []
        try:
            _run(cfg, method, ratio, out, partial, memory)
        except Exception as exc:  # an out-of-memory failure keeps the peaks of the stages before it
            try:
                write_json(out / ERROR, {"error": type(exc).__name__, "message": str(exc),
                                         "traceback": traceback.format_exc(), "rows": partial, "memory": memory})
            except OSError as e:  # the disk that failed the cell may fail this too: the cell's error wins
                log.warning("could not write %s: %s", out / ERROR, e.strerror or e)
            raise
        (out / ERROR).unlink(missing_ok=True)
    return out, "ran"


def not_finite_ppl(row: dict) -> bool:
    return row["stage"] == "ppl" and not math.isfinite(row["value"])


def _run(cfg, method, ratio: float, out: Path, rows: list[dict], mem: list[dict]) -> None:
    """The cell; `rows` and `mem` (each stage's memory rows, bench.memory) fill as it goes, for error.json."""
    torch.manual_seed(int(cfg.seed))
    t_cell = time.perf_counter()
    device = resolve_device(cfg.device)
    retrains = cfg.retrain.name != "none"
    with StagePeak(device) as peak:
        base, tokenizer = base_model(cfg)
        # the cell's own copy on the device (the shared base is never changed): one copy of the weights there
        copies = method.prunes or retrains or next(base.parameters()).device != device
        model = device_copy(base, device) if copies else base
    mem += peak.rows("load")
    dense_params = count_params(model)
    notice = cost_notice(cfg, dense_params, model.device)
    if notice:  # a full evaluation on a CPU is hours: say so before it starts
        log.warning("%s", notice)
    budget = resolve_budget(model, ratio) if method.prunes else None
    if budget:  # before any scoring: an unknown layout or an impossible budget fails in a second, not after an hour
        method.check(budget, model)
    out.mkdir(parents=True, exist_ok=True)
    write_atomic(out / "config.yaml", OmegaConf.to_yaml(cfg, resolve=True))

    timing, facts = {}, {}
    dense = dense_reference(cfg, method, base, model, tokenizer, device, mem)  # the speed stage's, before any pruning
    if method.prunes:
        plan, facts = prune(cfg, method, model, tokenizer, budget, out, timing, mem)
    else:
        plan = method.plan(None, None)
    if retrains:
        t0 = time.perf_counter()
        with StagePeak(device) as peak:
            teacher = None if cfg.retrain.name not in ("kd", "cpt") else (
                base if next(base.parameters()).device == device else device_copy(base, device))
            model, summary = retrain(model, tokenizer, cfg, teacher=teacher, plan=plan, out=out)
            del teacher
        mem += peak.rows("retrain")
        timing["retrain_s"] = time.perf_counter() - t0
        write_json(out / "retrain.json", summary)
        if not is_writer():  # torchrun: the other ranks helped retrain; rank 0 alone evaluates and writes
            log.info("rank %s: retraining done; rank 0 evaluates and writes the cell", os.environ.get("RANK"))
            return
    params = count_params(model)
    write_json(out / "plan.json", plan.to_json())
    log.info("%s: %d -> %d params", method.label, dense_params, params)
    if cfg.get("save_model") == "gguf":  # llama.cpp's format, f16 (bench.export: other quants, the round trip)
        from bench.export import export_gguf, tokenizer_source

        t0 = time.perf_counter()
        lay = export_gguf(model, out / "model.f16.gguf", "f16", name=f"{cfg.model.name} {method.label} r{ratio:g}",
                          **tokenizer_source(cfg.model, cfg.cache_dir, tokenizer))
        log.info("%s: exported %s (llama.cpp arch %s) in %.1f s", method.label, out / "model.f16.gguf", lay.arch,
                 time.perf_counter() - t0)
    elif cfg.get("save_model"):
        t0 = time.perf_counter()
        save_pruned(model, tokenizer, plan, out / "model")
        log.info("%s: saved the pruned model to %s in %.1f s", method.label, out / "model", time.perf_counter() - t0)

    ident = {"model": cfg.model.name, "method": row_label(cfg, method), "kind": plan.kind, "ratio": ratio,
             "retrain": cfg.retrain.name, "retrain_tokens": summary.get("tokens_trained") if retrains else None,
             "params": params,
             "dense_params": dense_params, "mode": "shape_only" if cfg.get("shape_only") else "weights"}
    if budget:
        ident |= achieved(budget, params) | {"target_params": plan.target_params,
                                             "budget_matched": plan.budget_matched}
    else:
        ident |= {"removed_frac_block_params": 0.0, "removed_frac_total_params": 0.0}
    protocol = cfg.get("protocol", "matched")
    ident |= facts | {"protocol": protocol,
                      "departures": method.departures() if protocol == "native" and method.prunes else []}
    prov = provenance(cfg, model.device, model.dtype) | timing
    model_key = fingerprint(OmegaConf.to_container(cfg.model, resolve=True), cfg.device, run_dtype(cfg), cfg.seed,
                            bool(cfg.get("shape_only")), weight_sums(model))  # the weights stand for plan and retrain
    progress = Progress(out / PARTIAL, model_key)
    if progress.units:  # a resumed cell says so at once (a requeued SLURM task's log), not only when it ends
        log.info("%s: resuming an interrupted run: %d units in %s (%s); those measured with these weights and "
                 "settings are reused", out, len(progress.units), PARTIAL, ", ".join(progress.units))
    for stage in cfg.eval.stages:
        reused, mark = len(progress.reused), len(progress.done)
        with StagePeak(device) as peak:
            try:
                stage_rows = STAGES[stage](model, tokenizer, cfg, dense=dense, progress=progress)
            except Exception:  # error.json keeps the units this stage finished (SIGTERM may come right after one)
                rows += [ident | row | prov for row in progress.rows_since(mark)]
                raise
            rows += [ident | row | prov for row in stage_rows]
        mem += peak.rows(stage, resumed=len(progress.reused) > reused)
        bad = [r for r in rows if not_finite_ppl(r)]
        if bad:
            progress.drop(not_finite_ppl)  # a failure, not a finished unit: the rerun measures it again
            raise BenchError(f"{method.label} at ratio {ratio:g}: perplexity on {bad[0]['task']} is {bad[0]['value']}")
    if progress.reused:
        log.info("%s: reused %d finished units of an interrupted run (%s)", out, len(progress.reused),
                 ", ".join(progress.reused))
    write_records(out / RECORDS, rows + [ident | row | prov for row in mem])
    progress.finish()
    (out / CHECKPOINT).unlink(missing_ok=True)  # the retraining's last checkpoint: the cell is done
    log.info("%s: %d records in %.1f s", out, len(rows), time.perf_counter() - t_cell)
