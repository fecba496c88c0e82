"""Zero-shot accuracy through lm-eval on the paper's seven tasks, on the pruned model held in memory.

lm-eval's `simple_evaluate` on the model object (no save and reload), through the context-once backend
(bench/evals/context_once.py: each document's shared context is run once, the same loglikelihoods as HFLM to
1e-4; `eval.zeroshot.backend=hflm` for lm-eval's stock HFLM). Online, lm-eval's built-in tasks
(the hub datasets). Offline (a data root), local variants: each is a task YAML that *includes* the built-in one
and overrides only the dataset, pointing it at the same documents converted to the hub schema from the files in
the data root (shared/data/README.md gives their formats). Prompts, choices, targets and metrics are therefore
lm-eval's own.

The paper's metric per task (../shared/docs/methods.md section 2.2): boolq acc, piqa acc, hellaswag acc_norm,
winogrande acc, arc_easy acc, arc_challenge acc_norm, openbookqa acc_norm; both metrics are recorded. Each task
is one `simple_evaluate` call and one resumable unit of the cell (bench.records.Progress): a full pass of the
seven is hours on a CPU, and a killed run redoes only the task it was in, and of that task only the requests it
had not answered (lm-eval's request cache, `use_cache`, in the unit's checkpoint folder; each answer stored with a
CRC-32, and a damaged cache is removed with one warning line and asked again). After such a resume the
task's `elapsed_s` is the resumed call's wall time. Each task's per-document results (correct under acc and
acc_norm, the choices' loglikelihoods) go to the cell's `examples/zeroshot_<task>.jsonl.gz` (bench.stats pairs
them across methods).

    python -m bench method=depth_ppl eval.stages=[zeroshot] eval.zeroshot.limit=50
"""

from __future__ import annotations

import bz2
import contextlib
import csv
import functools
import json
import logging
import pickle
import re
import time
import zlib
from pathlib import Path

from bench import BenchError
from bench.progress import enabled as progress_enabled
from bench.records import Progress, examples_dir

log = logging.getLogger("bench.zeroshot")

TASKS = ("boolq", "piqa", "hellaswag", "winogrande", "arc_easy", "arc_challenge", "openbookqa")  # the paper's order
PAPER_METRIC = {"boolq": "acc", "piqa": "acc", "hellaswag": "acc_norm", "winogrande": "acc", "arc_easy": "acc",
                "arc_challenge": "acc_norm", "openbookqa": "acc_norm"}
BUILTIN = {"boolq": "super_glue/boolq/default.yaml", "piqa": "piqa/piqa.yaml", "hellaswag": "hellaswag/hellaswag.yaml",
           "winogrande": "winogrande/default.yaml", "arc_easy": "arc/arc_easy.yaml",
           "arc_challenge": "arc/arc_challenge.yaml", "openbookqa": "openbookqa/openbookqa.yaml"}
SPLIT = {"boolq": "validation", "piqa": "validation", "hellaswag": "validation", "winogrande": "validation",
         "arc_easy": "test", "arc_challenge": "test", "openbookqa": "test"}  # the split lm-eval evaluates
LOCAL_FILES = {"boolq": ["boolq/val.jsonl"], "piqa": ["piqa/valid.jsonl", "piqa/valid-labels.lst"],
               "hellaswag": ["hellaswag/hellaswag_val_full.txt.bz2"],
               "winogrande": ["winogrande/dev.json", "winogrande/dev-labels.lst"],
               "arc_easy": ["arc_easy/ARC-Easy-Test.jsonl"], "arc_challenge": ["arc_challenge/ARC-Challenge-Test.jsonl"],
               "openbookqa": ["openbookqa/test.tsv"]}


def _files(task: str, data_root) -> list[Path]:
    paths = [Path(data_root) / f for f in LOCAL_FILES[task]]
    for p in paths:
        if not p.is_file():
            raise BenchError(f"missing data file {p}: set data_root (env BENCH_DATA) to a directory laid out as "
                             f"shared/data, or data_root=null to use the HF hub")
    return paths


def _lines(path: Path) -> list[str]:
    return path.read_text(encoding="utf-8").splitlines()


def _arc(path: Path) -> list[dict]:
    docs = []
    for line in _lines(path):
        r = json.loads(line)
        docs.append({"id": r["id"], "question": r["question"]["stem"], "answerKey": r["answerKey"],
                     "choices": {"text": [c["text"] for c in r["question"]["choices"]],
                                 "label": [c["label"] for c in r["question"]["choices"]]}})
    return docs


