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

# The GPU check runs where lm-eval, datasets, hydra-core, omegaconf and torch-pruning are missing and PyPI is
# unreachable: make gpu-bundle (on a machine with internet) writes their wheels and the data files the check reads to
# $(GPU_BUNDLE); make gpu-check (on the node) installs the wheels into $(GPU_SITE) and reads the data from there.
GPU_BUNDLE ?= .cache/gpu-bundle
GPU_WHEELS ?= $(GPU_BUNDLE)/wheels
GPU_SITE ?= .cache/gpu-site
GPU_PY ?= $(if $(wildcard $(BIN)/python),$(BIN)/python,python3)
OUT ?= results/gpu-check
# What gpu-check runs with $(GPU_PY).
GPU_CHECK_CMD ?= -u -m bench.benchmarks.gpu_check --out $(OUT)

.PHONY: setup model test test-slurm sweep sweep-extras tables plots bench-scoring bench-speed bench-speed-reference bench-retrain bench-zeroshot gpu-wheels gpu-check test-gpu setup-llamacpp test-llamacpp clean

# constraints.txt pins the GPU bundle's distributions to the versions it ships, so that a fresh venv (CI's) tests them.
$(BIN)/.installed: pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV_FLAGS) $(VENV)
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/pip install --quiet "$(TORCH)"
	$(BIN)/pip install --quiet -c constraints.txt -e ".[test,slurm]"
	touch $@

setup: $(BIN)/.installed

model: setup
	$(BIN)/python -m bench.models prepare smollm2-135m

test: setup
	$(BIN)/python -m pytest -q tests

# Sweeps on a one-node SLURM cluster (tests/slurm/): as root, installs slurm-wlm and munge with apt-get when missing,
# starts munged, slurmctld and slurmd, runs tests/slurm/test_slurm.py, stops them (also on failure).
test-slurm: setup
	bash tests/slurm/up.sh $(BIN)/python -m pytest -q tests/slurm

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

# One depth-pruned cell's speedup against dense under each speed reference (resident, cpu, reload) on this CPU:
# per mode and batch the per-round speedups' median, mean, spread and each median over resident's (per mode and
# batch: 10 rounds of dense and pruned, each a 1-token and a 32-token generate, plus a warm-up).
# tokens/s and peak host RSS of lora, kd and cpt on smollm2-135m at 20% (fp32, and kd / cpt with bf16 autocast)
bench-retrain: model
	$(BIN)/python -m bench.benchmarks.retrain --tokens 4096

bench-speed-reference: model
	$(BIN)/python -m bench.benchmarks.speed_reference --out results/bench-speed-reference \
		model=smollm2-135m method=depth_magnitude ratio=0.2 eval.speed.batch_sizes=[1,4] eval.speed.new_tokens=[32] \
		eval.speed.repeats=10

# llama.cpp for the edge runtime (eval.speed.runtimes=[llamacpp], bench.export's q8_0 / q4_k_m): llama-cpp-python
# built from source (the .[llamacpp] extra), about 12 minutes on 2 cores; a compiler and cmake come from apt when
# missing. Native CPU flags without AMX-INT8: on VMs that report AMX but fault on it (this one), ggml's AMX
# kernels crash every quantized model (a general protection fault at ldtilecfg). make sweep never needs it.
LLAMACPP_CMAKE ?= -DGGML_NATIVE=ON $(if $(filter x86_64,$(shell uname -m)),-DCMAKE_C_FLAGS=-mno-amx-int8 -DCMAKE_CXX_FLAGS=-mno-amx-int8)

$(BIN)/.llamacpp: $(BIN)/.installed
	command -v c++ >/dev/null && command -v cmake >/dev/null || \
		(apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq build-essential cmake)
	CMAKE_ARGS="$(LLAMACPP_CMAKE)" CMAKE_BUILD_PARALLEL_LEVEL=$$(nproc) \
		$(BIN)/pip install --quiet --no-cache-dir -c constraints.txt -e ".[llamacpp]"
	touch $@

setup-llamacpp: $(BIN)/.llamacpp

# The GGUF export and llama.cpp tests (they skip under make test when llama.cpp is missing).
test-llamacpp: setup-llamacpp
	$(BIN)/python -m pytest -q tests/test_export.py tests/test_llamacpp.py

