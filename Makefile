# Two commands for a fresh clone: `make demo` and `make test`. Everything else is set up here.
VENV    ?= .venv
PY      := $(VENV)/bin/python
CACHE   ?= $(CURDIR)/.cache
# DeepSpeed compiles its C++ ops on first use (about a minute each); keep them between runs.
export TORCH_EXTENSIONS_DIR ?= $(CACHE)/torch_extensions
export PIP_DISABLE_PIP_VERSION_CHECK := 1

.PHONY: setup test demo bench clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test]'
	mkdir -p $(TORCH_EXTENSIONS_DIR)
	touch $@

test: setup
	$(VENV)/bin/pytest -q

demo: setup
	$(VENV)/bin/ssit-dist demo

bench: setup
	$(PY) bench/shard.py
	$(PY) bench/pretrain.py
	$(PY) bench/model_step.py

clean:
	rm -rf $(VENV) $(CACHE) demo_out
