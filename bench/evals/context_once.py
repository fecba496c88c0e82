"""A context-once loglikelihood for lm-eval: each shared context is run through the model once per batch.

lm-eval's HFLM forwards every (context, continuation) request on its own, so a 4-choice question runs its context 4
times (only one-token continuations share a forward). `ContextOnceLM` keeps HFLM's tokenization (its
`_encode_pair`, trailing spaces moved to the continuation) and its input window per request,
`(context_enc + continuation_enc)[-(max_length + 1):][:-1]`, and packs the requests that share the part of that
window before the continuation into one row:

    row        p0 p1 p2 p3 | a0 a1 | b0 b1 b2        (prefix, then each continuation minus its last token)
    positions   0  1  2  3 |  4  5 |  4  5  6        (restart after the prefix)
    mask       causal in the prefix; a continuation sees the prefix and itself only

A continuation's log-probabilities are the prefix's last position followed by its own positions, exactly the
positions HFLM scores, so each request gets HFLM's (sum log-prob, is-greedy) up to float rounding (fp32: about
1e-6 a token, so up to about 1e-4 on a sum over a long continuation; `make bench-zeroshot` prints the largest).
Several rows (documents) go in one forward, right-padded; only the scored positions reach log_softmax. A request
whose input was left-truncated still packs: its prefix is then its own truncated window, so it has a row of its own.

Requests this cannot score exactly go to HFLM's own `_loglikelihood_tokens`, with a log line: all of them when the
attention implementation takes no additive 4D mask (only eager and sdpa do), and those whose input is longer than
a sliding window (the window would be measured along the packed row, not along positions). lm-eval's request cache
keeps working: every answer goes through `cache_hook.add_partial` as in HFLM.

    make_lm(model, tokenizer, batch_size=8, backend="context_once")   # or backend="hflm" for the stock one
"""

from __future__ import annotations

import inspect
import logging

import torch
import torch.nn.functional as F
from lm_eval.api.registry import register_model
from lm_eval.models.huggingface import HFLM
from tqdm import tqdm

log = logging.getLogger("bench.context_once")

BACKENDS = ("context_once", "hflm")
MASKED_ATTENTION = ("eager", "sdpa")  # implementations that add a custom 4D float mask to their scores


def make_lm(model, tokenizer, batch_size, backend: str = "context_once"):
    """The lm-eval model for the zero-shot stage: ContextOnceLM, or the stock HFLM (backend `hflm`)."""
    if backend not in BACKENDS:
        raise ValueError(f"eval.zeroshot.backend: {backend!r}; allowed values are {', '.join(BACKENDS)}")
    cls = ContextOnceLM if backend == "context_once" else HFLM
    return cls(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)


def sliding_window(config) -> int | None:
    """The window of the model's sliding-window layers, or None when it has none (Qwen2's unused window)."""
    window = getattr(config, "sliding_window", None)
    types = getattr(config, "layer_types", None)
    if not window or getattr(config, "use_sliding_window", True) is False or (
            types is not None and "sliding_attention" not in types):
        return None
    return int(window)


