"""The run config's schema: every typed key checked in about a second, before a model loads.

A bad value deep in a run fails late and obscurely (a reshape error inside attention for a batch size of 0, a
ValueError after the model loaded for a BOS mode). `validate(cfg)` checks the keys of conf/config.yaml and
conf/eval/*.yaml against `SCHEMA` (type, range, choices) plus the few checks that look outside the config (the
device, a local model path, a plan file), and raises one `BenchError` line naming the key and what it allows:

    ratio='abc': must be a number in (0, 1)
    eval.speed.batch_sizes=[0]: item 0: must be >= 1

A key absent from a composed config is skipped (sweep configs add keys); free-form parts are not checked
(`model.arch` is HF config kwargs, `method.*` is checked by the method classes).
"""

from __future__ import annotations

import json
import math
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path

from omegaconf import DictConfig, ListConfig, OmegaConf

from bench import BenchError
from bench.data import CALIB_DATASETS
from bench.evals import STAGES
from bench.evals.perplexity import METRIC as BOS_MODES
from bench.evals.speed import RUNTIMES
from bench.memory import REFERENCES
from bench.evals.zeroshot import TASKS
from bench.methods.base import PROTOCOLS
from bench.models import DTYPES
from bench.retrain import RETRAIN

PPL_DATASETS = ("wikitext2", "ptb")  # bench.data.text_rows
SOURCES = ("hub", "gguf", "random")  # bench.models.load_model
NOUNS = {int: "an integer", float: "a number", bool: "true or false", str: "a string"}


@dataclass(frozen=True)
class Rule:
    """What one key may hold: a value of `kind` within the bounds (gt/ge/lt/le) or one of `choices`; `null` also
    allows None, `also` extra literal values (zero-shot batch_size `auto`); `many` a list of such values
    (non-empty unless `empty`)."""

    kind: type = str
    choices: tuple = ()
    gt: float | None = None
    ge: float | None = None
    lt: float | None = None
    le: float | None = None
    null: bool = False
    also: tuple = ()
    many: bool = False
    empty: bool = False

    def bounds(self) -> str:
        """The range as text: '>= 1', '> 0', 'in (0, 1)', or '' when unbounded."""
        low, high = self.gt if self.gt is not None else self.ge, self.lt if self.lt is not None else self.le
        if low is not None and high is not None:
            return f"in {'(' if self.gt is not None else '['}{low:g}, {high:g}{')' if self.lt is not None else ']'}"
        if low is not None:
            return f"{'>' if self.gt is not None else '>='} {low:g}"
        if high is not None:
            return f"{'<' if self.lt is not None else '<='} {high:g}"
        return ""

    def typed(self, value) -> bool:
        if self.kind is float:
            return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
        if self.kind is int:
            return isinstance(value, int) and not isinstance(value, bool)
        return isinstance(value, self.kind)

    def in_bounds(self, value) -> bool:
        return ((self.gt is None or value > self.gt) and (self.ge is None or value >= self.ge)
                and (self.lt is None or value < self.lt) and (self.le is None or value <= self.le))

    def problem(self, value) -> str | None:
        """Why one (scalar) value is not allowed, or None when it is."""
        if (value is None and self.null) or value in self.also:
            return None
        extras = "".join(f" or {v!r}" for v in self.also) + (" or null" if self.null else "")
        if self.choices:
            return None if value in self.choices else f"allowed values are {', '.join(self.choices)}{extras}"
        if not self.typed(value):
            return f"must be {NOUNS[self.kind]}{' ' + self.bounds() if self.bounds() else ''}{extras}"
        return None if self.in_bounds(value) else f"must be {self.bounds()}{extras}"


def positive(null: bool = False, **kw) -> Rule:
    """An integer >= 1 (a count, a size)."""
    return Rule(int, ge=1, null=null, **kw)