.PHONY: gpu-bundle gpu-bundle-check gpu-site

# The GPU check's bundle, where PyPI is reachable: Python 3.12 manylinux x86-64 wheels of what the GPU image lacks
# (bench/benchmarks/gpu_bundle.py BUNDLE, pinned to this venv) and the data files the check reads, with
# MANIFEST.json (bytes, sha256, pins), at most 48 MiB; left as it is when up to date.
gpu-bundle: setup
	$(BIN)/python -m bench.benchmarks.gpu_bundle build --data "$(BENCH_DATA)" --out $(GPU_BUNDLE)

gpu-wheels: gpu-bundle

# The bundle's proof on this CPU: a clean venv like the GPU image (.cache/gpu-image-venv: $(TORCH), transformers 5.17,
# accelerate, peft, pandas, pyarrow, matplotlib, tqdm, safetensors; none of the bundle), the bundle installed by
# gpu-site and the check's cells run by gpu-check there, offline. The venv and the install are kept while unchanged;
# FRESH=1 makes both anew (a fresh clone always does).
gpu-bundle-check: gpu-bundle
	$(BIN)/python -m bench.benchmarks.gpu_bundle check --bundle $(GPU_BUNDLE) --torch "$(TORCH)" $(if $(FRESH),--fresh)

# The bundle's wheels into $(GPU_SITE) with pip --no-index, unless $(GPU_PY) has them already; once per wheel set.
gpu-site:
	@if $(GPU_PY) -c "import hydra, omegaconf, torch_pruning, lm_eval, datasets" 2>/dev/null; then \
		echo "gpu-site: $(GPU_PY) has hydra, omegaconf, torch_pruning, lm_eval and datasets: nothing to install"; \
	elif ! test -d $(GPU_WHEELS); then \
		echo "gpu-site: no $(GPU_WHEELS): run make gpu-bundle where PyPI is reachable, carry .cache/gpu-bundle"; \
		exit 1; \
	elif ! ls $(GPU_WHEELS) | cmp -s - $(GPU_SITE)/.wheels; then \
		echo "gpu-site: installing $(GPU_WHEELS)/*.whl into $(GPU_SITE) (pip --no-index --no-deps)" && \
		rm -rf $(GPU_SITE) && \
		$(GPU_PY) -m pip install --quiet --no-index --no-deps --target $(GPU_SITE) $(GPU_WHEELS)/*.whl && \
		ls $(GPU_WHEELS) > $(GPU_SITE)/.wheels && \
		PYTHONPATH=$(CURDIR):$(abspath $(GPU_SITE)) $(GPU_PY) -m bench.benchmarks.gpu_bundle requirements; \
	fi

# A whole sweep at 7B scale (bench/benchmarks/gpu_check.py): llama-7b shape, random bf16 weights, seven methods at
# 20% through every stage (eager speed at batch 1, 16, 64, then compiled for three), per-stage time and peak memory
# against the prediction, tables (main, paired, memory) and plots in $(OUT). About 7 minutes on one H200 (planned;
# not yet run on one). Without a GPU: the tiny-llama-gqa shape, to check the command itself.
gpu-check: gpu-site
	PYTHONPATH=$(CURDIR):$(abspath $(GPU_SITE)) \
		BENCH_DATA=$(if $(wildcard $(GPU_BUNDLE)/data),$(abspath $(GPU_BUNDLE))/data,$(BENCH_DATA)) \
		$(GPU_PY) $(GPU_CHECK_CMD)

# The test suite on CUDA (tests/conftest.py: BENCH_TEST_DEVICE): every composed cell and tiny model on the GPU;
# tests that measure the CPU itself are skipped. On the GPU node, with the bundle installed by gpu-site.
test-gpu: gpu-site
	BENCH_TEST_DEVICE=cuda PYTHONPATH=$(CURDIR):$(abspath $(GPU_SITE)) \
		BENCH_DATA=$(if $(wildcard $(GPU_BUNDLE)/data),$(abspath $(GPU_BUNDLE))/data,$(BENCH_DATA)) \
		$(GPU_PY) -m pytest -q -p no:cacheprovider tests

clean:
	rm -rf $(VENV) .cache
