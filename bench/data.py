"""Text data: the perplexity corpora and the calibration samples.

Two sources, one layout. With a data root (config `data_root`, env `BENCH_DATA`) the files are read from a local
directory laid out as ../shared/data (see its README); without one, the HF hub datasets the official code uses
are loaded (as on a GPU node):

    corpus      local file                                    hub dataset (official code)
    wikitext2   wikitext2/wiki.test.raw                       wikitext / wikitext-2-raw-v1, test, "text"
    ptb         ptb/ptb.valid.txt                             ptb_text_only / penn_treebank, validation, "sentence"

    calibration                                               hub dataset (the method's paper)
    bookcorpus  calibration/pride_and_prejudice_pg1342.txt    bookcorpus, train (Shortened LLaMA, LLM-Pruner)
    c4          (none: the novel stands in)                   allenai/c4 en shard 0, train (Wanda-sp)
    wikitext2   (none: the novel stands in)                   wikitext-2-raw-v1, train (FLAP, SliceGPT, SLEB)

BookCorpus is not redistributable and the local data holds no C4 or WikiText-2 train split; offline, a
public-domain novel stands in for all three and the recorded source says so.
"""

from __future__ import annotations

import logging
import random
from pathlib import Path

import torch

from bench import BenchError

log = logging.getLogger("bench.data")

LOCAL_FILES = {
    "wikitext2": "wikitext2/wiki.test.raw",
    "ptb": "ptb/ptb.valid.txt",
    "bookcorpus": "calibration/pride_and_prejudice_pg1342.txt",
}
BOOK_FRONT_MATTER_LINES = 672  # title page, preface, illustrations; the novel starts at line 673


def local_path(data_root: str | Path, name: str) -> Path:
    path = Path(data_root) / LOCAL_FILES[name]
    if not path.is_file():
        raise BenchError(f"missing data file {path}: set data_root (env BENCH_DATA) to a directory laid out as "
                         f"shared/data, or data_root=null to use the HF hub")
    return path


def text_rows(name: str, data_root: str | Path | None) -> tuple[list[str], str]:
    """The rows of a perplexity corpus, exactly as the HF dataset holds them, and where they came from."""
    if name not in ("wikitext2", "ptb"):
        raise BenchError(f"eval.ppl.datasets: {name!r} is not a corpus; allowed values are wikitext2, ptb")
    if data_root is None:
        from datasets import load_dataset

        if name == "wikitext2":
            return list(load_dataset(*HUB_WIKITEXT2, split="test")["text"]), "hub:wikitext-2-raw-v1"
        return list(_hub_parquet([HUB_PTB_VALIDATION], PTB_VALIDATION_ROWS)["sentence"]), "hub:ptb_text_only"
    path = local_path(data_root, name)
    lines = path.read_text(encoding="utf-8").split("\n")
    if lines and lines[-1] == "":
        lines.pop()  # the file's final newline ends the last line; it is not a row
    if name == "wikitext2":
        # HF rows: each content line with its newline, "" for each blank (" ") line (checked against a verbatim
        # copy of "\n\n".join(rows), see shared/data/README.md)
        rows = ["" if line.strip() == "" else line + "\n" for line in lines]
    else:
        rows = [line.strip() for line in lines]  # ptb_text_only: sentence = line.strip()
    return rows, f"local:{LOCAL_FILES[name]}"


CALIB_DATASETS = ("bookcorpus", "c4", "wikitext2")


def calibration_ids(tokenizer, dataset: str, n_samples: int, seq_len: int, seed: int,
                    data_root: str | Path | None) -> tuple[torch.Tensor, str]:
    """n_samples x seq_len token ids ([n, seq_len] LongTensor), seeded, and their source.

    Hub: BookCorpus and C4 follow the official samplers (shortened-llm src/dataset.py::get_examples, FLAP
    lib/data.py::get_c4): random distinct documents with at least seq_len tokens, one random window of each;
    WikiText-2 train is joined with " " and cut at random offsets (FLAP lib/data.py::get_wikitext2).
    Offline, the novel is one token stream and the windows are n random non-overlapping ones."""
    if dataset not in CALIB_DATASETS:
        raise BenchError(f"calib.dataset={dataset!r}: allowed values are {', '.join(CALIB_DATASETS)}")
    rng = random.Random(seed)
    if data_root is None:
        return _hub_calibration(tokenizer, dataset, n_samples, seq_len, rng)
    path = local_path(data_root, "bookcorpus")
    text = "\n".join(path.read_text(encoding="utf-8").split("\n")[BOOK_FRONT_MATTER_LINES:])
    ids = tokenizer(text, return_tensors="pt", add_special_tokens=False).input_ids[0]
    n_slots = len(ids) // seq_len
    if n_slots < n_samples:
        raise BenchError(f"calib.n_samples={n_samples}: {path} holds only {n_slots} windows of {seq_len} tokens")
    slots = sorted(rng.sample(range(n_slots), n_samples))
    source = f"local:{LOCAL_FILES['bookcorpus']}"
    if dataset != "bookcorpus":
        log.warning("no local %s: the novel stands in for it", dataset)
        source += f" (stand-in for {dataset})"
    return torch.stack([ids[s * seq_len:(s + 1) * seq_len] for s in slots]), source


