"""Evaluation stages. Each is `evaluate(model, tokenizer, cfg) -> list[dict]` with fields
stage, task, metric, value, stderr, n (samples behind the value), unit; the runner stamps the cell's identity.
Stages are independent: none reads another's output. Select them with `eval.stages=[ppl]`."""

from bench.evals import perplexity, zeroshot

STAGES = {
    "ppl": perplexity.evaluate,
    "zeroshot": zeroshot.evaluate,
}
