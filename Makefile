# Two commands set everything up on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# One cache per content of the modules with kernels (tools/numba_cache_dir.py says why).
export NUMBA_CACHE_DIR ?= $(shell $(PYTHON) tools/numba_cache_dir.py)

.PHONY: demo test lint typecheck unit golden bench gpu-check clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/powerd demo --duration 60

lint: $(STAMP)
	$(BIN)/ruff check powerd tests benchmarks tools
	$(BIN)/ruff format --check powerd tests benchmarks tools

typecheck: $(STAMP)
	$(BIN)/mypy

unit: $(STAMP)
	$(BIN)/pytest

test: lint typecheck unit

golden: $(STAMP)
	$(BIN)/python -m tests.regen_golden

bench: $(STAMP)
	$(BIN)/powerd bench --duration 3600 --json out/bench.json --markdown out/bench.md

# Read-only check on a real NVIDIA machine; never part of `make test`.
gpu-check: $(STAMP)
	$(BIN)/python tools/gpu_check.py --out out/gpu-check

clean:
	rm -rf $(VENV) .numba_cache .pytest_cache .mypy_cache .ruff_cache out
