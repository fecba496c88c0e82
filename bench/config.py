"""Config: compose conf/ outside a Hydra app (budget CLI, tests) and check group choices up front.

Hydra reports an unknown choice (`model=foo`) over many lines; `check_choices` turns it into one line naming
the key and the allowed values before Hydra starts.
"""

from __future__ import annotations

import os
import platform
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from bench import BenchError

CONF_DIR = Path(__file__).resolve().parent / "conf"  # inside the package: a wheel carries the configs
GROUPS = ("model", "method", "eval", "retrain")


def launcher_id() -> str:
    """`<host>-<pid>` of the process that starts a run or sweep: the `${bench_launcher:}` in Hydra's run and sweep
    directories (conf/config.yaml), so that two sweeps started in the same second into one out_dir never share a
    sweep directory (their job folders, status.json and summary.json)."""
    return f"{platform.node()}-{os.getpid()}"


if not OmegaConf.has_resolver("bench_launcher"):
    OmegaConf.register_new_resolver("bench_launcher", launcher_id, use_cache=True)  # like `now`: a job's copy keeps it


def choices(group: str, extra_dirs: list[Path] = ()) -> list[str]:
    """The runnable options of a config group (files starting with `_` are fragments), in conf/ and in the
    user's own config directories (`hydra.searchpath`)."""
    return sorted({p.stem for root in (CONF_DIR, *extra_dirs) for p in (Path(root) / group).glob("*.yaml")
                   if not p.stem.startswith("_")})


def search_dirs(overrides: list[str]) -> list[Path]:
    """The local directories of a `hydra.searchpath=[file:///a,/b]` override: config directories of the user's
    own (a method defined outside the repo), searched after conf/."""
    dirs = []
    for arg in overrides:
        key, _, value = arg.lstrip("+").partition("=")
        if key == "hydra.searchpath":
            for item in value.strip("[]").split(","):
                item = item.strip().strip("'\"")
                if item and not item.startswith("pkg://"):
                    dirs.append(Path(item.removeprefix("file://")))
    return dirs


def check_choices(overrides: list[str]) -> None:
    extra = search_dirs(overrides)
    for arg in overrides:
        key, sep, values = arg.lstrip("+~").partition("=")
        if not sep or key not in GROUPS:
            continue
        allowed = choices(key, extra)
        for value in values.split(","):  # a multirun sweeps a comma-separated list
            if value not in allowed:
                raise BenchError(f"{key}={value!r}: allowed values are {', '.join(allowed)}")


def compose(overrides: list[str] | None = None) -> DictConfig:
    """The resolved run config for these overrides, as `python -m bench <overrides>` would see it."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    overrides = list(overrides or [])
    check_choices(overrides)
    GlobalHydra.instance().clear()
    with initialize_config_dir(version_base="1.3", config_dir=str(CONF_DIR)):
        return hydra_compose("config", overrides=overrides)
