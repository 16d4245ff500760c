# Two commands for a fresh clone: `make demo` and `make test`. Everything else is set up here.
VENV    ?= .venv
# requirements.lock is resolved for CPython 3.11 (`make PYTHON=python3.11 ...` where python3 is another).
PYTHON  ?= python3
PY      := $(VENV)/bin/python
CACHE   ?= $(CURDIR)/.cache
# DeepSpeed compiles its C++ ops on first use (about a minute each); keep them between runs.
export TORCH_EXTENSIONS_DIR ?= $(CACHE)/torch_extensions
export PIP_DISABLE_PIP_VERSION_CHECK := 1

# The installer and the lock tool are pinned here; everything else is pinned in requirements.lock.
PIP_VERSION       := 26.3
PIP_TOOLS_VERSION := 7.7.0
LOCK_TOOLS        := $(CACHE)/lock-tools
# A machine may cap packages through pip's own config (the machines of this project cap torch and
# torchvision to the releases on their disk); the lock is resolved under the same cap.
PIP_CONSTRAINT_FILE ?= $(shell $(PYTHON) -m pip config list 2>/dev/null | sed -n "s/^global\.constraint='\(.*\)'$$/\1/p")

.PHONY: setup lock ops lint test test-fast demo docs bench gpu-check gpu-run clean

setup: $(VENV)/.installed

# Exactly the lock: a pinned installer; every package at its pinned version without resolving anything
# (--no-deps; compiled to bytecode at install, which matters where PYTHONDONTWRITEBYTECODE is set: there
# every process would compile torch from source again); a check that the lock still matches
# pyproject.toml; the project itself without a build environment of fresh downloads
# (--no-build-isolation uses the locked setuptools); then whatever the lock does not name is removed.
$(VENV)/.installed: requirements.lock pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet pip==$(PIP_VERSION)
	$(PY) -m pip install --quiet --no-deps -r requirements.lock
	$(PY) tests/helpers/lockfile.py check
	$(PY) -m pip install --quiet --no-deps --no-build-isolation -e .
	$(PY) tests/helpers/lockfile.py venv
	$(PY) -m pip check
	mkdir -p $(TORCH_EXTENSIONS_DIR)
	touch $@

# After changing a dependency in pyproject.toml: `make lock` resolves what changed and keeps every other
# pin; `make lock UPGRADE=1` moves every package to its newest release the ranges allow. Run `make test`
# and commit requirements.lock with pyproject.toml either way.
lock:
	test -x $(LOCK_TOOLS)/bin/pip-compile || \
		($(PYTHON) -m venv $(LOCK_TOOLS) && \
		 $(LOCK_TOOLS)/bin/pip install --quiet pip==$(PIP_VERSION) pip-tools==$(PIP_TOOLS_VERSION))
	$(LOCK_TOOLS)/bin/pip-compile --quiet $(if $(UPGRADE),--upgrade) --extra test --build-deps-for editable \
		--allow-unsafe --strip-extras --no-emit-index-url --no-emit-find-links \
		$(if $(PIP_CONSTRAINT_FILE),--constraint $(PIP_CONSTRAINT_FILE)) -o requirements.lock pyproject.toml
	$(LOCK_TOOLS)/bin/python tests/helpers/lockfile.py stamp

# The lock against pyproject.toml, then ruff (lint and format) over the code and tests, mypy over the
# package; `make test` runs it first.
lint: setup
	$(PY) tests/helpers/lockfile.py check
	$(VENV)/bin/ruff check ssit_dist tests bench launch docs
	$(VENV)/bin/ruff format --check ssit_dist tests bench launch docs
	$(VENV)/bin/mypy

# DeepSpeed compiles its C++ ops on first use (once per TORCH_EXTENSIONS_DIR). The one the CPU ranks use
# (shared-memory collectives; the shipped configs use torch's AdamW, no DeepSpeed optimizer op) is built
# here: `make test` runs this beside lint, on the core lint leaves idle, instead of inside the first
# tests that need it (on a GPU machine it builds on first use).
ops: setup
	$(PY) -c "from deepspeed.accelerator import get_accelerator; acc = get_accelerator(); \
		[acc.create_op_builder(op).load() for op in ('ShareMemCommBuilder',) if acc.device_name() == 'cpu']"

# The gate (what .ci/run calls): lint and every test, in two pytest-xdist workers. Most tests wait on
# processes they launched (ranks, SLURM jobs) and leave a core idle; a module's tests stay on one worker
# (--dist loadscope) so that its fixtures (packed shards, a trained run, a cluster) are made once. One
# intra-op thread per process: two workers with torch's default (a thread per core) beside the ranks they
# launch oversubscribe the cores; measured on 2 cores, two heavy modules side by side: 258 s -> 206 s.
# The tests of the default itself (tests/test_runtime.py) unset it for the processes they start.
test: setup
	$(MAKE) --no-print-directory -j2 lint ops
	OMP_NUM_THREADS=1 $(VENV)/bin/pytest -q -n 2 --dist loadscope --durations=15

# Unit tests only (no process launches, no SLURM, no wheel build): after every change.
test-fast: setup
	$(VENV)/bin/pytest -q -m "not (slow or multiprocess or slurm)"

demo: setup
	$(VENV)/bin/ssit-dist demo

# The option and field tables of docs/, written from the command line and the config schema: run it after
# changing a command's options or a config field (tests/test_readme.py fails until then).
docs: setup
	$(PY) docs/generate.py

# scaling.py (the scaling model past 8 GPUs) reads the counts collectives.py has just made, from
# $(CACHE)/collectives.json, instead of running the ranks again.
bench: setup
	$(PY) bench/perf/shard.py
	$(PY) bench/perf/pretrain.py
	$(PY) bench/perf/predict.py
	$(PY) bench/perf/model_step.py
	$(PY) bench/perf/collectives.py > $(CACHE)/collectives.json
	cat $(CACHE)/collectives.json
	$(PY) bench/perf/scaling.py --collectives $(CACHE)/collectives.json

# On a CUDA machine: NCCL collectives, ZeRO-2/3 bf16 pretraining with a stop and resume, export and bf16
# fine-tuning, as JSON. Without CUDA it prints a skip line. Needs labelled shards (see bench/checks/gpu_check.py).
gpu-check: setup
	$(PY) bench/checks/gpu_check.py

# The one prepared command for a GPU machine (bench/checks/gpu_run.py). Here, once: `$(PY)
# bench/checks/travel.py` writes .travel (shards of the real photographs and the wheels the GPU image
# lacks; at most 64 MiB with the checkout). There, with .travel carried and no venv (the image's Python
# and the carried wheels): `make gpu-run PY=python3 GPU_OUT=$$OUT`. `SMOKE=1`: every part on CPU at tiny
# sizes (tests/bench/test_gpu_run.py runs it in `make test`).
TRAVEL  ?= .travel
GPU_OUT ?= gpu_out
gpu-run:
	test ! -d $(TRAVEL)/wheels || $(PY) -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
		--upgrade --target $(abspath $(TRAVEL))/site $(TRAVEL)/wheels/*.whl
	PYTHONPATH=$(abspath $(TRAVEL))/site:$(CURDIR) $(PY) -m bench.checks.gpu_run --travel $(TRAVEL) \
		--out $(GPU_OUT) $(if $(SMOKE),--smoke)

clean:
	rm -rf $(VENV) $(CACHE) demo_out
