"""Evaluation stages. Each is `evaluate(model, tokenizer, cfg, dense=None, progress=None) -> list[dict]` with
fields stage, task, metric, value, stderr, n (samples behind the value), unit; the runner stamps the cell's
identity. `dense` (pruning cells only) returns the unpruned base model, which the speed stage measures alongside.
`progress` (bench.records.Progress) runs the stage's units (a corpus, a task) and keeps them across a kill.
Stages are independent: none reads another's output. Select them with `eval.stages=[ppl,zeroshot,speed]`.
`cost_notice` (bench/evals/cost.py) says up front what a full-size evaluation costs on a CPU."""

from bench.evals import perplexity, speed, zeroshot

STAGES = {
    "ppl": perplexity.evaluate,
    "zeroshot": zeroshot.evaluate,
    "speed": speed.evaluate,
}
