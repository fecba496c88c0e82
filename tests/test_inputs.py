"""Every input checked before any work: each bad value a user tried gives one BenchError line naming the key and
what it allows, before a model loads; and the report skips a corrupted records file instead of dying."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys

import pytest
import torch

import bench.models
import bench.runner
from bench import BenchError
from bench.report import write_tables
from bench.runner import run_cell

# (overrides, the start of the error line); {tmp} is the test's tmp_path. The first ten are the inputs users
# tried that gave a traceback or were silently accepted; the rest cover the other typed keys.
CASES = [
    (["ratio=abc"], "ratio='abc': must be a number in (0, 1)"),
    (["seed=abc"], "seed='abc': must be an integer"),
    (["device=cuda"], "device='cuda': CUDA is not available here; allowed values are auto, cpu"),
    (["model=hf", "model.path=/nonexistent/dir"], "model.path='/nonexistent/dir': no such directory"),
    (["plan_file={tmp}/truncated.json"], "plan_file='{tmp}/truncated.json': not valid JSON"),
    (["eval.speed.batch_sizes=[0]"], "eval.speed.batch_sizes=[0]: item 0: must be >= 1"),
    (["eval.speed.new_tokens=[0]"], "eval.speed.new_tokens=[0]: item 0: must be >= 1"),
    (["eval.ppl.bos_modes=[sometimes]"], "eval.ppl.bos_modes=['sometimes']: item 'sometimes': allowed values are "
                                         "once, every"),
    (["eval.ppl.max_windows=-1"], "eval.ppl.max_windows=-1: must be >= 1 or null"),
    (["retrain=lora", "lora.max_steps=0"], "lora.max_steps=0: must be >= 1 or null"),
    (["ratio=1.5"], "ratio=1.5: must be in (0, 1)"),
    (["seed=1.5"], "seed=1.5: must be an integer"),
    (["device=gpu"], "device='gpu': allowed values are auto, cpu"),
    (["dtype=float8"], "dtype='float8': allowed values are auto, float32"),
    (["eval.stages=[ppl,typo]"], "eval.stages=['ppl', 'typo']: item 'typo': allowed values are ppl, zeroshot, speed"),
    (["eval.ppl.datasets=[c4]"], "eval.ppl.datasets=['c4']: item 'c4': allowed values are wikitext2, ptb"),
    (["eval.ppl.seq_len=0"], "eval.ppl.seq_len=0: must be >= 1"),
    (["eval.ppl.batch_size=two"], "eval.ppl.batch_size='two': must be an integer >= 1"),
    (["eval.zeroshot.tasks=[mmlu]"], "eval.zeroshot.tasks=['mmlu']: item 'mmlu': allowed values are boolq"),
    (["eval.zeroshot.limit=0"], "eval.zeroshot.limit=0: must be >= 1 or null"),
    (["eval.zeroshot.batch_size=max"], "eval.zeroshot.batch_size='max': must be an integer >= 1 or 'auto'"),
    (["eval.speed.runtimes=[onnx]"], "eval.speed.runtimes=['onnx']: item 'onnx': allowed values are eager, compiled"),
    (["eval.speed.batch_sizes=4"], "eval.speed.batch_sizes=4: must be a list; each item: must be an integer >= 1"),
    (["eval.speed.warmup=-1"], "eval.speed.warmup=-1: must be >= 0"),
    (["eval.speed.repeats=0"], "eval.speed.repeats=0: must be >= 1"),
    (["eval.speed.min_time_s=-0.5"], "eval.speed.min_time_s=-0.5: must be >= 0"),
    (["retrain=kd", "retrain.params=half"], "retrain.params='half': allowed values are full, lora"),
    (["retrain=cpt", "retrain.data=c4"], "retrain.data='c4': allowed values are corpus or hub:<dataset>[:<config>]"),
    (["retrain=kd", "retrain.kd.temperature=0"], "retrain.kd.temperature=0: must be > 0"),
    (["calibration=mine"], "calibration='mine': allowed values are auto, native, shared"),
    (["protocol=paper"], "protocol='paper': allowed values are matched, native"),
    (["lora.r=0"], "lora.r=0: must be >= 1"),
    (["lora.lr=0"], "lora.lr=0: must be > 0"),
    (["lora.dropout=1"], "lora.dropout=1: must be in [0, 1)"),
    (["shape_only=yes"], "shape_only='yes': must be true or false"),
    (["model.source=s3"], "model.source='s3': allowed values are hub, gguf, random"),
    (["model=hf"], "model.path is missing"),
    (["plan_file={tmp}/none.json"], "plan_file='{tmp}/none.json': no such file"),
    (["plan_file={tmp}/list.json"], "plan_file='{tmp}/list.json': no \"kind\" key"),
]


def tiny_unless_named(overrides: list[str]) -> list[str]:
    """The overrides on tiny-llama, unless they choose a model themselves (Hydra takes one model= only)."""
    return overrides if any(o.startswith("model=") for o in overrides) else ["model=tiny-llama", *overrides]


@pytest.fixture()
def no_model(monkeypatch):
    """Fail the test if anything tries to load a model: the checks must come first."""
    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded before the config was checked")

    monkeypatch.setattr(bench.models, "load_model", refuse)
    monkeypatch.setattr(bench.runner, "load_model", refuse, raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # the same answer on a GPU machine


@pytest.mark.parametrize("overrides, message", CASES, ids=lambda v: v[-1] if isinstance(v, list) else None)
def test_bad_input_is_one_line_error_before_the_model_loads(overrides, message, cfg_for, tmp_path, no_model):
    (tmp_path / "truncated.json").write_text('{"kind": "depth", "remove": [1, 2')
    (tmp_path / "list.json").write_text("[1, 2]")
    cfg = cfg_for("method=depth_ppl", *tiny_unless_named([o.format(tmp=tmp_path) for o in overrides]))
    with pytest.raises(BenchError) as err:  # before the model loads: no_model fails the test otherwise
        run_cell(cfg)
    text = str(err.value)
    assert "\n" not in text and text.startswith(message.format(tmp=tmp_path)), text
    assert not (tmp_path / "results").exists()  # nothing written: no cell directory


def test_unknown_retraining_regime_is_one_line():
    from bench.config import compose

    with pytest.raises(BenchError, match=r"^retrain='full': allowed values are cpt, kd, lora, none$"):
        compose(["retrain=full"])


def test_good_inputs_pass(cfg_for, tmp_path, no_model):
    """The shipped configs and the documented alternatives validate."""
    (tmp_path / "plan.json").write_text('{"kind": "depth"}')
    from bench.schema import validate

    for overrides in (["eval=quick"], ["eval=full"], ["model=smollm2-135m", "+sweep=default"],
                      ["model=llama-7b", "shape_only=true", "eval.stages=[speed]"], ["+sweep=efficiency"],
                      ["retrain=lora", "lora.max_steps=24"], ["eval.zeroshot.batch_size=auto", "dtype=bf16"],
                      ["retrain=kd", "retrain.data=hub:HuggingFaceFW/fineweb-edu:sample-10BT"], ["retrain=cpt"],
                      ["model=hf", f"model.path={tmp_path}"], ["model=hf", "model.path=org/name"],
                      [f"plan_file={tmp_path / 'plan.json'}"], ["eval.ppl.max_windows=null", "eval.stages=[]"]):
        validate(cfg_for(*tiny_unless_named(overrides)))


def test_cli_prints_one_error_line(tmp_path, data_root):
    """From the command line a bad value is one line and exit status 2, no traceback."""
    env = os.environ | {"BENCH_DATA": str(data_root), "BENCH_CACHE": str(tmp_path / "cache")}
    run = subprocess.run([sys.executable, "-m", "bench", "model=tiny-llama", "ratio=abc", f"out_dir={tmp_path}"],
                         capture_output=True, text=True, env=env, cwd=tmp_path)
    lines = (run.stdout + run.stderr).strip().splitlines()
    assert run.returncode == 2 and len(lines) == 1, lines
    assert lines[0].endswith("ratio='abc': must be a number in (0, 1)")


def test_report_skips_a_corrupt_records_file(tmp_path, caplog):
    """One corrupted cell's records.jsonl is skipped with a warning naming it; the table is built from the rest."""
    row = {"model": "m", "kind": "depth", "params": 800, "removed_frac_total_params": 0.2, "stage": "ppl",
           "task": "wikitext2", "metric": "ppl", "stderr": 0.5, "n": 8}
    for method, value in (("dense", 10.0), ("depth_ppl+", 20.0), ("flap", 30.0)):
        (tmp_path / method).mkdir()
        lines = [json.dumps(row | {"method": method, "ratio": 0.2, "value": value, "task": task})
                 for task in ("wikitext2", "ptb")]
        (tmp_path / method / "records.jsonl").write_text("\n".join(lines) + "\n")
    bad = tmp_path / "flap" / "records.jsonl"
    bad.write_text(bad.read_text()[:-20] + "\n")  # the last line cut short
    with caplog.at_level(logging.WARNING, logger="bench.records"):
        md, _, csv = write_tables(tmp_path)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert warnings == [f"skipping {bad}: line 2 is not a JSON object"]
    assert "flap" not in md.read_text() and "depth_ppl+" in md.read_text()
    assert csv.exists()
