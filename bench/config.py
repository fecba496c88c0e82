"""Config: compose conf/ outside a Hydra app (budget CLI, tests) and check group choices up front.

Hydra reports an unknown choice (`model=foo`) over many lines; `check_choices` turns it into one line naming
the key and the allowed values before Hydra starts.
"""

from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig

from bench import BenchError

CONF_DIR = Path(__file__).resolve().parents[1] / "conf"
GROUPS = ("model", "method", "eval")


def choices(group: str) -> list[str]:
    """The runnable options of a config group (files starting with `_` are fragments)."""
    return sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml") if not p.stem.startswith("_"))


def check_choices(overrides: list[str]) -> None:
    for arg in overrides:
        key, sep, values = arg.lstrip("+~").partition("=")
        if not sep or key not in GROUPS:
            continue
        for value in values.split(","):  # a multirun sweeps a comma-separated list
            if value not in choices(key):
                raise BenchError(f"{key}={value!r}: allowed values are {', '.join(choices(key))}")


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
