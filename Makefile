# Two commands do all set-up on a fresh machine with Python 3.10+:
#   make demo   -- create .venv, install, run the whole pipeline on the embedded demo (CPU)
#   make test   -- create .venv, install, run the test suite
#   make bench-setup -- build the benchmark's TRL venvs and workload (outside the project; once)
#   make bench  -- our trainers against the TRL anchors and a plain-torch loop (BENCHMARKS.md)
# torch is pinned to the CPU build only here (dev/CI); the library itself accepts any torch>=2.1.

PYTHON     ?= python3
VENV       := .venv
PY         := $(VENV)/bin/python
TORCH_SPEC ?= torch==2.13.0

.PHONY: demo test bench bench-setup clean

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

# The benchmark (docs/benchmark.md). Its anchors (benchmarks/anchors/) run in venvs of their own and
# the workload is generated, both outside the project, in a cache: TRL never enters .venv nor
# becomes a dependency of rlhf. bench-setup builds them (minutes, once; idempotent after that);
# bench checks for them and says so rather than start that work itself.
# BENCH_ARGS: e.g. --rounds 1 --stages rm.
BENCH_VENVS    ?= $(HOME)/.cache/rlhf-bench/venvs
RLHF_BENCH_DIR ?= $(HOME)/.cache/rlhf-bench/workload
BENCH_ARGS     ?=

bench-setup:
	BENCH_VENVS="$(BENCH_VENVS)" RLHF_BENCH_DIR="$(RLHF_BENCH_DIR)" PYTHON="$(PYTHON)" \
	  bash benchmarks/setup_anchors.sh

bench: $(VENV)/.base
	@for f in $(BENCH_VENVS)/trl116/bin/python $(BENCH_VENVS)/trl029/bin/python $(RLHF_BENCH_DIR)/MANIFEST.json; do \
	  test -e $$f || { echo "bench: $$f not found; run make bench-setup"; exit 2; }; done
	BENCH_VENVS=$(BENCH_VENVS) RLHF_BENCH_DIR=$(RLHF_BENCH_DIR) $(PY) benchmarks/compare.py $(BENCH_ARGS)

clean:
	rm -rf $(VENV) runs .pytest_cache
