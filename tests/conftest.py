"""Shared fixtures: tiny random LLaMA models built in memory and a small synthetic data root (no downloads).

The device the tests run on: the CPU, or `BENCH_TEST_DEVICE=cuda` (make test-gpu) for every config composed through
`cfg_for` (whole cells, in the config's dtype: `auto` is bf16 on CUDA) and every `tiny` model (fp32: those tests
compare logits to 1e-5). A test that measures the CPU itself (host RSS, /proc) is marked `cpu_only` and skipped
on CUDA.
"""

from __future__ import annotations

import gzip
import json
import os
import random

import pytest
import torch

from bench.config import compose
from bench.models import load_model

TEST_DEVICE = os.environ.get("BENCH_TEST_DEVICE", "cpu")


def pytest_configure(config):
    config.addinivalue_line("markers", "cpu_only: measures the CPU itself; skipped under BENCH_TEST_DEVICE=cuda")


def pytest_collection_modifyitems(config, items):
    if TEST_DEVICE != "cpu":
        skip = pytest.mark.skip(reason=f"cpu_only: measures the CPU itself (BENCH_TEST_DEVICE={TEST_DEVICE})")
        for item in items:
            if "cpu_only" in item.keywords:
                item.add_marker(skip)


WORDS = ("the of and to in a is that for it as was with be by on not he this are or his from at which but have "
         "an they you were her she there been one all we their has would when if so no out up into its time").split()


def _text(n_lines: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(5, 25))) for _ in range(n_lines)]


@pytest.fixture(scope="session")
def data_root(tmp_path_factory):
    """A data root laid out as shared/data, holding random English-word text."""
    root = tmp_path_factory.mktemp("data")
    (root / "wikitext2").mkdir()
    lines = []
    for i, line in enumerate(_text(300, 0)):
        lines += [" ", f" {line} "] if i % 4 else [" ", f" = Heading {i} = ", " "]
    (root / "wikitext2" / "wiki.test.raw").write_text("\n".join(lines) + "\n")
    (root / "ptb").mkdir()
    (root / "ptb" / "ptb.valid.txt").write_text("".join(f" {line} \n" for line in _text(300, 1)))
    (root / "calibration").mkdir()
    book = ["front matter"] * 672 + _text(800, 2)
    (root / "calibration" / "pride_and_prejudice_pg1342.txt").write_text("\n".join(book) + "\n")
    (root / "corpus" / "gutenberg").mkdir(parents=True)  # five small "books" for kd / cpt (bench/distill.py)
    header = "pg_id\ttitle\tfile\n"
    rows = []
    for n, pg in enumerate((11, 26, 43, 45, 47)):
        with gzip.open(root / "corpus" / "gutenberg" / f"{pg}-0.txt.gz", "wt", encoding="utf-8") as f:
            f.write("\n".join(_text(60, 10 + n)) + "\n")
        rows.append(f"{pg}\tbook {pg}\tgutenberg/{pg}-0.txt.gz\n")
    (root / "corpus" / "MANIFEST.tsv").write_text(header + "".join(rows))
    (root / "alpaca").mkdir()
    instructions, outputs = _text(40, 3), _text(40, 4)
    records = [{"instruction": ins, "input": "" if i % 3 else instructions[i - 1], "output": out}
               for i, (ins, out) in enumerate(zip(instructions, outputs))]
    (root / "alpaca" / "alpaca_cleaned_first5000.json").write_text(json.dumps(records, indent=4))
    return root


@pytest.fixture()
def cfg_for(tmp_path, data_root):
    """Compose the run config for a list of overrides, with results and caches under tmp_path; the perplexity
    stage only unless the overrides name the stages."""
    def make(*overrides):
        stages = [] if any(o.startswith("eval.stages=") for o in overrides) else ["eval.stages=[ppl]"]
        device = [] if any(o.startswith("device=") for o in overrides) else [f"device={TEST_DEVICE}"]
        return compose([f"out_dir={tmp_path / 'results'}", f"cache_dir={tmp_path / 'cache'}",
                        f"data_root={data_root}", *device, *stages, *overrides])
    return make


@pytest.fixture(params=["tiny-llama", "tiny-llama-gqa"])
def tiny(request, cfg_for):
    """(model, tokenizer, cfg) for each tiny architecture (MHA and GQA)."""
    cfg = cfg_for(f"model={request.param}")
    model, tok = load_model(cfg.model, cfg.cache_dir, TEST_DEVICE, "float32")
    return model, tok, cfg


@pytest.fixture()
def ids():
    """A fixed batch of token ids [2, 24] (byte tokens)."""
    return torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(0))
