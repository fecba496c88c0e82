"""Speed benchmark: dense and pruned models measured *together*, interleaved round by round.

Builds the base model once, then one pruned copy per method x ratio, from the plan.json of an earlier run
(`--plans DIR`, laid out as a sweep's results) or, in shape-only mode, from the method's structural plan
(depth: k blocks; width: the uniform per-layer heads and channels). All of them are measured by
bench.evals.speed.measure in the same rounds, so the machine's drift falls on all alike. Prints tokens/s, the
speedup against dense and its fraction of the ideal (dense non-embedding params / pruned non-embedding
params), and the roofline fraction at batch 1; writes records.jsonl and throughput / speedup plots to --out.

    make bench-speed     # smollm2-135m on this CPU, plans of results/default, eager and compiled runtimes
    python -m bench.benchmarks.speed --methods dense,depth_ppl,llm_pruner --ratios 0.2,0.35 --out /tmp/speed7b \\
        model=llama-7b shape_only=true dtype=bfloat16 eval.speed.batch_sizes=[1,4,16,64,256] \\
        eval.speed.new_tokens=[128]    # on a GPU: the llama-7b shape, speed only (make gpu-check: every stage)
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import time
from pathlib import Path

import torch

from bench import BenchError
from bench.benchmarks import command_line

log = logging.getLogger("bench.bench_speed")

def non_embedding_params(model) -> int:
    embed = model.get_input_embeddings().weight
    head = model.get_output_embeddings().weight
    return sum(p.numel() for p in model.parameters()) - embed.numel() - (0 if head is embed else head.numel())


def build_models(cfg, methods: list[str], ratios: list[float], plans: Path | None) -> tuple[dict, dict, object]:
    """({label: model}, {label: identity}, tokenizer); dense first."""
    from bench.budget import achieved, resolve_budget
    from bench.config import compose
    from bench.methods import build_method
    from bench.models import count_params, load_model
    from bench.runner import cell_dir, saved_plan

    base, tokenizer = load_model(cfg.model, cfg.cache_dir, cfg.device, cfg.dtype, bool(cfg.shape_only))
    dense_params, dense_ne = count_params(base), non_embedding_params(base)
    models, ident = {}, {}
    for name in methods:
        method = build_method(compose([f"method={name}"]).method)
        for ratio in ratios if method.prunes else [0.0]:
            label = method.label if not method.prunes else f"{method.label} {ratio:g}"
            plan_file = None
            if not method.prunes:
                model, plan = base, method.plan(None, None)
            else:
                model = copy.deepcopy(base)
                budget = resolve_budget(model, ratio)
                path = plans and cell_dir(cfg, method.label, ratio).relative_to(cfg.out_dir)
                if plans is not None and (plans / path / "plan.json").is_file():
                    plan_file = str(plans / path / "plan.json")
                    plan = saved_plan(plan_file, method, budget, structure_only=True)
                elif cfg.shape_only:
                    plan = method.plan(None, budget, model)
                else:
                    raise BenchError(f"--plans: no {plans / path / 'plan.json'}; run that cell first (make sweep) "
                                     f"or use shape_only=true")
                method.apply(model, plan)
            params = count_params(model)
            models[label] = model
            ident[label] = {"model": cfg.model.name, "method": method.label, "kind": plan.kind, "ratio": ratio,
                            "params": params, "dense_params": dense_params, "plan_file": plan_file,
                            "mode": "shape_only" if cfg.shape_only else "weights",
                            "ideal_speedup": dense_ne / non_embedding_params(model)}
            if method.prunes:
                ident[label] |= achieved(budget, params)
    return models, ident, tokenizer


def run(cfg, methods, ratios, plans, out: Path) -> list[dict]:
    from bench.evals import speed
    from bench.records import write_records
    from bench.runner import provenance

    if "compiled" in cfg.eval.speed.runtimes:
        speed._compile_limits()
    torch.manual_seed(int(cfg.seed))
    models, ident, tokenizer = build_models(cfg, methods, ratios, plans)
    first = next(iter(models.values()))
    ids = speed.prompt_ids(tokenizer, cfg.eval.speed, first, first.device)
    t0 = time.perf_counter()
    rows = speed.measure(models, ids, cfg.eval.speed, reference="dense" if "dense" in models else None)
    prov = provenance(cfg, first.device, first.dtype) | {"bench_wall_s": time.perf_counter() - t0}
    rows = [ident[r["model_label"]] | {"stage": "speed", "task": "generate"} | r | prov for r in rows]
    write_records(out / "records.jsonl", rows)
    return rows


def summary_table(rows: list[dict]):
    """label x runtime x batch: tokens/s, speedup, fraction of the ideal speedup, roofline fraction (batch 1)."""
    import pandas as pd

    df = pd.DataFrame(rows)
    df = df[df.status == "ok"]
    keys = ["model_label", "runtime", "new_tokens", "batch_size"]
    wide = df.pivot_table(index=keys, columns="metric", values="value", aggfunc="first").reset_index()
    spread = df[df.metric == "speedup"].set_index(keys)["std"].rename("speedup_std")
    wide = wide.join(spread, on=keys)
    ideal = df.groupby("model_label")["ideal_speedup"].first()
    wide["ideal_speedup"] = wide.model_label.map(ideal)
    wide["frac_of_ideal"] = wide.get("speedup") / wide.ideal_speedup
    cols = [c for c in keys + ["throughput_tok_s", "latency_s", "speedup", "speedup_std", "ideal_speedup",
                               "frac_of_ideal", "roofline_frac", "peak_mem_mib"] if c in wide]
    wide["model_label"] = pd.Categorical(wide.model_label, categories=list(dict.fromkeys(df.model_label)))
    return wide[cols].sort_values(["runtime", "new_tokens", "batch_size", "model_label"]).reset_index(drop=True)


def plot(rows: list[dict], out: Path) -> list[Path]:
    """Throughput and speedup vs batch size (log x), one figure each per runtime x output length."""
    import pandas as pd

    from bench.plots import per_batch, pyplot

    plt, df = pyplot(), pd.DataFrame(rows)
    df = df[df.status == "ok"]
    paths = []
    for (runtime, n), part in df.groupby(["runtime", "new_tokens"]):
        paths += per_batch(plt, part, "throughput_tok_s", "generated tokens / s", out, f"throughput_{runtime}_out{n}")
        paths += per_batch(plt, part, "speedup", "speedup vs dense (interleaved; bars: std)", out,
                           f"speedup_{runtime}_out{n}")
    return paths


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", default="dense,depth_ppl,llm_pruner,wanda_sp,flap")
    parser.add_argument("--ratios", default="0.2")
    parser.add_argument("--plans", type=Path, default=None, help="a sweep's results dir holding plan.json files")
    parser.add_argument("--out", type=Path, default=Path("results/bench-speed"))
    args, overrides = parser.parse_known_args(argv)
    from bench.config import compose

    cfg = compose(overrides)
    args.out.mkdir(parents=True, exist_ok=True)
    rows = run(cfg, args.methods.split(","), [float(r) for r in args.ratios.split(",")], args.plans, args.out)
    table = summary_table(rows)
    text = table.to_string(index=False, float_format=lambda v: f"{v:.3f}")
    (args.out / "summary.txt").write_text(text + "\n")
    print(text)
    ooms = [(r["model_label"], r["batch_size"]) for r in rows if r["status"] == "oom"]
    if ooms:
        print("out of memory:", ooms)
    for path in plot(rows, args.out):
        print(path)
    print(json.dumps({"wall_s": rows[0]["bench_wall_s"], "device": rows[0]["device_name"], "dtype": rows[0]["dtype"],
                      "threads": rows[0]["threads"]}))


if __name__ == "__main__":
    command_line(main)
