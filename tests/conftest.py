"""Shared fixtures: tiny random LLaMA models built in memory and a small synthetic data root (no downloads)."""

from __future__ import annotations

import json
import random

import pytest
import torch

from bench.config import compose
from bench.models import load_model

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
        return compose([f"out_dir={tmp_path / 'results'}", f"cache_dir={tmp_path / 'cache'}",
                        f"data_root={data_root}", *stages, *overrides])
    return make


@pytest.fixture(params=["tiny-llama", "tiny-llama-gqa"])
def tiny(request, cfg_for):
    """(model, tokenizer, cfg) for each tiny architecture (MHA and GQA)."""
    cfg = cfg_for(f"model={request.param}")
    model, tok = load_model(cfg.model, cfg.cache_dir, "cpu", "float32")
    return model, tok, cfg


@pytest.fixture()
def ids():
    """A fixed batch of token ids [2, 24] (byte tokens)."""
    return torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(0))
