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

.PHONY: setup model test sweep tables bench-scoring clean

$(BIN)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV_FLAGS) $(VENV)
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/pip install --quiet "$(TORCH)"
	$(BIN)/pip install --quiet -e ".[test]"
	touch $@

setup: $(BIN)/.installed

model: setup
	$(BIN)/python -m bench.models prepare smollm2-135m

test: setup
	$(BIN)/python -m pytest -q tests

sweep: model
	$(BIN)/python -m bench -m +sweep=$(SWEEP)
	$(BIN)/python -m bench.report $(RESULTS)

tables: setup
	$(BIN)/python -m bench.report $(RESULTS)

bench-scoring: model
	$(BIN)/python -m bench.benchmarks.scoring

clean:
	rm -rf $(VENV) .cache
