"""Text data: the perplexity corpora and the calibration samples.

Two sources, one layout. With a data root (config `data_root`, env `BENCH_DATA`) the files are read from a local
directory laid out as ../shared/data (see its README); without one, the HF hub datasets the official code uses
are loaded (as on a GPU node):

    corpus      local file                                    hub dataset (official code)
    wikitext2   wikitext2/wiki.test.raw                       wikitext / wikitext-2-raw-v1, test, "text"
    ptb         ptb/ptb.valid.txt                             ptb_text_only / penn_treebank, validation, "sentence"
    bookcorpus  calibration/pride_and_prejudice_pg1342.txt    bookcorpus, train, "text"   (calibration only)

BookCorpus is not redistributable; offline, a public-domain novel stands in for it.
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
            return list(load_dataset("wikitext", "wikitext-2-raw-v1", split="test")["text"]), "hub:wikitext-2-raw-v1"
        return list(load_dataset("ptb_text_only", "penn_treebank", split="validation")["sentence"]), "hub:ptb_text_only"
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


def calibration_ids(tokenizer, dataset: str, n_samples: int, seq_len: int, seed: int,
                    data_root: str | Path | None) -> tuple[torch.Tensor, str]:
    """n_samples x seq_len token ids ([n, seq_len] LongTensor), seeded, and their source.

    Hub BookCorpus follows the official sampler (shortened-llm src/dataset.py::get_examples): random distinct rows
    with at least seq_len tokens (default special tokens), one random window of each. Offline, the novel is one
    token stream and the windows are n random non-overlapping ones."""
    if dataset != "bookcorpus":
        raise BenchError(f"calib.dataset={dataset!r}: allowed values are bookcorpus")
    rng = random.Random(seed)
    if data_root is None:
        from datasets import load_dataset

        rows = load_dataset("bookcorpus", split="train")
        samples, seen = [], set()
        while len(samples) < n_samples:
            i = rng.randint(0, len(rows) - 1)
            ids = tokenizer(rows[i]["text"], return_tensors="pt").input_ids[0]
            if len(ids) >= seq_len and i not in seen:
                seen.add(i)
                j = rng.randint(0, len(ids) - seq_len)
                samples.append(ids[j:j + seq_len])
        return torch.stack(samples), "hub:bookcorpus"
    path = local_path(data_root, dataset)
    text = "\n".join(path.read_text(encoding="utf-8").split("\n")[BOOK_FRONT_MATTER_LINES:])
    ids = tokenizer(text, return_tensors="pt", add_special_tokens=False).input_ids[0]
    n_slots = len(ids) // seq_len
    if n_slots < n_samples:
        raise BenchError(f"calib.n_samples={n_samples}: {path} holds only {n_slots} windows of {seq_len} tokens")
    slots = sorted(rng.sample(range(n_slots), n_samples))
    return torch.stack([ids[s * seq_len:(s + 1) * seq_len] for s in slots]), f"local:{LOCAL_FILES[dataset]}"
