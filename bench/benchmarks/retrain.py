"""Retraining throughput and memory: tokens/s and peak host RSS of lora, kd and cpt on one depth-pruned model
(default smollm2-135m at 20%, magnitude+ blocks: no calibration), eager fp32 and (kd, cpt) bf16 autocast, one line
per regime and precision.

    make bench-retrain            # = python -m bench.benchmarks.retrain [--tokens N] [overrides...]

Each regime trains a fresh copy of the pruned model for --tokens target tokens (kd / cpt: packed corpus sequences;
lora: Alpaca label tokens, the same budget), in this process, one after the other; the peak is the process's
VmHWM reset before each run (bench.memory), so it includes the weights already loaded (the base model = the kd
teacher, and the student copy). LoRA runs in fp32 only (its recipe has no autocast).
"""

from __future__ import annotations

import argparse
import copy
import json
import logging

import torch

from bench.benchmarks import command_line

log = logging.getLogger("bench.bench_retrain")


def main(argv: list[str]) -> None:
    from bench.budget import resolve_budget
    from bench.config import compose
    from bench.memory import StagePeak
    from bench.methods import build_method
    from bench.retrain import retrain
    from bench.runner import base_model

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=4096, help="target tokens per run (default 4096)")
    args, overrides = parser.parse_known_args(argv)
    results = []
    for regime, autocast in (("lora", "none"), ("kd", "none"), ("kd", "bf16"), ("cpt", "none"), ("cpt", "bf16")):
        cfg = compose(["model=smollm2-135m", "method=depth_magnitude", "ratio=0.2", f"retrain={regime}",
                       f"retrain.tokens={args.tokens}", "lora.val_size=0", "lora.warmup_steps=0",
                       "lora.micro_batch=4", "lora.grad_accum=4", "lora.cutoff_len=128",
                       *([] if regime == "lora" else [f"retrain.autocast={autocast}", "retrain.evals=1",
                                                      "retrain.val_sequences=4", "retrain.checkpoint_s=1e9"]),
                       *overrides])
        base, tok = base_model(cfg)
        method = build_method(cfg.method, "matched")
        student = copy.deepcopy(base)
        budget = resolve_budget(student, float(cfg.ratio))
        plan = method.plan(method.score(student, None, budget), budget, student)
        method.apply(student, plan)
        with StagePeak(torch.device("cpu")) as peak:
            _, summary = retrain(student, tok, cfg, teacher=base, plan=plan)
        rss = next(r["value"] for r in peak.rows("retrain") if r["metric"] == "peak_host_rss_mib")
        tokens = summary["tokens_trained"]
        results.append({"regime": regime, "precision": "fp32" if autocast == "none" else "bf16 autocast",
                        "tokens": tokens, "train_s": round(summary["train_s"], 1),
                        "tokens_per_s": round(tokens / summary["train_s"], 1), "peak_host_rss_mib": round(rss)})
        r = results[-1]
        print(f"{regime:5s} {r['precision']:14s} {tokens:7d} tokens in {r['train_s']:7.1f} s: "
              f"{r['tokens_per_s']:8.1f} tokens/s, peak host RSS {r['peak_host_rss_mib']} MiB", flush=True)
    print(json.dumps({"model": cfg.model.name, "threads": torch.get_num_threads(), "runs": results}))


if __name__ == "__main__":
    command_line(main, logging.WARNING)
