# Two commands do all set-up on a fresh machine with Python 3.10+:
#   make demo   -- create .venv, install, run the whole pipeline on the embedded demo (CPU)
#   make test   -- create .venv, install, run the test suite
#   make bench  -- our trainers against the TRL anchors and a plain-torch loop (BENCHMARKS.md)
# torch is pinned to the CPU build only here (dev/CI); the library itself accepts any torch>=2.1.

PYTHON     ?= python3
VENV       := .venv
PY         := $(VENV)/bin/python
TORCH_SPEC ?= torch==2.13.0

.PHONY: demo test bench clean

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

# The benchmark's anchor venvs and workload live outside the project (TRL never enters .venv);
# ../shared/bench/setup.sh builds them. We check and say so rather than run it: it installs two
# venvs, minutes of work the user should choose to start. BENCH_ARGS: e.g. --rounds 1 --stages rm.
BENCH_SHARED   ?= ../shared/bench
BENCH_VENVS    ?= $(HOME)/.cache/rlhf-bench/venvs
RLHF_BENCH_DIR ?= $(HOME)/.cache/rlhf-bench/workload
BENCH_ARGS     ?=

bench: $(VENV)/.base
	@for f in $(BENCH_VENVS)/trl116/bin/python $(BENCH_VENVS)/trl029/bin/python $(RLHF_BENCH_DIR)/MANIFEST.json; do \
	  test -e $$f || { echo "bench: $$f not found; run bash $(BENCH_SHARED)/setup.sh"; exit 2; }; done
	RLHF_BENCH_SHARED=$(BENCH_SHARED) BENCH_VENVS=$(BENCH_VENVS) RLHF_BENCH_DIR=$(RLHF_BENCH_DIR) \
	  $(PY) benchmarks/compare.py $(BENCH_ARGS)

clean:
	rm -rf $(VENV) runs .pytest_cache
