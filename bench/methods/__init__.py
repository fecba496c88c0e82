"""Pruning methods: one explicit registry from `impl` names to classes.

A method config (conf/method/<name>.yaml) names its implementation (`impl`), its row label (`name`) and its
hyperparameters; `build_method` passes the hyperparameters to the class, so a typo is an error, not a no-op.
Adding a method = one module with a class + one YAML in conf/method/ whose `impl` is `module:Class` (the worked
example: bench/methods/random_blocks.py, conf/method/depth_random.yaml; README).
"""

from __future__ import annotations

import dataclasses
import importlib

from bench import BenchError
from bench.methods.base import Dense, Method
from bench.methods.depth import DepthPruner
from bench.methods.slicegpt import SlicePruner
from bench.methods.width import WidthPruner

METHODS: dict[str, type] = {
    "dense": Dense,
    "depth": DepthPruner,
    "width": WidthPruner,
    "slicegpt": SlicePruner,
}


def resolve_impl(impl) -> type:
    """A registered short name, or `package.module:Class` for a method living anywhere on the path."""
    if isinstance(impl, str) and ":" in impl:
        module, _, name = impl.partition(":")
        try:
            return getattr(importlib.import_module(module), name)
        except (ImportError, AttributeError) as e:
            raise BenchError(f"method.impl={impl!r}: cannot import {name} from {module} ({e})") from e
    if impl not in METHODS:
        raise BenchError(f"method.impl={impl!r}: allowed values are {', '.join(METHODS)} or module:Class")
    return METHODS[impl]


def build_method(mcfg) -> Method:
    params = dict(mcfg)
    impl = params.pop("impl", None)
    cls = resolve_impl(impl)
    allowed = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(params) - allowed)
    if unknown:
        raise BenchError(f"method.{unknown[0]}: not a parameter of {impl}; allowed: {', '.join(sorted(allowed))}")
    return cls(**params)
