"""Pruning methods: one registry from `impl` names to classes (bench/methods/base.py says what a class declares).

A method config (conf/method/<name>.yaml) names its implementation (`impl`: a registered name, or
`package.module:Class` for a class living anywhere on the path), its row label (`name`) and its hyperparameters;
`build_method` passes the hyperparameters to the class, so a typo is an error, not a no-op.

    registered      family (module)
    dense           the unpruned reference (base)
    depth_ppl, depth_taylor, depth_magnitude, block_influence, angular, sleb     depth (depth)
    depth_random    the worked example of adding a method (random_blocks)
    llm_pruner, wanda_sp, flap, magnitude_width                                  width (width)
    slicegpt        SliceGPT (slicegpt)
"""

from __future__ import annotations

import dataclasses
import importlib

from bench import BenchError
from bench.methods import depth, random_blocks, slicegpt, width  # noqa: F401 (each module registers its classes)
from bench.methods.base import METHODS, Method


def resolve_impl(impl) -> type:
    """A registered name, or `package.module:Class` for a method living anywhere on the path."""
    if isinstance(impl, str) and ":" in impl:
        module, _, name = impl.partition(":")
        try:
            return getattr(importlib.import_module(module), name)
        except (ImportError, AttributeError) as e:
            raise BenchError(f"method.impl={impl!r}: cannot import {name} from {module} ({e})") from e
    if impl not in METHODS:
        raise BenchError(f"method.impl={impl!r}: allowed values are {', '.join(sorted(METHODS))} or module:Class")
    return METHODS[impl]


def build_method(mcfg, protocol: str = "matched") -> Method:
    """The method a config describes, under `protocol` (the run's top-level key, given to every class that has
    the field: a class of the user's without it runs as it is)."""
    params = dict(mcfg)
    impl = params.pop("impl", None)
    cls = resolve_impl(impl)
    allowed = {f.name for f in dataclasses.fields(cls)} - {"protocol"}
    unknown = sorted(set(params) - allowed)
    if unknown:
        raise BenchError(f"method.{unknown[0]}: not a parameter of {impl}; allowed: {', '.join(sorted(allowed))}")
    if "protocol" in {f.name for f in dataclasses.fields(cls)}:
        params["protocol"] = protocol
    return cls(**params)
