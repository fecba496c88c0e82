# bench: width vs depth pruning benchmark.  `make sweep` (the embedded default) and `make test` work on a fresh
# machine: they create .venv, install torch first (a bare `torch` requirement pulls a multi-GB CUDA build), then
# the package, then run.
#
# On a GPU node with CUDA torch already installed: make sweep VENV_FLAGS=--system-site-packages
# Another torch: make setup TORCH='torch==2.5.1'

PYTHON ?= python3
VENV ?= .venv
VENV_FLAGS ?=
TORCH ?= torch==2.13.0
BIN := $(VENV)/bin
SWEEP ?= default
RESULTS ?= results/$(SWEEP)

# Evaluation data: ../shared/data when it exists (override BENCH_DATA=...; empty = the HF hub).
export BENCH_DATA ?= $(if $(wildcard ../shared/data/README.md),$(abspath ../shared/data),)
# Converted checkpoints and cached block scores.
export BENCH_CACHE ?= $(abspath .cache)
export HF_HUB_DISABLE_TELEMETRY := 1
export TOKENIZERS_PARALLELISM := false

# The GPU check runs where hydra-core, omegaconf and torch-pruning may be missing and PyPI unreachable: it installs
# them from wheels fetched beforehand (make gpu-wheels, on a machine with internet) into .cache/gpu-site.
GPU_WHEELS ?= .cache/gpu-wheels
GPU_PY ?= $(if $(wildcard $(BIN)/python),$(BIN)/python,python3)
OUT ?= results/gpu-check

.PHONY: setup model test sweep sweep-extras tables plots bench-scoring bench-speed bench-zeroshot gpu-wheels gpu-check clean

$(BIN)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV_FLAGS) $(VENV)
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/pip install --quiet "$(TORCH)"
	$(BIN)/pip install --quiet -e ".[test,slurm]"
	touch $@

setup: $(BIN)/.installed

model: setup
	$(BIN)/python -m bench.models prepare smollm2-135m

test: setup
	$(BIN)/python -m pytest -q tests

sweep: model
	$(BIN)/python -m bench -m +sweep=$(SWEEP)
	$(BIN)/python -m bench.report $(RESULTS)
	$(BIN)/python -m bench.plots $(RESULTS) plots/$(SWEEP)

# The default sweep's companions, into results/default: Block Influence and angular distance (default_more) and
# LoRA-retrained depth and width rows (default_lora). About 10 minutes on this CPU.
sweep-extras: model
	$(BIN)/python -m bench -m +sweep=default_more
	$(BIN)/python -m bench -m +sweep=default_lora
	$(BIN)/python -m bench.report results/default
	$(BIN)/python -m bench.plots results/default plots/default

tables: setup
	$(BIN)/python -m bench.report $(RESULTS)

plots: setup
	$(BIN)/python -m bench.plots $(RESULTS) plots/$(SWEEP)

bench-scoring: model
	$(BIN)/python -m bench.benchmarks.scoring

# Context-once loglikelihood vs lm-eval's HFLM on smollm2-135m, the seven tasks' first N documents each, alternating:
# times, ratio, max |loglikelihood difference|, equal accuracies (about 10 minutes on this CPU).
bench-zeroshot: model
	$(BIN)/python -m bench.benchmarks.zeroshot

# Dense vs depth vs width on smollm2-135m on this CPU, interleaved, from the default sweep's plans (make sweep first):
# eager at batch 1, 4, 16 and the compiled runtime at batch 1.
bench-speed: model
	$(BIN)/python -m bench.benchmarks.speed --plans results/default --ratios 0.2 --out results/bench-speed/eager \
		eval.speed.batch_sizes=[1,4,16] eval.speed.new_tokens=[32] eval.speed.warmup=1 eval.speed.repeats=5 \
		eval.speed.min_time_s=0
	$(BIN)/python -m bench.benchmarks.speed --plans results/default --ratios 0.2 --out results/bench-speed/compiled \
		eval.speed.runtimes=[compiled] eval.speed.batch_sizes=[1] eval.speed.new_tokens=[32] eval.speed.warmup=2 \
		eval.speed.repeats=5 eval.speed.min_time_s=0

gpu-wheels: setup
	$(BIN)/pip download --quiet --no-deps -d $(GPU_WHEELS) hydra-core==1.3.8 omegaconf==2.3.1 torch-pruning==1.6.1
	$(BIN)/pip wheel --quiet --no-deps -w $(GPU_WHEELS) antlr4-python3-runtime==4.9.3

# llama-7b shape (random bf16 weights, no download): dense vs depth and width (uniform) at 20% and 35%, batch 1, 4,
# 16, 64, 256, 128 new tokens, records + plots in $(OUT). Without a GPU: a tiny shape, to check the command itself.
gpu-check:
	$(GPU_PY) -c "import hydra, omegaconf, torch_pruning" 2>/dev/null || \
		$(GPU_PY) -m pip install --quiet --no-index --no-deps --target .cache/gpu-site $(GPU_WHEELS)/*.whl
	PYTHONPATH=$(CURDIR):$(CURDIR)/.cache/gpu-site $(GPU_PY) -m bench.benchmarks.speed --gpu-check --out $(OUT)

clean:
	rm -rf $(VENV) .cache
