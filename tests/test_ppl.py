"""The official perplexity protocol: windows in both BOS modes, PPL = exp(mean token NLL)."""

from __future__ import annotations

import math

import pytest
import torch

from bench import BenchError
from bench.data import text_rows
from bench.evals.perplexity import evaluate, perplexity, windows

BOS = 99


def test_windows_bos_once():
    stream = torch.arange(10)
    w = windows(stream, 4, BOS, "once")
    # BOS + 10 tokens = 11 -> two windows of 4, remainder (3 tokens) dropped
    assert w.tolist() == [[BOS, 0, 1, 2], [3, 4, 5, 6]]


def test_windows_bos_every():
    stream = torch.arange(10)
    w = windows(stream, 4, BOS, "every")
    assert w.tolist() == [[BOS, 0, 1, 2, 3], [BOS, 4, 5, 6, 7]]  # 5 inputs, 4 scored targets each


def test_windows_reject_unknown_mode():
    with pytest.raises(ValueError, match="allowed values are once, every"):
        windows(torch.arange(10), 4, BOS, "sometimes")


def test_perplexity_is_exp_of_token_mean(tiny):
    model, _, _ = tiny
    wins = windows(torch.randint(0, 256, (200,), generator=torch.Generator().manual_seed(0)), 16, 256, "once")
    ppl, se = perplexity(model, wins, batch_size=3)
    with torch.no_grad():
        logits = model(wins).logits[:, :-1]
    nll = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), wins[:, 1:].reshape(-1))
    assert ppl == pytest.approx(math.exp(nll.item()), rel=1e-5)
    assert 0 < se < ppl


def test_evaluate_rows(tiny, cfg_for):
    model, tok, _ = tiny
    cfg = cfg_for("eval.ppl.max_windows=3", "eval.ppl.seq_len=32")
    rows = evaluate(model, tok, cfg)
    assert [(r["task"], r["metric"]) for r in rows] == [
        ("wikitext2", "ppl"), ("wikitext2", "ppl_bos"), ("ptb", "ppl"), ("ptb", "ppl_bos")]
    assert all(r["n"] == 3 and r["value"] > 1 and r["data_source"].startswith("local:") for r in rows)


def test_wikitext_rows_follow_hf_layout(data_root):
    rows, source = text_rows("wikitext2", data_root)
    assert source == "local:wikitext2/wiki.test.raw"
    assert rows[0] == "" and rows[1].startswith(" = Heading 0 = ") and rows[1].endswith("\n")


def test_missing_data_file_names_path_and_key(tmp_path):
    with pytest.raises(BenchError, match=r"missing data file .*ptb/ptb.valid.txt: set data_root \(env BENCH_DATA\)"):
        text_rows("ptb", tmp_path)
