"""Pruning methods: one explicit registry from `impl` names to classes.

A method config (conf/method/<name>.yaml) names its implementation (`impl`), its row label (`name`) and its
hyperparameters; `build_method` passes the hyperparameters to the class, so a typo is an error, not a no-op.
Adding a method = one module here with a class registered below + one YAML in conf/method/ (README).
"""

from __future__ import annotations

import dataclasses

from bench import BenchError
from bench.methods.base import Dense, Method
from bench.methods.depth import DepthPruner
from bench.methods.width import WidthPruner

METHODS: dict[str, type] = {
    "dense": Dense,
    "depth": DepthPruner,
    "width": WidthPruner,
}


def build_method(mcfg) -> Method:
    params = dict(mcfg)
    impl = params.pop("impl", None)
    if impl not in METHODS:
        raise BenchError(f"method.impl={impl!r}: allowed values are {', '.join(METHODS)}")
    cls = METHODS[impl]
    allowed = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(params) - allowed)
    if unknown:
        raise BenchError(f"method.{unknown[0]}: not a parameter of {impl}; allowed: {', '.join(sorted(allowed))}")
    return cls(**params)
