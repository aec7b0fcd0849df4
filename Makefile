# Two commands do all set-up on a fresh machine with Python 3.10+:
#   make demo   -- create .venv, install, run the whole pipeline on the embedded demo (CPU)
#   make test   -- create .venv, install, run the test suite
# torch is pinned to the CPU build only here (dev/CI); the library itself accepts any torch>=2.1.

PYTHON     ?= python3
VENV       := .venv
PY         := $(VENV)/bin/python
TORCH_SPEC ?= torch==2.13.0

.PHONY: demo test clean

$(VENV)/.base: setup.py
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet "$(TORCH_SPEC)"
	$(PY) -m pip install --quiet -e .
	touch $@

$(VENV)/.dev: $(VENV)/.base
	$(PY) -m pip install --quiet -e ".[dev]"
	touch $@

$(VENV)/.report: $(VENV)/.base
	$(PY) -m pip install --quiet -e ".[report]"
	touch $@

demo: $(VENV)/.report
	$(VENV)/bin/rlhf pipeline --config configs/pipeline.yaml

test: $(VENV)/.dev
	$(PY) -m pytest -q tests

clean:
	rm -rf $(VENV) runs .pytest_cache
