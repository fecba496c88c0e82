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
    pg19        (none: the novel stands in)                   emozilla/pg19, validation (ShortGPT)

BookCorpus is not redistributable and the local data holds no C4, WikiText-2 train or PG-19 split; offline, a
public-domain novel stands in for all four and the recorded source says so.

How windows are drawn: `calib.sampler` names one original's rule (SAMPLERS: shortened_llm, llm_pruner,
flap_c4, flap_wikitext2, slicegpt, sleb, shortgpt, short_transformers; protocol=native), each a function of the
corpus's text rows with that code's RNG and seed; offline the rows are the novel cut into paragraphs, chapters
or one book (`book_rows`). None keeps the default draws (`calibration_ids`).
"""

from __future__ import annotations

import logging
import random
from pathlib import Path

import numpy as np
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


CALIB_DATASETS = ("bookcorpus", "c4", "wikitext2", "pg19")


def calibration_ids(tokenizer, dataset: str, n_samples: int, seq_len: int, seed: int,
                    data_root: str | Path | None, sampler: str | None = None,
                    bos_every: bool = False) -> tuple[torch.Tensor, str]:
    """n_samples x seq_len token ids ([n, seq_len] LongTensor), seeded, and their source.

    sampler=None (the default, unchanged so cached scores hold): on the hub, BookCorpus and C4 follow shortened-llm
    src/dataset.py::get_examples (random distinct documents with at least seq_len tokens, one random window of
    each) and WikiText-2 train is joined with " " and cut at random offsets (FLAP lib/data.py::get_wikitext2);
    offline, the novel is one token stream and the windows are n random non-overlapping ones.

    sampler=<name> (SAMPLERS, protocol=native): that original's rule on the dataset's rows (hub) or on the novel
    cut into rows (offline stand-in, `book_rows`); SLEB and ShortGPT return as many windows as their rule gives
    (see their samplers). bos_every: every window is [BOS] + seq_len - 1 tokens (`_window`)."""
    if dataset not in CALIB_DATASETS:
        raise BenchError(f"calib.dataset={dataset!r}: allowed values are {', '.join(CALIB_DATASETS)}")
    if sampler is not None or (bos_every and data_root is None):
        name = sampler or DEFAULT_SAMPLER[dataset]  # the hub default's own rule, with the BOS
        if name not in SAMPLERS:
            raise BenchError(f"calib.sampler={sampler!r}: allowed values are {', '.join(sorted(SAMPLERS))}")
        if data_root is None:
            rows, source = _hub_rows(dataset)
        else:
            rows, source = book_rows(data_root, dataset), f"local:{LOCAL_FILES['bookcorpus']}"
            if dataset != "bookcorpus":
                log.warning("no local %s: the novel stands in for it", dataset)
                source += f" (stand-in for {dataset})"
        ids = SAMPLERS[name](rows, tokenizer, n_samples, seq_len, seed, bos_every)
        return ids, source  # the runner records calib_sampler and calib_bos_every beside it
    rng = random.Random(seed)
    if data_root is None:
        return _hub_calibration(tokenizer, dataset, n_samples, seq_len, rng)
    if dataset == "pg19":
        raise BenchError("calib.dataset=pg19 needs calib.sampler (shortgpt)")
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
    return torch.stack([_window(tokenizer, ids, s * seq_len, seq_len, bos_every) for s in slots]), source


# ---- The originals' calibration samplers (protocol=native). Each takes the corpus as a list of text rows (HF rows
# on the hub, the novel cut by `book_rows` offline) and draws with the original's RNG and seed. BOS: the original's
# own tokenization (tokenizer defaults, so a leading BOS where the tokenizer adds one) unless bos_every, where every
# row is tokenized without special tokens and each seq_len window the rule picks becomes [BOS] + its first
# seq_len - 1 tokens: shortened-llm src/dataset.py::get_examples with --add_bos_to_every (the official Gemma
# scripts, script/prune_gemma-*_yesBOS.sh), applied to every sampler.

def _ids(tok, text: str, bos_every: bool) -> torch.Tensor:
    return tok(text, return_tensors="pt", add_special_tokens=not bos_every).input_ids[0]


def _window(tok, ids: torch.Tensor, start: int, seq_len: int, bos_every: bool) -> torch.Tensor:
    win = ids[start:start + seq_len]
    if bos_every:  # shortened-llm: torch.cat([bos], ids[j:j + seq_len][:-1])
        win = torch.cat([torch.tensor([tok.bos_token_id]), win[:-1]])
    return win


def _distinct_long_rows(rows, tok, n, seq_len, seed, bos_every) -> torch.Tensor:
    """n times: draw row i = randint(0, len - 1) until it has >= seq_len tokens and was not taken before, then one
    window at j = randint(0, len(ids) - seq_len). python `random` seeded with `seed` (the scripts' set_seed)."""
    rng, taken, out, tries = random.Random(seed), set(), [], 0
    for _ in range(n):
        while True:
            tries += 1
            if tries > 100 * len(rows) + 100_000:
                raise BenchError(f"calibration: fewer than {n} distinct rows with >= {seq_len} tokens")
            i = rng.randint(0, len(rows) - 1)
            ids = _ids(tok, rows[i], bos_every)
            if len(ids) >= seq_len and i not in taken:
                taken.add(i)
                break
        out.append(_window(tok, ids, rng.randint(0, len(ids) - seq_len), seq_len, bos_every))
    return torch.stack(out)


def sample_shortened_llm(rows, tok, n, seq_len, seed, bos_every=False) -> torch.Tensor:
    """Shortened LLaMA, shortened-llm src/dataset.py::get_examples (BookCorpus, 10 x 128, seed 1234): distinct
    random rows with >= seq_len tokens, one random window each (`_distinct_long_rows`); --add_bos_to_every is
    its own BOS rule (`_window`)."""
    return _distinct_long_rows(rows, tok, n, seq_len, seed, bos_every)


def sample_llm_pruner(rows, tok, n, seq_len, seed, bos_every=False) -> torch.Tensor:
    """LLM-Pruner, LLMPruner/datasets/example_samples.py::get_bookcorpus (hf_prune.py: 10 x 64, seed 42 through
    set_random_seed): the same rule as shortened-llm's (which copied it); no BOS option of its own."""
    return _distinct_long_rows(rows, tok, n, seq_len, seed, bos_every)


def sample_flap_c4(rows, tok, n, seq_len, seed, bos_every=False) -> torch.Tensor:
    """Wanda-sp, FLAP lib/data.py::get_c4 (128 x 128, seed 0; random.seed(seed)): n times, draw row i =
    randint(0, len - 1) until it has MORE than seq_len tokens (repeats allowed), then the window at
    j = randint(0, len(ids) - seq_len - 1)."""
    rng, out = random.Random(seed), []
    for _ in range(n):
        for _try in range(100 * len(rows) + 100_000):
            ids = _ids(tok, rows[rng.randint(0, len(rows) - 1)], bos_every)
            if len(ids) > seq_len:
                break
        else:
            raise BenchError(f"calibration: no row with more than {seq_len} tokens")
        out.append(_window(tok, ids, rng.randint(0, len(ids) - seq_len - 1), seq_len, bos_every))
    return torch.stack(out)


def sample_flap_wikitext2(rows, tok, n, seq_len, seed, bos_every=False) -> torch.Tensor:
    """FLAP, lib/data.py::get_wikitext2 (1024 x 128 in scripts/llama_7b.sh, seed 0; random.seed(seed)): the rows
    joined with " " and tokenized once, n windows at j = randint(0, len(ids) - seq_len - 1) (overlaps allowed)."""
    ids, rng = _ids(tok, " ".join(rows), bos_every), random.Random(seed)
    return torch.stack([_window(tok, ids, rng.randint(0, len(ids) - seq_len - 1), seq_len, bos_every)
                        for _ in range(n)])


def sample_slicegpt(rows, tok, n, seq_len, seed, bos_every=False) -> torch.Tensor:
    """SliceGPT, TransformerCompression src/slicegpt/data_utils.py::prepare_dataloader (run_slicegpt.py defaults:
    128 x 2048, seed 42, varied_seqlen off). Empty rows dropped; torch.manual_seed(seed); until n texts: start =
    torch.randint(0, len(indices)), append tokenizer.tokenize of the consecutive rows from there (joined by "\n\n")
    until >= seq_len tokens or the rows run out, drop those rows from `indices`, keep the text of the first seq_len
    tokens (convert_tokens_to_string) if it reached seq_len. Then torch.manual_seed(seed) again and the texts
    torch.randperm(len)[:n] are tokenized (tokenizer defaults, truncated to seq_len). The original's
    SubsetRandomSampler then visits them in an order drawn from the global torch RNG; the set is the same and
    SliceGPT's PCA sums over it, so the randperm order is kept. A local torch.Generator gives the same draws as
    the global one seeded the same way."""
    texts = [r for r in rows if len(r) > 0]
    g, indices, joined = torch.Generator().manual_seed(seed), list(range(len(texts))), []
    while len(joined) < n and indices:
        start = int(torch.randint(0, len(indices), (1,), generator=g))
        idx, tokens = start, []
        while len(tokens) < seq_len and idx < len(indices):
            tokens += tok.tokenize(("\n\n" if tokens else "") + texts[indices[idx]])
            idx += 1
        indices = indices[:start] + indices[idx:]
        if len(tokens) >= seq_len:
            joined.append(tok.convert_tokens_to_string(tokens[:seq_len]))
    order = torch.randperm(len(joined), generator=torch.Generator().manual_seed(seed))[:n].tolist()
    out = []
    for k in order:
        if bos_every:
            ids = _window(tok, _ids(tok, joined[k], True), 0, seq_len, True)
        else:
            ids = tok(joined[k], return_tensors="pt", truncation=True, max_length=seq_len).input_ids[0]
        if len(ids) < seq_len:  # the re-tokenized text came out shorter; the original pads (padding="longest")
            log.warning("slicegpt calibration: a text re-tokenized to %d < %d tokens, padded", len(ids), seq_len)
            pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
            ids = torch.cat([ids, torch.full((seq_len - len(ids),), pad, dtype=ids.dtype)])
        out.append(ids)
    if not out:
        raise BenchError(f"calibration: the rows give no text of {seq_len} tokens")
    if len(out) < n:  # the original stops when the rows run out, with fewer samples
        log.warning("slicegpt calibration: the rows give %d texts of %d tokens, not %d", len(out), seq_len, n)
    return torch.stack(out)


def sample_sleb(rows, tok, n, seq_len, seed, bos_every=False) -> torch.Tensor:
    """SLEB, utils/data_utils.py::get_wikitext2_trainenc + sleb.py::get_loss (nsamples 128, seqlen 2048, seed 0):
    the rows shuffled as HF `Dataset.shuffle(seed)` does (numpy default_rng(seed).permutation), the first n ROWS
    joined with "\n\n" and tokenized once, cut into consecutive seq_len windows (the tail dropped). n counts rows,
    not windows: the number of windows is whatever those rows hold."""
    perm = np.random.default_rng(seed).permutation(len(rows))[:n]
    ids = _ids(tok, "\n\n".join(rows[int(i)] for i in perm), bos_every)
    if len(ids) < seq_len:
        raise BenchError(f"calibration: {n} rows hold {len(ids)} tokens, less than one window of {seq_len}")
    return torch.stack([_window(tok, ids, k * seq_len, seq_len, bos_every) for k in range(len(ids) // seq_len)])


def sample_shortgpt(rows, tok, n, seq_len, seed, bos_every=False) -> torch.Tensor:
    """ShortGPT, shortgpt/shortgpt.py::eval_importance + run_shortgpt.py (PG-19 validation, stride 256): every row
    (a book) tokenized and fed in consecutive non-overlapping seq_len strides from token 0. The original also feeds
    each book's last, shorter stride; windows here are full, so it is dropped. Its DataLoader shuffles the books
    with an unseeded generator; Block Influence is a sum, so the rows' order is kept and seed is unused. n = 0:
    every stride (the original); n > 0: the first n."""
    out = []
    for row in rows:
        ids = _ids(tok, row, bos_every)
        out += [_window(tok, ids, s, seq_len, bos_every) for s in range(0, len(ids) - seq_len + 1, seq_len)]
        if 0 < n <= len(out):
            return torch.stack(out[:n])
    if not out:
        raise BenchError(f"calibration: no row holds {seq_len} tokens")
    return torch.stack(out)


def sample_short_transformers(rows, tok, n, seq_len, seed, bos_every=False) -> torch.Tensor:
    """Angular distance (Gromov et al.; no official code), melisa-writer/short-transformers
    short_transformer.py::analyse_layers and its README example (C4 validation, limit 100, max_length 1000): the
    first rows in order, each tokenized and truncated to max_length; no shuffling, no seed. Windows here are
    equal-length, so rows shorter than seq_len are skipped: the first n rows with >= seq_len tokens, their first
    seq_len tokens."""
    out = []
    for row in rows:
        ids = _ids(tok, row, bos_every)
        if len(ids) >= seq_len:
            out.append(_window(tok, ids, 0, seq_len, bos_every))
            if len(out) == n:
                return torch.stack(out)
    raise BenchError(f"calibration: only {len(out)} rows with >= {seq_len} tokens, not {n}")


SAMPLERS = {
    "shortened_llm": sample_shortened_llm,
    "llm_pruner": sample_llm_pruner,
    "flap_c4": sample_flap_c4,
    "flap_wikitext2": sample_flap_wikitext2,
    "slicegpt": sample_slicegpt,
    "sleb": sample_sleb,
    "shortgpt": sample_shortgpt,
    "short_transformers": sample_short_transformers,
}
# sampler=None with bos_every: the rule the default draws on the hub for that dataset
DEFAULT_SAMPLER = {"bookcorpus": "shortened_llm", "c4": "shortened_llm", "wikitext2": "flap_wikitext2",
                   "pg19": "shortgpt"}


def book_rows(data_root, dataset: str) -> list[str]:
    """The novel (after its front matter) as the rows of the corpus it stands in for. Paragraphs are the blocks
    between blank lines, their line breaks turned into spaces (a text without blank lines: its lines).
    wikitext2: one row per paragraph (WikiText rows are paragraphs). bookcorpus, c4: one row per chapter
    (paragraphs joined with "\n\n"; a paragraph starting with "CHAPTER" opens one; a text without such headings:
    groups of 20 paragraphs), long documents as the samplers that need rows of at least seq_len tokens expect
    (BookCorpus rows are sentences, most shorter than 128 tokens: the original's filter keeps the long ones).
    pg19: the whole novel as one row (PG-19 rows are whole books)."""
    text = "\n".join(local_path(data_root, "bookcorpus").read_text(encoding="utf-8")
                     .split("\n")[BOOK_FRONT_MATTER_LINES:])
    blocks = text.split("\n\n") if "\n\n" in text.strip() else text.split("\n")
    paragraphs = [" ".join(p.split()) for p in blocks if p.strip()]
    if dataset == "wikitext2":
        return paragraphs
    if dataset == "pg19":
        return ["\n\n".join(paragraphs)]
    if not any(p.startswith("CHAPTER") for p in paragraphs):
        return ["\n\n".join(paragraphs[i:i + 20]) for i in range(0, len(paragraphs), 20)]
    chapters: list[list[str]] = [[]]
    for p in paragraphs:
        if p.startswith("CHAPTER") and chapters[-1]:
            chapters.append([])
        chapters[-1].append(p)
    return ["\n\n".join(c) for c in chapters]


class _Column:
    """One text column of a hub dataset, read row by row (BookCorpus: 74M rows, not materialized)."""

    def __init__(self, rows, key="text"):
        self.rows, self.key = rows, key

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, i):
        return self.rows[i][self.key]

    def __iter__(self):
        return (row[self.key] for row in self.rows)


def _hub_rows(dataset: str):
    """The text rows of a calibration dataset on the hub (the files `_hub_calibration` reads; PG-19 validation as
    ShortGPT's run_shortgpt.py loads it)."""
    from datasets import load_dataset

    if dataset == "wikitext2":
        return list(load_dataset(*HUB_WIKITEXT2, split="train")["text"]), "hub:wikitext-2-raw-v1/train"
    if dataset == "c4":
        rows = load_dataset("allenai/c4", data_files={"train": "en/c4-train.00000-of-01024.json.gz"}, split="train")
    elif dataset == "pg19":
        rows = load_dataset(HUB_PG19, split="validation")
    else:
        rows = _hub_parquet(HUB_BOOKCORPUS, BOOKCORPUS_ROWS)
    return _Column(rows), f"hub:{dataset}"


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
HUB_PG19 = "emozilla/pg19"  # ShortGPT run_shortgpt.py: load_dataset("emozilla/pg19", split="validation")


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
