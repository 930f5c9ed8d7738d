# Two commands set everything up on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# One cache per content of the modules with kernels (tools/numba_cache_dir.py says why).
export NUMBA_CACHE_DIR ?= $(shell $(PYTHON) tools/numba_cache_dir.py)

.PHONY: demo test test-oldest lint typecheck unit golden bench gpu-check clean

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

# The suite again with every runtime dependency at the lowest version pyproject allows (CI runs
# only the newest). Wheels only: a floor that would build from source here is no floor we test.
OLDEST_VENV := .venv-oldest
OLDEST_BIN := $(OLDEST_VENV)/bin
OLDEST_STAMP := $(OLDEST_VENV)/.installed

$(OLDEST_STAMP): pyproject.toml tools/oldest_constraints.py
	rm -rf $(OLDEST_VENV)
	$(PYTHON) -m venv $(OLDEST_VENV)
	$(OLDEST_BIN)/pip install --quiet --upgrade pip 'tomli; python_version < "3.11"'
	$(OLDEST_BIN)/python tools/oldest_constraints.py > $(OLDEST_VENV)/constraints.txt
	$(OLDEST_BIN)/pip install --quiet --only-binary :all: \
		--constraint $(OLDEST_VENV)/constraints.txt -e '.[dev]'
	touch $(OLDEST_STAMP)

# Kernels compiled by another numba version would overwrite the main run's cache, and back.
# The slow tests (tests/integration) run the same code as processes, for their lifecycle
# (signals, systemd, restore, a real Prometheus); what depends on the libraries' versions the
# unit tests reach in-process, and the golden expositions pin prometheus-client's output.
test-oldest: export NUMBA_CACHE_DIR := $(CURDIR)/$(OLDEST_VENV)/numba_cache
test-oldest: $(OLDEST_STAMP)
	@echo "runtime dependencies at: $$(paste -sd ' ' $(OLDEST_VENV)/constraints.txt)"
	$(OLDEST_BIN)/pytest -m 'not slow'

golden: $(STAMP)
	$(BIN)/python -m tests.regen_golden

bench: $(STAMP)
	$(BIN)/powerd bench --duration 3600 --json out/bench.json --markdown out/bench.md

# Read-only check on a real NVIDIA machine; never part of `make test`.
gpu-check: $(STAMP)
	$(BIN)/python tools/gpu_check.py --out out/gpu-check

clean:
	rm -rf $(VENV) $(OLDEST_VENV) .numba_cache .pytest_cache .mypy_cache .ruff_cache out
