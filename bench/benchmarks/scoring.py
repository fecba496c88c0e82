"""Block-scoring benchmark on a real model (default smollm2-135m, fp32, CPU):

1. PPL criterion: the prefix-reusing, batched `ppl_scores` against the official loop (`ppl_scores_reference`: one
   full forward per candidate block and per sample), timed in one run on the same calibration ids; prints both
   wall times, the speed ratio and the largest relative score difference.
2. Taylor criterion: peak memory (max RSS of a fresh process) of `taylor_scores`, which folds each gradient into
   its block score and frees it, against a plain backward that keeps every gradient, both against the weights.

    make bench-scoring            # = python -m bench.benchmarks.scoring [model=...]
"""

from __future__ import annotations

import multiprocessing as mp
import resource
import os
import sys
import threading
import time

import torch


def _setup(overrides):
    from bench.config import compose
    from bench.data import calibration_ids
    from bench.models import load_model

    cfg = compose(overrides)
    model, tok = load_model(cfg.model, cfg.cache_dir, cfg.device, "float32")
    ids, _ = calibration_ids(tok, "bookcorpus", 10, 128, 1234, cfg.get("data_root") or None)
    return model, ids


def _rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


def _taylor_memory(overrides, mode, queue):
    """In a fresh process: RSS before scoring, peak RSS during it (sampled every millisecond), RSS after."""
    model, ids = _setup(overrides)
    before, peak, done = _rss_mib(), [0.0], threading.Event()

    def poll():
        while not done.is_set():
            peak[0] = max(peak[0], _rss_mib())
            time.sleep(0.001)

    poller = threading.Thread(target=poll)
    poller.start()
    if mode == "folded":
        from bench.methods.depth import taylor_scores

        taylor_scores(model, ids)
    else:  # what the official script does: a plain backward that keeps every gradient, then S = W * grad
        model(ids, labels=ids, use_cache=False).loss.backward()
    after = _rss_mib()
    done.set()
    poller.join()
    queue.put((before, max(peak[0], after), after))


def main(overrides: list[str]) -> None:
    from bench.methods.depth import ppl_scores, ppl_scores_reference
    from bench.models import count_params

    torch.set_grad_enabled(False)
    model, ids = _setup(overrides)
    print(f"model {model.config.name_or_path or 'model'}: {count_params(model):,} params, "
          f"{len(model.model.layers)} blocks, calibration {tuple(ids.shape)}, {torch.get_num_threads()} threads")
    ppl_scores(model, ids[:2])  # warm-up
    t0 = time.perf_counter()
    fast = ppl_scores(model, ids)
    t_fast = time.perf_counter() - t0
    print(f"PPL criterion, {len(fast)} candidate blocks x {len(ids)} samples")
    print(f"  prefix reuse + batch (bench)              {t_fast:7.1f} s")
    for rebuild, what in ((True, "official: rebuild per block, per sample"), (False, "per sample, no rebuild")):
        t0 = time.perf_counter()
        ref = ppl_scores_reference(model, ids, rebuild=rebuild)
        t_ref = time.perf_counter() - t0
        rel = max(abs(a - b) / abs(b) for a, b in zip(fast, ref))
        print(f"  {what:<41} {t_ref:7.1f} s   bench is {t_ref / t_fast:.2f}x faster, "
              f"max relative score difference {rel:.1e}")

    weights_mib = sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20
    del model
    # glibc keeps freed heap memory mapped; serving every allocation over 64 KiB with mmap makes RSS follow the
    # live tensors, so the sampled peak is the scoring's own.
    os.environ["MALLOC_MMAP_THRESHOLD_"] = "65536"
    ctx = mp.get_context("spawn")
    print(f"Taylor criterion memory, fresh process each (weights {weights_mib:.0f} MiB, RSS sampled every 1 ms)")
    for mode, what in (("folded", "taylor_scores (gradients folded, freed)"),
                       ("keep-grads", "plain backward keeping all gradients")):
        q = ctx.Queue()
        p = ctx.Process(target=_taylor_memory, args=(overrides, mode, q))
        p.start()
        before, peak, after = q.get()
        p.join()
        print(f"  {what:<40} before {before:5.0f} MiB   peak {peak:5.0f} MiB (+{peak - before:4.0f})   "
              f"after {after:5.0f} MiB (+{after - before:4.0f})")


if __name__ == "__main__":
    main(sys.argv[1:])
