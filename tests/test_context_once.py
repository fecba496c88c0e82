"""The context-once loglikelihood (bench.evals.context_once) gives HFLM's answers: loglikelihoods within 1e-4,
is-greedy and accuracies identical, the request cache resumes, unsupported models fall back to HFLM."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch
from lm_eval.models.huggingface import HFLM

from bench import BenchError
from bench.evals.context_once import ContextOnceLM
from bench.evals.zeroshot import TASKS, local_tasks, task_manager

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
needs_data = pytest.mark.skipif(not (DATA / "README.md").exists(), reason="../shared/data not present")


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")


@pytest.fixture(scope="module")
def manager(tmp_path_factory):
    """lm-eval's task index over the seven local tasks, built once for the module."""
    return task_manager(str(local_tasks(TASKS, DATA, tmp_path_factory.mktemp("tasks"))), tuple(sorted(TASKS)))


def both(model, tok, requests, **kw):
    """HFLM's and ContextOnceLM's answers to the same token-level requests."""
    return [cls(pretrained=model, tokenizer=tok, **kw)._loglikelihood_tokens(requests, disable_tqdm=True)
            for cls in (HFLM, ContextOnceLM)]


def assert_same(expected, got):
    assert len(expected) == len(got)
    assert max(abs(a[0] - b[0]) for a, b in zip(expected, got)) < 1e-4
    assert [a[1] for a in expected] == [b[1] for b in got]


def greedy(model, ids: list[int], n: int) -> list[int]:
    """The model's n greedy next tokens after ids."""
    out = model.generate(torch.tensor([ids]), max_new_tokens=n, min_new_tokens=n, do_sample=False)
    return out[0, len(ids):].tolist()


@needs_data
def test_equal_to_hflm_on_every_task(tiny, manager):
    """All seven tasks, 4 documents each, mixed in batches of 3 rows: shared contexts (hellaswag, arc, piqa,
    openbookqa), one-token continuations (boolq, whose passages also exceed max_length 512 and are left-truncated)
    and WinoGrande's partial scoring (different contexts, one continuation)."""
    from lm_eval.tasks import get_task_dict

    model, tok, _ = tiny
    tasks = get_task_dict([f"{t}_local" for t in TASKS], manager)
    instances = []
    for task in tasks.values():
        task.build_all_requests(limit=4, rank=0, world_size=1)
        instances += task.instances
    hflm, once = (cls(pretrained=model, tokenizer=tok, batch_size=3) for cls in (HFLM, ContextOnceLM))
    expected, got = hflm.loglikelihood(instances, disable_tqdm=True), once.loglikelihood(instances, disable_tqdm=True)
    assert_same(expected, got)
    assert max(len(i.args[0]) for i in instances) > 512


def test_greedy_lengths_and_left_truncation(tiny):
    """Token-level requests: greedy continuations (is-greedy True) next to others, contexts and continuations of
    different lengths in one batch, and inputs longer than max_length 24 (left truncation)."""
    model, tok, _ = tiny
    gen = torch.Generator().manual_seed(0)
    requests = []
    for doc, n_ctx in enumerate((5, 12, 30, 40)):
        ctx = torch.randint(0, 256, (n_ctx,), generator=gen).tolist()
        conts = [greedy(model, ctx, 3), greedy(model, ctx, 1), [7], [9, 8, 7, 6, 5], greedy(model, ctx, 6)[:5]]
        requests += [((f"doc{doc}", f"c{k}"), ctx, cont) for k, cont in enumerate(conts)]
    expected, got = both(model, tok, requests, batch_size=2, max_length=24)
    assert_same(expected, got)
    assert sum(a[1] for a in expected) >= 6  # the greedy continuations of the untruncated documents


def test_sliding_window_falls_back(cfg_for, caplog):
    """tiny-gemma3 (sliding window 8): inputs longer than the window go through HFLM, with a log line; shorter ones
    are packed; the answers are HFLM's."""
    from bench.models import load_model

    cfg = cfg_for("model=tiny-gemma3")
    model, tok = load_model(cfg.model, cfg.cache_dir, "cpu", "float32")
    requests = [(("short", f"c{k}"), [1, 2, 3], [4 + k] * (k + 1)) for k in range(3)]
    requests += [(("long", f"c{k}"), list(range(10, 30)), [4 + k] * (k + 1)) for k in range(3)]
    with caplog.at_level(logging.INFO, logger="bench.context_once"):
        expected, got = both(model, tok, requests, batch_size=4)
    assert_same(expected, got)
    assert "3 of 6 requests through HFLM (input longer than the sliding window 8)" in caplog.text


def test_attention_without_masks_falls_back(tiny, monkeypatch, caplog):
    """An attention implementation that takes no 4D mask: every request through HFLM."""
    import bench.evals.context_once as co

    model, tok, _ = tiny
    monkeypatch.setattr(co, "MASKED_ATTENTION", ())
    monkeypatch.setattr(ContextOnceLM, "_packed_call", lambda *a: pytest.fail("packed forward"))
    requests = [(("a", f"c{k}"), [1, 2, 3, 4], [5, 6][:k + 1]) for k in range(2)]
    with caplog.at_level(logging.INFO, logger="bench.context_once"):
        expected, got = both(model, tok, requests, batch_size=4)
    assert expected == got
    assert "2 of 2 requests through HFLM (attention 'sdpa' takes no 4D mask)" in caplog.text


@needs_data
def test_accuracies_equal_and_backend_choice(cfg_for):
    """The zero-shot stage gives the same rows with either backend; a bad backend is one schema line."""
    from bench.models import load_model
    from bench.evals.zeroshot import evaluate
    from bench.schema import validate

    args = ("model=tiny-llama", f"data_root={DATA}", "eval.zeroshot.tasks=[hellaswag,winogrande,boolq]",
            "eval.zeroshot.limit=3", "eval.zeroshot.batch_size=4")
    cfg = cfg_for(*args)
    model, tok = load_model(cfg.model, cfg.cache_dir, "cpu", "float32")
    rows = {b: evaluate(model, tok, cfg_for(*args, f"eval.zeroshot.backend={b}")) for b in ("hflm", "context_once")}
    assert [(r["task"], r["metric"], r["value"]) for r in rows["hflm"]] == [
        (r["task"], r["metric"], r["value"]) for r in rows["context_once"]]
    with pytest.raises(BenchError, match="eval.zeroshot.backend='vllm': allowed values are context_once, hflm"):
        validate(cfg_for(*args, "eval.zeroshot.backend=vllm"))
