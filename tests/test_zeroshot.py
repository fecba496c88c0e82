"""Zero-shot through lm-eval: local task variants present lm-eval's own documents, prompts, choices and targets."""

from __future__ import annotations

from pathlib import Path

import pytest

from bench import BenchError
from bench.evals.zeroshot import BUILTIN, PAPER_METRIC, TASKS, evaluate, local_docs, local_tasks

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
needs_data = pytest.mark.skipif(not (DATA / "README.md").exists(), reason="../shared/data not present")


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")


def builtin_view(task: str, doc: dict):
    """(prompt, choices, gold) from lm-eval's built-in task definition applied directly to a hub-schema doc."""
    import datasets
    import lm_eval
    from lm_eval.tasks._yaml_loader import load_yaml
    from lm_eval.utils import apply_template

    cfg = load_yaml(Path(lm_eval.__file__).parent / "tasks" / BUILTIN[task])
    if "process_docs" in cfg:
        doc = cfg["process_docs"](datasets.Dataset.from_list([doc]))[0]

    def run(field):
        spec = cfg[field]
        if callable(spec):
            return spec(doc)
        if isinstance(spec, list):
            return spec
        if spec in doc:
            return doc[spec]
        return apply_template(spec, doc)

    choices = run("doc_to_choice")
    choices = eval(choices) if isinstance(choices, str) else choices  # a rendered "{{[a, b]}}" list
    gold = run("doc_to_target")  # winogrande scores partially: its "text" is the gold index, its target a string
    gold = int(gold) if isinstance(gold, str) and gold.isdigit() else gold
    return run("doc_to_text"), list(choices), gold


@needs_data
def test_local_tasks_match_builtin_definitions(tmp_path):
    from lm_eval.tasks import TaskManager, get_task_dict

    manager = TaskManager(include_path=str(local_tasks(TASKS, DATA, tmp_path)))
    loaded = get_task_dict([f"{t}_local" for t in TASKS], manager)
    for task in TASKS:
        local = loaded[f"{task}_local"]
        doc = next(iter(local.eval_docs))
        prompt, choices = local.doc_to_text(doc), local.doc_to_choice(doc)
        gold = local.doc_to_target(doc)
        assert (prompt, list(choices), gold) == builtin_view(task, local_docs(task, DATA)[0]), task
        assert [m["metric"] for m in local.config.metric_list][:2] == (
            ["acc", "acc_norm"] if task not in ("boolq", "winogrande") else ["acc"]), task
    hella = loaded["hellaswag_local"]
    first = next(iter(hella.eval_docs))
    assert hella.doc_to_text(first) == "Roof shingle removal: A man is sitting on a roof. he"
    assert hella.doc_to_target(first) == 3
    obqa = next(iter(loaded["openbookqa_local"].eval_docs))
    assert obqa["choices"]["text"][1] == "quit eating lunch out" and loaded["openbookqa_local"].doc_to_target(obqa) == 1


@needs_data
def test_local_document_counts():
    counts = {t: len(local_docs(t, DATA)) for t in TASKS}
    assert counts == {"boolq": 3270, "piqa": 1838, "hellaswag": 10042, "winogrande": 1267, "arc_easy": 2376,
                      "arc_challenge": 1172, "openbookqa": 500}


@needs_data
def test_zeroshot_rows_for_all_seven_tasks(cfg_for):
    from bench.models import load_model

    cfg = cfg_for("model=tiny-llama", f"data_root={DATA}", "eval.zeroshot.limit=2", "eval.zeroshot.batch_size=4")
    model, tok = load_model(cfg.model, cfg.cache_dir, "cpu", "float32")
    rows = evaluate(model, tok, cfg)
    paper = {(r["task"], r["metric"]) for r in rows if r["paper_metric"]}
    assert paper == {(t, PAPER_METRIC[t]) for t in TASKS} | {("average", "paper")}
    assert all(r["n"] == 2 and 0 <= r["value"] <= 1 and r["data_source"] == "local" for r in rows
               if r["task"] != "average")


