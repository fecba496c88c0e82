"""Zero-shot benchmark: the context-once loglikelihood (bench.evals.context_once) against lm-eval's HFLM.

On a real model (default smollm2-135m, fp32, this device), the seven tasks with the first N documents each, both
backends in one process on the same model, alternating (HFLM first on even tasks, context-once first on odd
ones). Each run is lm-eval's `simple_evaluate` with samples logged, so the time is end to end and the per-request
loglikelihoods and the accuracies come from the same call. Prints per task: both times, the ratio, the largest
|loglikelihood difference| over all requests, whether every accuracy (acc, acc_norm) is equal; then one summary
line.

    make bench-zeroshot           # = python -m bench.benchmarks.zeroshot [--limit N] [--batch-size B] [model=...]
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

from bench.evals.context_once import make_lm
from bench.evals.zeroshot import TASKS, local_tasks, quiet_requests, task_manager


def run(lm, name: str, manager, limit: int):
    """(seconds, {metric: value}, [(loglikelihood, greedy)] per request in document order) of one task."""
    from lm_eval import simple_evaluate

    t0 = time.perf_counter()
    out = simple_evaluate(model=lm, tasks=[name], num_fewshot=0, limit=limit, task_manager=manager,
                          log_samples=True, random_seed=1234, numpy_random_seed=1234, torch_random_seed=1234)
    elapsed = time.perf_counter() - t0
    res = out["results"][name]
    accs = {m: res[f"{m},none"] for m in ("acc", "acc_norm") if f"{m},none" in res}
    samples = sorted(out["samples"][name], key=lambda s: s["doc_id"])
    answers = [tuple(r[0]) for s in samples for r in s["resps"]]
    return elapsed, accs, answers


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--limit", type=int, default=250, help="first N documents of each task (about 10 min)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("overrides", nargs="*", help="bench config overrides (model=..., device=...)")
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    from bench.config import compose
    from bench.models import load_model

    cfg = compose(["model=smollm2-135m", *args.overrides])
    model, tok = load_model(cfg.model, cfg.cache_dir, cfg.device, "float32")
    data_root = cfg.get("data_root") or None
    manager = task_manager(str(local_tasks(TASKS, data_root, Path(cfg.cache_dir) / "lm_eval_tasks")) if data_root
                           else None, tuple(sorted(TASKS)) if data_root else ())
    lms = {b: make_lm(model, tok, args.batch_size, b) for b in ("hflm", "context_once")}
    for lm in lms.values():
        quiet_requests(lm)
    total, worst, equal = {"hflm": 0.0, "context_once": 0.0}, 0.0, True
    print(f"zeroshot: {cfg.model.name}, first {args.limit} documents per task, batch {args.batch_size}, "
          f"{model.device}, fp32", flush=True)
    for n, task in enumerate(TASKS):
        name = f"{task}_local" if data_root else task
        order = ("hflm", "context_once") if n % 2 == 0 else ("context_once", "hflm")
        got = {b: run(lms[b], name, manager, args.limit) for b in order}
        (t_h, acc_h, ans_h), (t_c, acc_c, ans_c) = got["hflm"], got["context_once"]
        diff = max(abs(a[0] - b[0]) for a, b in zip(ans_h, ans_c, strict=True))
        same = acc_h == acc_c and all(a[1] == b[1] for a, b in zip(ans_h, ans_c))
        worst, equal = max(worst, diff), equal and same
        total["hflm"] += t_h
        total["context_once"] += t_c
        print(f"{task:14s} {len(ans_h):5d} requests  hflm {t_h:7.2f} s  context-once {t_c:7.2f} s  "
              f"{t_h / t_c:5.2f}x  max |dloglik| {diff:.2e}  accuracies equal: {'yes' if same else 'no'} "
              f"({', '.join(f'{m} {v:.4f}' for m, v in acc_h.items())})", flush=True)
    print(f"zeroshot: context-once {total['hflm'] / total['context_once']:.2f}x faster than HFLM over {len(TASKS)} "
          f"tasks, max |dloglik| {worst:.2e}, accuracies equal: {'yes' if equal else 'no'}")


if __name__ == "__main__":
    main()
