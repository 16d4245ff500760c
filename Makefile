# Two commands for a fresh clone: `make demo` and `make test`. Everything else is set up here.
VENV    ?= .venv
PY      := $(VENV)/bin/python
CACHE   ?= $(CURDIR)/.cache
# DeepSpeed compiles its C++ ops on first use (about a minute each); keep them between runs.
export TORCH_EXTENSIONS_DIR ?= $(CACHE)/torch_extensions
export PIP_DISABLE_PIP_VERSION_CHECK := 1

.PHONY: setup lint test demo bench gpu-check clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test]'
	mkdir -p $(TORCH_EXTENSIONS_DIR)
	touch $@

# ruff (lint and format) over the code and tests, mypy over the package; `make test` runs it first.
lint: setup
	$(VENV)/bin/ruff check ssit_dist tests bench launch
	$(VENV)/bin/ruff format --check ssit_dist tests bench launch
	$(VENV)/bin/mypy

test: lint
	$(VENV)/bin/pytest -q

demo: setup
	$(VENV)/bin/ssit-dist demo

bench: setup
	$(PY) bench/shard.py
	$(PY) bench/pretrain.py
	$(PY) bench/model_step.py

# On a CUDA machine: NCCL collectives, ZeRO-2/3 bf16 pretraining with a stop and resume, export and bf16
# fine-tuning, as JSON. Without CUDA it prints a skip line. Needs labelled shards (see bench/gpu_check.py).
gpu-check: setup
	$(PY) bench/gpu_check.py

clean:
	rm -rf $(VENV) $(CACHE) demo_out