SCHEMA: dict[str, Rule] = {
    "seed": Rule(int),
    "ratio": Rule(float, gt=0, lt=1),
    "dtype": Rule(choices=("auto", *DTYPES)),
    "reuse_base": Rule(bool),
    "shape_only": Rule(bool),
    "save_model": Rule(bool, also=("gguf",)),
    "retrain.name": Rule(choices=RETRAIN),
    "retrain.tokens": positive(null=True),
    "retrain.params": Rule(choices=("full", "lora")),
    "retrain.seq_len": positive(),
    "retrain.micro_batch": positive(),
    "retrain.grad_accum": positive(),
    "retrain.lr": Rule(float, gt=0),
    "retrain.min_lr": Rule(float, ge=0),
    "retrain.warmup_frac": Rule(float, ge=0, le=1),
    "retrain.weight_decay": Rule(float, ge=0),
    "retrain.max_grad_norm": Rule(float, gt=0),
    "retrain.val_books": positive(),
    "retrain.val_sequences": positive(),
    "retrain.evals": positive(),
    "retrain.checkpoint_s": Rule(float, ge=0),
    "retrain.autocast": Rule(choices=("auto", "bf16", "none")),
    "retrain.kd.temperature": Rule(float, gt=0),
    "retrain.kd.hidden_weight": Rule(float, ge=0),
    "protocol": Rule(choices=PROTOCOLS),
    "calibration": Rule(choices=("auto", "native", "shared")),
    "shared_calib.dataset": Rule(choices=CALIB_DATASETS),
    "shared_calib.n_samples": positive(),
    "shared_calib.seq_len": positive(),
    "shared_calib.seed": Rule(int),
    "lock.on_busy": Rule(choices=("skip", "wait")),
    "lock.stale_s": Rule(float, gt=0),
    "lock.refresh_s": Rule(float, gt=0),
    "model.name": Rule(str),
    "model.source": Rule(choices=SOURCES),
    "model.init": Rule(choices=("cpu", "device")),
    "lora.r": positive(),
    "lora.alpha": Rule(float, gt=0),
    "lora.dropout": Rule(float, ge=0, lt=1),
    "lora.target_modules": Rule(str, many=True),
    "lora.lr": Rule(float, gt=0),
    "lora.epochs": Rule(float, gt=0),
    "lora.max_steps": positive(null=True),
    "lora.micro_batch": positive(),
    "lora.grad_accum": positive(),
    "lora.warmup_steps": Rule(int, ge=0),
    "lora.cutoff_len": positive(),
    "lora.val_size": Rule(int, ge=0),
    "lora.eval_steps": Rule(int, ge=0, null=True),
    "lora.save_steps": positive(),
    "lora.n_records": positive(null=True),
    "eval.stages": Rule(choices=tuple(STAGES), many=True, empty=True),
    "eval.ppl.datasets": Rule(choices=PPL_DATASETS, many=True),
    "eval.ppl.bos_modes": Rule(choices=tuple(BOS_MODES), many=True),
    "eval.ppl.seq_len": positive(),
    "eval.ppl.batch_size": positive(),
    "eval.ppl.max_windows": positive(null=True),
    "eval.zeroshot.tasks": Rule(choices=TASKS, many=True),
    "eval.zeroshot.limit": positive(null=True),
    "eval.zeroshot.batch_size": positive(also=("auto",)),
    "eval.zeroshot.backend": Rule(choices=("context_once", "hflm")),
    "eval.speed.runtimes": Rule(choices=RUNTIMES, many=True),
    "eval.speed.batch_sizes": positive(many=True),
    "eval.speed.compiled_batch_sizes": positive(many=True, null=True),
    "eval.speed.new_tokens": positive(many=True),
    "eval.speed.prompt": Rule(str),
    "eval.speed.prompt_tokens": positive(),
    "eval.speed.warmup": Rule(int, ge=0),
    "eval.speed.warmup_tokens": positive(),
    "eval.speed.repeats": positive(),
    "eval.speed.min_time_s": Rule(float, ge=0),
    "eval.speed.interleave_dense": Rule(bool),
    "eval.speed.reference": Rule(choices=REFERENCES),
}

ABSENT = object()


def lookup(cfg, key: str):
    """The resolved value at a dotted key (a list as a plain list), or ABSENT when the config lacks it."""
    node = cfg
    for part in key.split("."):
        if not isinstance(node, DictConfig) or part not in node:
            return ABSENT
        node = node[part]
    return OmegaConf.to_container(node, resolve=True) if isinstance(node, (DictConfig, ListConfig)) else node


def check(key: str, rule: Rule, value) -> None:
    """Raise a one-line BenchError when `value` breaks `rule`."""
    if not rule.many:
        why = rule.problem(value)
    elif value is None and rule.null:
        why = None
    elif not isinstance(value, list):
        why = f"must be a list; each item: {rule.problem(ABSENT)}"
    elif not value and not rule.empty:
        why = "must be a non-empty list"
    else:
        why = next((f"item {item!r}: {rule.problem(item)}" for item in value if rule.problem(item)), None)
    if why:
        raise BenchError(f"{key}={value!r}: {why}")