def local_docs(task: str, data_root) -> list[dict]:
    """The task's evaluation documents from the data root, in the schema of the hub dataset lm-eval loads."""
    if task not in TASKS:
        raise BenchError(f"eval.zeroshot.tasks: {task!r}; allowed values are {', '.join(TASKS)}")
    files = _files(task, data_root)
    if task == "boolq":  # SuperGLUE labels are strings here; the hub has 0 / 1
        return [{**r, "label": int(r["label"] in (True, "true"))} for r in map(json.loads, _lines(files[0]))]
    if task == "piqa":
        return [{**json.loads(doc), "label": int(label)}
                for doc, label in zip(_lines(files[0]), _lines(files[1]), strict=True)]
    if task == "hellaswag":
        # 6 lines per task: preprocess(activity_label) + ": " + preprocess(ctx), label, 4 endings. lm-eval's
        # process_docs rebuilds the query as preprocess(activity_label + ": " + ctx_a + " " + ctx_b.capitalize()),
        # which gives back this line with ctx_b empty.
        with bz2.open(files[0], "rt", encoding="utf-8") as f:
            lines = f.read().splitlines()
        docs = []
        for i in range(0, len(lines) - 5, 6):
            label, _, ctx = lines[i].partition(": ")
            docs.append({"activity_label": label, "ctx_a": ctx, "ctx_b": "", "ctx": ctx,
                         "endings": lines[i + 2:i + 6], "label": lines[i + 1]})
        return docs
    if task == "winogrande":
        return [{"sentence": r["sentence"], "option1": r["option1"], "option2": r["option2"], "answer": label}
                for r, label in zip(json.loads(files[0].read_text()), _lines(files[1]), strict=True)]
    if task in ("arc_easy", "arc_challenge"):
        return _arc(files[0])
    docs = []  # openbookqa: TSV with the choices in one "(A) .. (B) .." string
    with files[0].open(encoding="utf-8") as f:
        for r in csv.DictReader(f, delimiter="\t"):
            parts = re.split(r"\s*\(([A-D])\)\s", " " + r["Choices"])[1:]
            docs.append({"id": r["ID"], "question_stem": r["Question Stem"], "answerKey": r["Answer Key"],
                         "choices": {"label": parts[0::2], "text": [t.strip() for t in parts[1::2]]}})
    return docs


def local_tasks(tasks, data_root, out_dir: Path) -> Path:
    """Write `<task>_local` task YAMLs (built-in task + local dataset) and their jsonl documents into out_dir."""
    import lm_eval

    builtin_dir = Path(lm_eval.__file__).parent / "tasks"
    out_dir.mkdir(parents=True, exist_ok=True)
    for task in tasks:
        docs = out_dir / f"{task}.jsonl"
        docs.write_text("".join(json.dumps(d) + "\n" for d in local_docs(task, data_root)), encoding="utf-8")
        split = SPLIT[task]
        (out_dir / f"{task}_local.yaml").write_text(
            f"include: {builtin_dir / BUILTIN[task]}\n"
            f"task: {task}_local\n"
            "tag: []\n"
            "dataset_path: json\n"
            "dataset_name: null\n"
            f"dataset_kwargs:\n  data_files:\n    {split}: {docs}\n"
            "training_split: null\n"
            f"validation_split: {'validation' if split == 'validation' else 'null'}\n"
            f"test_split: {'test' if split == 'test' else 'null'}\n", encoding="utf-8")
    return out_dir


@functools.lru_cache(maxsize=4)
def task_manager(include_path: str | None, tasks: tuple[str, ...] = ()):
    """lm-eval's task index takes ~9 s to build: once per process (per task set, whose YAMLs it indexes), so
    the cells of a sweep share it."""
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=include_path)


