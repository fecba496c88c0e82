"""Per-example files (examples/ in a cell directory): per zero-shot document and per perplexity window, the values
paired bootstrap statistics resample; they agree with the cell's records and survive a resume."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from bench.records import EXAMPLES, read_examples, write_examples

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
needs_data = pytest.mark.skipif(not (DATA / "README.md").exists(), reason="../shared/data not present")
ARGS = ("model=tiny-llama", "method=dense", f"data_root={DATA}", "eval.stages=[ppl,zeroshot]",
        "eval.zeroshot.tasks=[piqa,arc_easy]", "eval.zeroshot.limit=3", "eval.ppl.max_windows=2")


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")


def test_write_read_round_trip(tmp_path):
    rows = [{"window": 0, "nll_sum": 1.5, "tokens": 3}, {"window": 1, "nll_sum": 2.25, "tokens": 3}]
    write_examples(tmp_path / EXAMPLES / "x.jsonl.gz", rows)
    first = (tmp_path / EXAMPLES / "x.jsonl.gz").read_bytes()
    write_examples(tmp_path / EXAMPLES / "x.jsonl.gz", rows)
    assert read_examples(tmp_path / EXAMPLES / "x.jsonl.gz") == rows
    assert (tmp_path / EXAMPLES / "x.jsonl.gz").read_bytes() == first  # no time stamp: same values, same bytes


@needs_data
def test_cell_examples_match_records_and_survive_resume(cfg_for, monkeypatch):
    import bench.evals.zeroshot as zs
    from bench.runner import run_cell

    real, seen = zs.task_rows, []

    def fail_on_arc(lm, task, *a):
        seen.append(task)
        if task == "arc_easy" and len(seen) == 2:
            raise RuntimeError("injected failure in arc_easy")
        return real(lm, task, *a)

    monkeypatch.setattr(zs, "task_rows", fail_on_arc)
    with pytest.raises(RuntimeError, match="injected"):
        run_cell(cfg_for(*ARGS))
    out = run_cell(cfg_for(*ARGS))
    assert seen == ["piqa", "arc_easy", "arc_easy"]  # piqa was reused: its file comes from the first run
    records = [json.loads(line) for line in (out / "records.jsonl").read_text().splitlines()]

    zero = [r for r in records if r["stage"] == "zeroshot"]
    assert {r["examples"] for r in zero} == {"examples/zeroshot_piqa.jsonl.gz", "examples/zeroshot_arc_easy.jsonl.gz"}
    for r in zero:
        docs = read_examples(out / r["examples"])
        assert [d["doc_id"] for d in docs] == [0, 1, 2]
        assert sum(d[r["metric"]] for d in docs) / len(docs) == pytest.approx(r["value"])
        for d in docs:
            assert set(d) == {"doc_id", "acc", "acc_norm", "gold", "chosen", "chosen_norm", "loglik", "gold_loglik"}
            assert d["acc"] == int(d["chosen"] == d["gold"]) and d["acc_norm"] == int(d["chosen_norm"] == d["gold"])
            assert d["chosen"] == max(range(len(d["loglik"])), key=d["loglik"].__getitem__)
            assert d["gold_loglik"] == d["loglik"][d["gold"]] and len(d["loglik"]) >= 2

    ppl = [r for r in records if r["stage"] == "ppl"]
    assert ppl and all(r["examples"] == f"examples/ppl_{r['task']}_{r['metric']}.jsonl.gz" for r in ppl)
    for r in ppl:
        wins = read_examples(out / r["examples"])
        assert [w["window"] for w in wins] == [0, 1] and len(wins) == r["n"]
        assert all(w["tokens"] == r["seq_len"] - (r["metric"] == "ppl") for w in wins)
        total = math.exp(sum(w["nll_sum"] for w in wins) / sum(w["tokens"] for w in wins))
        assert total == pytest.approx(r["value"], rel=1e-9)


def test_no_cell_directory_writes_no_examples(cfg_for):
    """Without a Progress path (a stage called on its own) there is no cell directory: no file, no field."""
    from bench.evals.perplexity import evaluate
    from bench.models import load_model

    cfg = cfg_for("model=tiny-llama", "eval.ppl.max_windows=1", "eval.ppl.seq_len=32")
    model, tok = load_model(cfg.model, cfg.cache_dir, "cpu", "float32")
    rows = evaluate(model, tok, cfg)
    assert rows and all("examples" not in r for r in rows)