def check_device(device) -> None:
    """auto, cpu, cuda or cuda:N; cuda only where torch sees a GPU (else it fails after the model loaded)."""
    import torch

    n = torch.cuda.device_count() if torch.cuda.is_available() else 0
    allowed = ["auto", "cpu"] + (["cuda"] + [f"cuda:{i}" for i in range(n)] if n else [])
    if device in allowed:
        return
    if isinstance(device, str) and re.fullmatch(r"cuda(:\d+)?", device):
        raise BenchError(f"device={device!r}: {'no GPU with that index' if n else 'CUDA is not available here'}; "
                         f"allowed values are {', '.join(allowed)}")
    raise BenchError(f"device={device!r}: allowed values are {', '.join(allowed)}")


def check_model(mcfg, shape_only: bool) -> None:
    """A hub model needs a path; a local-looking one (/, ., ~) must be a directory (else transformers reports a
    malformed repo id). Random and shape-only models need `arch`."""
    source = mcfg.get("source", "hub")
    if source == "hub" and not shape_only:
        if OmegaConf.is_missing(mcfg, "path") or not mcfg.get("path"):
            raise BenchError("model.path is missing: model.source=hub needs model.path=<hub id or local directory>")
        path = mcfg.path
        if not isinstance(path, str):
            raise BenchError(f"model.path={path!r}: must be a hub id (org/name) or a local directory")
        if path.startswith(("/", ".", "~")) and not Path(path).expanduser().is_dir():
            raise BenchError(f"model.path={path!r}: no such directory; allowed values are an existing local "
                             f"directory or a hub id (org/name)")
    if (source == "random" or shape_only) and not mcfg.get("arch"):
        raise BenchError(f"model.arch is empty: {'shape_only=true' if shape_only else 'model.source=random'} "
                         f"builds the model from it (HF config kwargs)")


def check_plan_file(plan_file) -> None:
    """An existing JSON file holding an object with a "kind" key (a plan.json of an earlier run)."""
    path = Path(str(plan_file)).expanduser()
    if not path.is_file():
        raise BenchError(f"plan_file={plan_file!r}: no such file; allowed values are null or a plan.json of an "
                         f"earlier run")
    try:
        plan = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise BenchError(f"plan_file={plan_file!r}: not valid JSON ({e}); allowed values are null or a plan.json "
                         f"of an earlier run") from None
    if not isinstance(plan, dict) or "kind" not in plan:
        raise BenchError(f"plan_file={plan_file!r}: no \"kind\" key, not a plan.json; allowed values are null or a "
                         f"plan.json of an earlier run")


def check_out_dir(out_dir) -> None:
    """out_dir must be a directory this process can create and write (Hydra's run directory and every cell go
    below it), so an unwritable one (`/proc/bench-out`, a read-only mount) fails in one line, not in Hydra's
    traceback. Tried for real (created, a file made in it), then the folders this check made are removed again."""
    path = Path(str(out_dir)).expanduser().absolute()
    made = [p for p in (path, *path.parents) if not p.exists()]
    try:
        path.mkdir(parents=True, exist_ok=True)
        tempfile.NamedTemporaryFile(dir=path, prefix=".bench-write-probe-").close()
    except OSError as e:
        raise BenchError(f"out_dir={str(out_dir)!r}: cannot create or write it ({e.strerror or e}); allowed "
                         f"values are a directory this process can create and write") from None
    finally:
        for folder in made:  # deepest first
            try:
                folder.rmdir()
            except OSError:
                pass


def validate(cfg) -> None:
    """Check every typed key of a run config; raise a one-line BenchError for the first bad one. Reads no
    weights and no data: about a second, so a bad input fails before any work."""
    for key, rule in SCHEMA.items():
        value = lookup(cfg, key)
        if value is not ABSENT:
            check(key, rule, value)
    if lookup(cfg, "device") is not ABSENT:
        check_device(cfg.device)
    if isinstance(cfg.get("model"), DictConfig):
        check_model(cfg.model, bool(cfg.get("shape_only")))
    if cfg.get("plan_file"):  # null or empty: no plan file (bench.runner.prune)
        check_plan_file(cfg.plan_file)
    lock = cfg.get("lock")
    if isinstance(lock, DictConfig) and lock.get("refresh_s", 0) >= lock.get("stale_s", math.inf):
        raise BenchError(f"lock.refresh_s={lock.refresh_s!r}: must be below lock.stale_s={lock.stale_s!r} (a live "
                         f"owner refreshes its lock well before others may take it over)")
    data = lookup(cfg, "retrain.data")
    if data is not ABSENT and not (data == "corpus" or (isinstance(data, str) and re.fullmatch(r"hub:[^:\s]+(:\S+)?",
                                                                                              data))):
        raise BenchError(f"retrain.data={data!r}: allowed values are corpus or hub:<dataset>[:<config>]")
    if isinstance(cfg.get("out_dir"), str):
        check_out_dir(cfg.out_dir)