# Hub sources (text_rows and _hub_calibration). datasets>=4 runs no loading scripts ("Dataset scripts are no longer
# supported", huggingface/datasets#7693), and datasets 5 with the huggingface_hub that transformers 5 needs (>=1.31)
# reads a repo through hf://datasets/<id>@<commit>, which takes only a namespaced id (bare "wikitext": HfUriError
# "Repository id must be 'namespace/name'"). The official code's load_dataset("wikitext" / "ptb_text_only" /
# "bookcorpus") fails on one count or both, so each corpus is read from parquet files holding the rows its loading
# script generated, in the same order:
#   wikitext2   Salesforce/wikitext (the canonical "wikitext" moved there), config wikitext-2-raw-v1: parquet on its
#               main branch since its "Convert dataset to Parquet (#8)" commit; column "text".
#   ptb         ptb-text-only/ptb_text_only is still a loading script; the hub's own parquet export of it (branch
#               refs/convert/parquet, penn_treebank/validation/0000.parquet): 3,370 rows, column "sentence".
#   bookcorpus  bookcorpus/bookcorpus is still a loading script on main; its "Convert dataset to Parquet" pull
#               request (refs/pr/6, commit d904700c: plain_text/train-0000{0..9}-of-00010.parquet, then the script
#               deleted) holds the script's 74,004,228 rows, column "text".
# Bounding datasets<4 instead would not do: pip pairs datasets 3.6 with the same huggingface_hub, bare ids included.
# The row counts are checked, so a changed source fails loudly instead of sampling other rows.
HUB_WIKITEXT2 = ("Salesforce/wikitext", "wikitext-2-raw-v1")
HUB_PTB_VALIDATION = ("hf://datasets/ptb-text-only/ptb_text_only@refs%2Fconvert%2Fparquet/"
                      "penn_treebank/validation/0000.parquet")
HUB_BOOKCORPUS = [f"hf://datasets/bookcorpus/bookcorpus@refs%2Fpr%2F6/plain_text/train-{i:05d}-of-00010.parquet"
                  for i in range(10)]
PTB_VALIDATION_ROWS, BOOKCORPUS_ROWS = 3370, 74_004_228


def _hub_parquet(files: list[str], n_rows: int):
    """The rows of these parquet files, in order, checked against the row count of the original dataset."""
    from datasets import load_dataset

    rows = load_dataset("parquet", data_files={"train": files}, split="train")
    if len(rows) != n_rows:
        raise BenchError(f"{files[0]}: {len(rows)} rows where the original dataset has {n_rows}")
    return rows


def _hub_calibration(tokenizer, dataset, n_samples, seq_len, rng) -> tuple[torch.Tensor, str]:
    from datasets import load_dataset

    if dataset == "wikitext2":
        text = " ".join(load_dataset(*HUB_WIKITEXT2, split="train")["text"])
        ids = tokenizer(text, return_tensors="pt").input_ids[0]
        starts = [rng.randint(0, len(ids) - seq_len - 1) for _ in range(n_samples)]
        return torch.stack([ids[i:i + seq_len] for i in starts]), "hub:wikitext-2-raw-v1/train"
    if dataset == "c4":
        rows = load_dataset("allenai/c4", data_files={"train": "en/c4-train.00000-of-01024.json.gz"}, split="train")
    else:
        rows = _hub_parquet(HUB_BOOKCORPUS, BOOKCORPUS_ROWS)
    samples, seen = [], set()
    while len(samples) < n_samples:
        i = rng.randint(0, len(rows) - 1)
        ids = tokenizer(rows[i]["text"], return_tensors="pt").input_ids[0]
        if len(ids) >= seq_len and i not in seen:
            seen.add(i)
            j = rng.randint(0, len(ids) - seq_len)
            samples.append(ids[j:j + seq_len])
    return torch.stack(samples), f"hub:{dataset}"