def evaluate(model, tokenizer, cfg, dense=None, progress: Progress | None = None) -> list[dict]:
    from bench.evals.context_once import make_lm

    zcfg, progress = cfg.eval.zeroshot, progress or Progress()
    data_root = cfg.get("data_root") or None
    tasks = list(zcfg.tasks)
    if data_root:
        manager = task_manager(str(local_tasks(tasks, data_root, Path(cfg.cache_dir) / "lm_eval_tasks")),
                               tuple(sorted(tasks)))
    else:
        manager = task_manager(None)
    source = "local" if data_root else "hub"
    lm = make_lm(model, tokenizer, zcfg.batch_size, zcfg.get("backend", "context_once"))  # bench.evals.context_once
    if not progress_enabled():
        quiet_requests(lm)
    settings = {"limit": zcfg.get("limit"), "batch_size": zcfg.batch_size, "seed": int(cfg.seed), "source": source,
                "lm_eval": _lm_eval_version(), "backend": zcfg.get("backend", "context_once")}
    rows, examples = [], examples_dir(progress)
    for task in tasks:
        rows += progress.run(f"zeroshot/{task}", settings,
                             lambda folder: task_rows(lm, task, f"{task}_local" if data_root else task, manager,
                                                      zcfg, int(cfg.seed), source, folder, examples),
                             resumable=True)
    paper = [r["value"] for r in rows if r["paper_metric"]]
    if len(paper) == len(TASKS):
        rows.append({"stage": "zeroshot", "task": "average", "metric": "paper", "value": sum(paper) / len(paper),
                     "stderr": None, "n": len(paper), "unit": "", "paper_metric": True, "data_source": source,
                     "elapsed_s": sum(r["elapsed_s"] for r in rows if r["paper_metric"])})
    return rows


def quiet_requests(lm) -> None:
    """Turn off lm-eval's per-request bars ("Running loglikelihood requests", on stderr). HFLM passes them
    disable=False (rank 0), which overrides TQDM_DISABLE, so they would fill CI and batch logs; they stay on
    where bench's own bars are (bench.progress.enabled)."""
    for name in ("loglikelihood", "loglikelihood_rolling", "generate_until"):
        setattr(lm, name, functools.partial(getattr(lm, name), disable_tqdm=True))


def task_rows(lm, task: str, name: str, manager, zcfg, seed: int, source: str,
              checkpoints: Path | None = None, examples: Path | None = None) -> list[dict]:
    """One task through lm-eval's `simple_evaluate`, 0-shot: a row per metric (acc, acc_norm) with its stderr.

    With a `checkpoints` folder, lm-eval stores each answered request there as it goes (sqlite, about 0.5 ms a
    request, each with a CRC-32: `checked_request_cache`) and answers stored ones from it, so a killed pass resumes
    where it stopped; a damaged cache there (not sqlite, a failed integrity check, an entry failing its CRC-32) is
    removed first with one warning line (`drop_damaged_caches`) and its requests asked again. With an `examples` folder
    (the cell's `examples/`), the task's per-document results go to `zeroshot_<task>.jsonl.gz` there
    (`_examples`), before the unit's rows are stored, so a reused unit has its file; the rows name it.
    """
    from lm_eval import simple_evaluate
    from lm_eval.api.model import CacheHook

    from bench.records import write_examples

    t0 = time.perf_counter()
    task_obj = manager.load([name])["tasks"][name]  # built here to turn the logged samples into documents' rows
    if checkpoints:
        drop_damaged_caches(checkpoints, task)
        checked_request_cache(lm)
    try:
        out = simple_evaluate(model=lm, tasks=[task_obj], num_fewshot=0, limit=zcfg.get("limit"),
                              task_manager=manager, log_samples=True, random_seed=seed, numpy_random_seed=seed,
                              torch_random_seed=seed, use_cache=str(checkpoints / "requests") if checkpoints else None)
    finally:
        if checkpoints and lm.cache_hook.dbdict is not None:  # the request cache lm-eval hooked into the model
            lm.cache_hook.dbdict.close()
            lm.set_cache_hook(CacheHook(None))
    elapsed = time.perf_counter() - t0
    res, n = out["results"][name], out["n-samples"][name]["effective"]
    extra = {}
    if examples is not None:
        file = f"zeroshot_{task}.jsonl.gz"
        write_examples(examples / file, sorted((_examples(task_obj, s) for s in out["samples"][name]),
                                               key=lambda r: r["doc_id"]))
        extra = {"examples": f"{examples.name}/{file}"}
    rows = []
    for metric in ("acc", "acc_norm"):
        if f"{metric},none" not in res:
            continue
        se = res.get(f"{metric}_stderr,none")
        rows.append({"stage": "zeroshot", "task": task, "metric": metric, "value": res[f"{metric},none"],
                     "stderr": se if isinstance(se, float) else None, "n": n, "unit": "",
                     "paper_metric": metric == PAPER_METRIC[task], "data_source": source, "elapsed_s": elapsed}
                    | extra)
    log.info("%s: %s %.4f (n=%d, %.0f s)", task, PAPER_METRIC[task], res[f"{PAPER_METRIC[task]},none"], n, elapsed)
    return rows


REQUEST_TABLE = "unnamed"  # the table sqlitedict (lm-eval's CachingLM) keeps its entries in


