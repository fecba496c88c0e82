"""Budget arithmetic, exact from the config alone (meta device, no weights)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from bench import BenchError
from bench.budget import achieved, resolve_budget
from bench.config import compose
from bench.models import build_from_config, count_params, hf_config


def meta(name):
    return build_from_config(hf_config(compose([f"model={name}"]).model))


@pytest.mark.parametrize("name, ratio, blocks, after", [
    ("llama-7b", 0.2, 6, 5_524_115_456),       # the paper's "20%"
    ("llama-7b", 0.35, 11, 4_512_198_656),     # the paper's "35%"
    ("vicuna-13b", 0.2, 8, 10_478_228_480),
    ("llama3-8b", 0.2, 6, 6_721_589_248),
])
def test_depth_budget_from_config(name, ratio, blocks, after):
    budget = resolve_budget(meta(name), ratio)
    assert (budget.remove_blocks, budget.target_params) == (blocks, after)


def test_dense_counts():
    assert count_params(meta("llama-7b")) == 6_738_415_616
    assert count_params(meta("vicuna-13b")) == 13_015_864_320
    assert count_params(meta("llama3-8b")) == 8_030_261_248
    assert count_params(meta("smollm2-135m")) == 134_515_008  # tied embeddings counted once


def test_achieved_fractions():
    budget = resolve_budget(meta("llama-7b"), 0.2)
    got = achieved(budget, budget.target_params)
    assert got["removed_frac_block_params"] == 6 / 32
    assert got["removed_frac_total_params"] == pytest.approx(1 - 5_524_115_456 / 6_738_415_616)


@pytest.mark.parametrize("ratio", [0.0, 1.0, -0.1, 1.5])
def test_ratio_outside_unit_interval(ratio):
    with pytest.raises(BenchError, match=r"must be in \(0, 1\)"):
        resolve_budget(meta("llama-7b"), ratio)


def test_ratio_removing_no_block():
    with pytest.raises(BenchError, match="removes no block of 32"):
        resolve_budget(meta("llama-7b"), 0.01)


def test_budget_cli_prints_counts():
    out = subprocess.run([sys.executable, "-m", "bench.budget", "model=llama-7b", "ratio=0.2"],
                         capture_output=True, text=True, check=True).stdout
    for expected in ("6738415616", "202383360", "remove_blocks              6", "5524115456"):
        assert expected in out