@register_model("hf-context-once")
class ContextOnceLM(HFLM):
    """HFLM whose loglikelihood runs each shared context once (module docstring); everything else is HFLM's."""

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, override_bs: int | None = None):
        """(sum log-prob, is-greedy) per ((context, continuation), context_enc, continuation_enc), in order."""
        impl = getattr(self.model.config, "_attn_implementation", None)
        window = sliding_window(self.model.config)
        plain, groups = [], {}
        for i, (_, ctx, cont) in enumerate(requests):
            assert len(ctx) > 0 and 0 < len(cont) <= self.max_length  # as HFLM
            inp = (ctx + cont)[-(self.max_length + 1):][:-1]
            if self.backend != "causal" or impl not in MASKED_ATTENTION or (window and len(inp) > window):
                plain.append(i)
            else:
                groups.setdefault(tuple(inp[:len(inp) - len(cont) + 1]), []).append(i)
        res = [None] * len(requests)
        if plain:
            log.info("context-once: %d of %d requests through HFLM (%s)", len(plain), len(requests),
                     f"attention {impl!r} takes no 4D mask" if impl not in MASKED_ATTENTION or self.backend != "causal"
                     else f"input longer than the sliding window {window}")
            for i, answer in zip(plain, super()._loglikelihood_tokens([requests[i] for i in plain], disable_tqdm,
                                                                      override_bs), strict=True):
                res[i] = answer
        rows = sorted(groups.items(), key=lambda g: -(len(g[0]) + sum(len(requests[i][2]) - 1 for i in g[1])))
        size = self._rows_per_forward(override_bs)
        pbar = tqdm(total=len(requests) - len(plain), disable=(disable_tqdm or (self.rank != 0)),
                    desc="Running loglikelihood requests (context once)")
        for start in range(0, len(rows), size):
            for i, answer in self._score_rows(rows[start:start + size], requests):
                res[i] = answer
                if requests[i][0] is not None:  # loglikelihood_rolling's windows are cached per document
                    self.cache_hook.add_partial("loglikelihood", requests[i][0], answer)
                pbar.update(1)
        pbar.close()
        return res

    def _rows_per_forward(self, override_bs) -> int:
        """Packed rows (documents) per forward: the batch size, or for `auto` the one HFLM detects."""
        if self.batch_size != "auto":
            return int(self.batch_size)
        if override_bs:
            return int(override_bs)
        if not getattr(self, "_auto_rows", None):
            self._auto_rows = self._detect_batch_size()
        return self._auto_rows

    def _score_rows(self, rows, requests):
        """One forward over packed rows [(prefix, request indices)]: yields (request index, (log-prob, greedy))."""
        ids, pos, seg, spans = [], [], [], []
        for prefix, members in rows:
            row_ids, row_pos, row_seg, span = list(prefix), list(range(len(prefix))), [0] * len(prefix), []
            for n, i in enumerate(members, 1):
                tail = requests[i][2][:-1]
                span.append((i, len(row_ids)))
                row_ids += tail
                row_pos += range(len(prefix), len(prefix) + len(tail))
                row_seg += [n] * len(tail)
            ids.append(row_ids), pos.append(row_pos), seg.append(row_seg), spans.append((len(prefix), span))
        width = max(map(len, ids))
        pad = [width - len(r) for r in ids]
        ids = torch.tensor([r + [0] * p for r, p in zip(ids, pad)], device=self.device)
        pos = torch.tensor([r + [0] * p for r, p in zip(pos, pad)], device=self.device)
        seg = torch.tensor([r + [-1] * p for r, p in zip(seg, pad)], device=self.device)
        keep = width - min(len(prefix) for prefix, _ in rows) + 1  # first scored position: a prefix's last
        logits = self._packed_call(ids, pos, seg, keep)
        offset = width - logits.shape[1]
        for (plen, span), row_logits in zip(spans, logits):
            last = row_logits[plen - 1 - offset]
            for i, at in span:
                cont = requests[i][2]
                scored = torch.cat([last[None], row_logits[at - offset:at - offset + len(cont) - 1]])
                logprobs = F.log_softmax(scored, dim=-1, dtype=self.softmax_dtype)
                target = torch.tensor(cont, device=self.device)
                greedy = bool((logprobs.argmax(dim=-1) == target).all())
                yield i, (float(logprobs.gather(1, target[:, None]).sum()), greedy)

    def _packed_call(self, ids, pos, seg, keep: int) -> torch.Tensor:
        """Logits [rows, >= keep last positions, vocab] of packed rows: segment 0 is the prefix (causal), segment n
        sees the prefix and itself, padding (-1) only itself."""
        n = ids.shape[1]
        causal = torch.ones(n, n, dtype=torch.bool, device=ids.device).tril()
        sq, sk = seg[:, :, None], seg[:, None, :]
        allowed = (causal & (sk >= 0) & ((sk == 0) | (sk == sq))) | torch.eye(n, dtype=torch.bool, device=ids.device)
        dtype = self.model.dtype if self.mixed_precision_dtype is None else self.mixed_precision_dtype
        mask = torch.zeros(allowed.shape, dtype=dtype, device=ids.device).masked_fill(
            ~allowed, torch.finfo(dtype).min)[:, None]
        kwargs = {"logits_to_keep": keep} if "logits_to_keep" in inspect.signature(self.model.forward).parameters \
            else {}
        with torch.no_grad(), torch.autocast(device_type=self.device.type, dtype=self.mixed_precision_dtype,
                                             enabled=self.mixed_precision_dtype is not None):
            return self.model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=False, **kwargs).logits