def test_missing_task_file_names_it(tmp_path):
    with pytest.raises(BenchError, match=r"missing data file .*piqa/valid-labels.lst"):
        (tmp_path / "piqa").mkdir()
        (tmp_path / "piqa" / "valid.jsonl").write_text("{}\n")
        local_docs("piqa", tmp_path)


@needs_data
def test_zeroshot_task_is_a_resumable_unit(cfg_for, monkeypatch):
    """Killed in its second task, a cell's rerun evaluates only that task and keeps the first one's rows."""
    import json

    import bench.evals.zeroshot as zs
    from bench.runner import run_cell

    args = ("model=tiny-llama", "method=dense", f"data_root={DATA}", "eval.stages=[zeroshot]",
            "eval.zeroshot.tasks=[piqa,arc_easy]", "eval.zeroshot.limit=2", "eval.zeroshot.batch_size=4")
    real, seen = zs.task_rows, []

    def fail_on_arc(lm, task, *a):
        seen.append(task)
        if task == "arc_easy" and len(seen) == 2:
            raise RuntimeError("injected failure in arc_easy")
        return real(lm, task, *a)

    monkeypatch.setattr(zs, "task_rows", fail_on_arc)
    with pytest.raises(RuntimeError, match="injected"):
        run_cell(cfg_for(*args))
    out = run_cell(cfg_for(*args))
    assert seen == ["piqa", "arc_easy", "arc_easy"]
    rows = [r for r in map(json.loads, (out / "records.jsonl").read_text().splitlines()) if r["stage"] != "memory"]
    assert [(r["task"], r["metric"]) for r in rows] == [("piqa", "acc"), ("piqa", "acc_norm"), ("arc_easy", "acc"),
                                                        ("arc_easy", "acc_norm")]
    assert not (out / "partial.jsonl").exists()


@needs_data
@pytest.mark.parametrize("backend, forward, kill_at, rerun_calls, fresh_calls", [
    ("hflm", "_model_call", 3, 2, 4),              # one forward per request: killed after 2 of piqa's 4
    ("context_once", "_packed_call", 2, 1, 2),     # one packed forward per document: killed in the second
])
def test_killed_task_resumes_from_its_answered_requests(cfg_for, monkeypatch, tmp_path, backend, forward, kill_at,
                                                         rerun_calls, fresh_calls):
    """Killed partway through piqa, the rerun asks the model only for the requests it had not answered and gives
    the rows of an uninterrupted run, with either backend; the finished cell leaves no checkpoint folder behind."""
    import json

    from lm_eval.models.huggingface import HFLM

    from bench.evals.context_once import ContextOnceLM
    from bench.records import UNIT_SCRATCH
    from bench.runner import run_cell

    args = ("model=tiny-llama", "method=dense", f"data_root={DATA}", "eval.stages=[zeroshot]",
            f"eval.zeroshot.backend={backend}", "eval.zeroshot.tasks=[piqa]", "eval.zeroshot.limit=2",
            "eval.zeroshot.batch_size=1")
    cls = HFLM if backend == "hflm" else ContextOnceLM
    real, calls, kills = getattr(cls, forward), [], [kill_at]

    def killed(self, *a, **kw):
        calls.append(1)
        if len(calls) in kills:
            raise KeyboardInterrupt("killed")
        return real(self, *a, **kw)

    monkeypatch.setattr(cls, forward, killed)
    with pytest.raises(KeyboardInterrupt):
        run_cell(cfg_for(*args))
    calls.clear(), kills.clear()
    out = run_cell(cfg_for(*args))
    assert len(calls) == rerun_calls
    assert not (out / UNIT_SCRATCH).exists()
    calls.clear()
    fresh = run_cell(cfg_for(*args, f"out_dir={tmp_path / 'fresh'}"))
    assert len(calls) == fresh_calls
    resumed, expected = ([r for r in map(json.loads, (cell / "records.jsonl").open()) if r["stage"] != "memory"]
                         for cell in (out, fresh))
    assert [r["metric"] for r in resumed] == [r["metric"] for r in expected] == ["acc", "acc_norm"]
    assert [r["value"] for r in resumed] == pytest.approx([r["value"] for r in expected])