def _encode(value) -> bytes:
    """A request cache entry: lm-eval's pickle followed by its CRC-32 (4 bytes, big-endian)."""
    import sqlite3

    data = pickle.dumps(value, protocol=pickle.HIGHEST_PROTOCOL)
    return sqlite3.Binary(data + zlib.crc32(data).to_bytes(4, "big"))


def _decode(blob) -> object:
    """The value of an `_encode`d entry; ValueError where its CRC-32 does not match (garbled, or an entry
    without one)."""
    data = bytes(blob)
    if len(data) < 5 or zlib.crc32(data[:-4]).to_bytes(4, "big") != data[-4:]:
        raise ValueError("an entry fails its CRC-32")
    return pickle.loads(data[:-4])


def checked_request_cache(lm) -> None:
    """Make the request cache lm-eval opens for `lm` (use_cache: sqlitedict, one sqlite file per rank) store each
    answer with a CRC-32 and check it when read. sqlite keeps no checksum of its own, so a flipped bit inside a
    stored log-likelihood would otherwise be read back as a plausible number. lm-eval hands its cache to the model
    through `set_cache_hook`, so the codec goes on there, before the first request is looked up."""
    if getattr(lm, "_checked_cache", False):
        return
    setter = lm.set_cache_hook

    def set_cache_hook(hook):
        if getattr(hook, "dbdict", None) is not None:
            hook.dbdict.encode, hook.dbdict.decode = _encode, _decode
        setter(hook)

    lm.set_cache_hook, lm._checked_cache = set_cache_hook, True


def request_cache_problem(db: Path) -> str | None:
    """None if an lm-eval request cache file opens as sqlite, passes sqlite's integrity check and every entry
    passes its CRC-32 (`_decode`); else what is wrong. A journal left by a kill is rolled back by the open."""
    import sqlite3

    try:
        with contextlib.closing(sqlite3.connect(db)) as con:
            check = con.execute("PRAGMA integrity_check").fetchall()
            if check != [("ok",)]:
                return f"sqlite integrity check: {check[0][0]}"
            if not con.execute("SELECT 1 FROM sqlite_master WHERE name = ?", (REQUEST_TABLE,)).fetchall():
                return None  # killed before sqlitedict made its table: nothing stored
            for key, value in con.execute(f'SELECT key, value FROM "{REQUEST_TABLE}"'):
                try:
                    _decode(value)
                except ValueError:
                    return f"entry {key[:16]} fails its CRC-32 (garbled, or written without one)"
    except sqlite3.DatabaseError as e:
        return f"not a readable sqlite database ({e})"
    return None


def drop_damaged_caches(folder: Path, task: str) -> None:
    """Before a unit resumes: remove each damaged request cache in its checkpoint folder, with one warning line
    naming the file and what is wrong, so the task's requests are asked again instead of read from it."""
    for db in sorted(folder.glob("requests_rank*.db")):
        problem = request_cache_problem(db)
        if problem is None:
            continue
        log.warning("%s: damaged lm-eval request cache (%s): removed, %s's requests are asked again", db, problem,
                    task)
        for path in (db, *(db.with_name(db.name + s) for s in ("-journal", "-wal", "-shm"))):
            path.unlink(missing_ok=True)


def _examples(task_obj, sample: dict) -> dict:
    """One document's row from lm-eval's logged sample, computed as lm-eval's multiple-choice `process_results`
    does: chosen = argmax of the choices' logliks, chosen_norm = argmax of logliks / choice length in characters,
    gold the target's index (for a task with the choices in the context, winogrande, `doc_to_text`). acc and
    acc_norm are the sample's own metrics (acc_norm None where the task has none)."""
    import numpy as np

    doc = sample["doc"]
    choices = task_obj.doc_to_choice(doc)
    lls = [float(resp[0]) for resp in sample["filtered_resps"]][: len(choices)]  # (loglik, is_greedy) per choice
    gold = task_obj.doc_to_text(doc) if task_obj.multiple_input else task_obj.doc_to_target(doc)
    gold = choices.index(gold) if isinstance(gold, str) else int(gold)
    lengths = np.array([float(len(c)) for c in choices])
    return {"doc_id": int(sample["doc_id"]), "acc": int(sample["acc"]),
            "acc_norm": int(sample["acc_norm"]) if "acc_norm" in sample else None, "gold": gold,
            "chosen": int(np.argmax(lls)), "chosen_norm": int(np.argmax(np.array(lls) / lengths)), "loglik": lls,
            "gold_loglik": lls[gold]}


def _lm_eval_version() -> str:
    from importlib.metadata import version

    return version("lm_eval")
