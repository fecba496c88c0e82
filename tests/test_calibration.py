"""Calibration samplers (bench.data.SAMPLERS): each original's rule, re-derived here from its description with the
same RNG calls on a tiny synthetic corpus (byte tokenizer: one token per ASCII character, no special tokens by
default), and the BOS on every window that Gemma gets (shortened-llm --add_bos_to_every)."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from bench.data import SAMPLERS, calibration_ids
from bench.models import byte_tokenizer
from bench.runner import run_cell

TOK = byte_tokenizer()
BOS = TOK.bos_token_id
LENGTHS = [5, 40, 12, 50, 30, 60, 8, 45, 0, 31, 22, 70]
ROWS = ["".join(chr(97 + (7 * r + i) % 26) for i in range(n)) for r, n in enumerate(LENGTHS)]
L = 30


def enc(text: str) -> list[int]:
    return TOK(text, add_special_tokens=False).input_ids


def ids_of(texts) -> torch.Tensor:
    return torch.tensor([enc(t) for t in texts])


def shortened_llm_draws(seed: int, n: int = 4) -> list[tuple[int, int]]:
    """(row, offset) of each window by get_examples / get_bookcorpus: random.seed; row i = randint(0, N-1) until
    len >= L and unseen; offset j = randint(0, len-L)."""
    random.seed(seed)
    draws, seen = [], []
    for _ in range(n):
        while True:
            i = random.randint(0, len(ROWS) - 1)
            if len(ROWS[i]) >= L and i not in seen:
                seen.append(i)
                break
        draws.append((i, random.randint(0, len(ROWS[i]) - L)))
    return draws


def test_byte_tokenizer_is_one_token_per_character():
    assert [len(enc(r)) for r in ROWS] == LENGTHS and TOK("ab").input_ids == enc("ab")


@pytest.mark.parametrize("name,seed", [("shortened_llm", 1234), ("llm_pruner", 42)])
def test_shortened_llm_and_llm_pruner(name, seed):
    want = [ROWS[i][j:j + L] for i, j in shortened_llm_draws(seed)]
    assert torch.equal(SAMPLERS[name](ROWS, TOK, 4, L, seed), ids_of(want))


def test_flap_c4():
    # FLAP get_c4: random.seed; row i until len > L (repeats allowed); j = randint(0, len - L - 1)
    random.seed(0)
    want, picked = [], []
    for _ in range(9):  # more than the 6 rows longer than L
        while True:
            i = random.randint(0, len(ROWS) - 1)
            if len(ROWS[i]) > L:
                break
        j = random.randint(0, len(ROWS[i]) - L - 1)
        want.append(ROWS[i][j:j + L])
        picked.append(i)
    assert torch.equal(SAMPLERS["flap_c4"](ROWS, TOK, 9, L, 0), ids_of(want))
    assert len(set(picked)) < 9 and 4 not in picked  # repeats; the row of exactly L tokens never qualifies


def test_flap_wikitext2():
    # FLAP get_wikitext2: " ".join(rows) tokenized once; random.seed; n offsets randint(0, len - L - 1)
    text = " ".join(ROWS)
    random.seed(0)
    want = [text[i:i + L] for i in [random.randint(0, len(text) - L - 1) for _ in range(5)]]
    assert torch.equal(SAMPLERS["flap_wikitext2"](ROWS, TOK, 5, L, 0), ids_of(want))


def test_slicegpt():
    # prepare_dataloader: drop empty rows; torch.manual_seed(42); start = torch.randint(0, len(indices)); join the
    # consecutive rows from there with "\n\n" until >= L tokens; remove them from indices; keep the first L tokens;
    # then torch.manual_seed(42) again and the texts torch.randperm(len)[:n]
    data = [r for r in ROWS if r]
    torch.manual_seed(42)
    indices, texts = list(range(len(data))), []
    while len(texts) < 3 and indices:
        start = torch.randint(0, len(indices), (1,)).item()
        idx, text = start, ""
        while len(text) < L and idx < len(indices):
            text += ("\n\n" if text else "") + data[indices[idx]]
            idx += 1
        indices = indices[:start] + indices[idx:]
        if len(text) >= L:
            texts.append(text[:L])
    torch.manual_seed(42)
    want = [texts[k] for k in torch.randperm(len(texts))[:3].tolist()]
    state = torch.random.get_rng_state()
    assert torch.equal(SAMPLERS["slicegpt"](ROWS, TOK, 3, L, 42), ids_of(want))
    assert torch.equal(torch.random.get_rng_state(), state)  # a local generator: the global RNG is untouched


def test_slicegpt_returns_fewer_texts_when_the_rows_run_out():
    assert len(SAMPLERS["slicegpt"](ROWS, TOK, 50, L, 42)) < 50


def test_sleb():
    # get_wikitext2_trainenc: HF Dataset.shuffle(seed=0); first n rows joined with "\n\n"; consecutive L windows
    from datasets import Dataset

    shuffled = Dataset.from_dict({"text": ROWS}).shuffle(seed=0)[:6]["text"]
    text = "\n\n".join(shuffled)
    want = [text[k * L:(k + 1) * L] for k in range(len(text) // L)]
    assert shuffled == [ROWS[i] for i in np.random.default_rng(0).permutation(len(ROWS))[:6]]
    assert torch.equal(SAMPLERS["sleb"](ROWS, TOK, 6, L, 0), ids_of(want))


def test_shortgpt():
    # eval_importance: each row in 256 (here L) strides from token 0; the last, shorter stride dropped
    want = [r[s:s + L] for r in ROWS for s in range(0, len(r), L) if len(r[s:s + L]) == L]
    assert torch.equal(SAMPLERS["shortgpt"](ROWS, TOK, 0, L, 0), ids_of(want))
    assert torch.equal(SAMPLERS["shortgpt"](ROWS, TOK, 2, L, 0), ids_of(want[:2]))


def test_short_transformers():
    # analyse_layers: the first rows in order (here those with >= L tokens), their first L tokens
    want = [r[:L] for r in ROWS if len(r) >= L][:3]
    assert torch.equal(SAMPLERS["short_transformers"](ROWS, TOK, 3, L, 0), ids_of(want))


def test_bos_every_is_shortened_llms_rule():
    # --add_bos_to_every: tokenize without specials, same draws, window = [BOS] + ids[j:j + L - 1]
    want = [[BOS] + enc(ROWS[i][j:j + L - 1]) for i, j in shortened_llm_draws(1234)]
    assert torch.equal(SAMPLERS["shortened_llm"](ROWS, TOK, 4, L, 1234, bos_every=True), torch.tensor(want))


@pytest.mark.parametrize("name", sorted(SAMPLERS))
def test_every_sampler_puts_a_bos_on_every_window(name):
    n = {"shortgpt": 0, "sleb": 6}.get(name, 3)
    plain, bos = (SAMPLERS[name](ROWS, TOK, n, L, 7, bos_every=b) for b in (False, True))
    assert (bos[:, 0] == BOS).all() and bos.shape[1] == L
    if name != "slicegpt":  # the same windows, shifted right by the BOS
        assert torch.equal(bos[:, 1:], plain[:, :-1])


def test_default_draws_are_unchanged(data_root):
    # sampler=None offline: the novel as one token stream, n random non-overlapping slots (random.Random(seed))
    text = "\n".join((data_root / "calibration/pride_and_prejudice_pg1342.txt").read_text().split("\n")[672:])
    ids = torch.tensor(enc(text))
    slots = sorted(random.Random(5).sample(range(len(ids) // 16), 4))
    got, source = calibration_ids(TOK, "bookcorpus", 4, 16, 5, data_root)
    assert torch.equal(got, torch.stack([ids[s * 16:(s + 1) * 16] for s in slots]))
    assert source == "local:calibration/pride_and_prejudice_pg1342.txt"
    bos, _ = calibration_ids(TOK, "bookcorpus", 4, 16, 5, data_root, bos_every=True)
    assert (bos[:, 0] == BOS).all() and torch.equal(bos[:, 1:], got[:, :-1])


def test_named_sampler_offline_says_it_is_a_stand_in(data_root):
    got, source = calibration_ids(TOK, "wikitext2", 4, 64, 0, data_root, sampler="sleb")
    assert got.shape[1] == 64 and source.endswith("(stand-in for wikitext2)")


def test_gemma_calibration_has_a_bos_on_every_window(cfg_for):
    out = run_cell(cfg_for("model=tiny-gemma3", "method=depth_ppl", "ratio=0.25", "eval.ppl.max_windows=1"))
    calib = torch.load(out / "calib.pt")
    assert calib.ndim == 2 and (calib[:, 0] == BOS).all()
