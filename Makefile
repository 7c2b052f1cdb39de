# The two commands of the README: `make run` and `make test`.
# Both create .venv when it is missing and reinstall only when pyproject.toml changed.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
# Locally `make test` skips tests marked slow; CI (CI=true) runs everything.
ifeq ($(CI),true)
TIER :=
else
TIER := not slow and
endif
# The suite runs in parallel processes (pytest-xdist): most of a daemon test is waiting on
# its subprocess, so more workers than cores pays. Tests marked serial run after, alone.
WORKERS ?= 4
PYTEST_ARGS ?=
# Bytecode is cached (in the ignored __pycache__/): with PYTHONDONTWRITEBYTECODE set, as
# some shells set it, every test worker and every daemon a test starts compiled the
# package and re-rewrote the tests' asserts from source: 10 s of each worker's start.
unexport PYTHONDONTWRITEBYTECODE
# The serial part collects only the files that have serial tests (collecting all of them
# again costs more than the tests it selects in the fast tier).
SERIAL_FILES := $(shell grep -l 'mark.serial' tests/test_*.py)

.PHONY: run test test-all bench bench-ledger bench-codecs bench-churn bench-governor rmskin clean-venv

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip setuptools wheel

# An editable install of this layout (migrations/, workflows/ and the skin mapped into the
# package) always ends with setuptools' "Editable installation" notice: informational
# only, so it is silenced; any other warning still shows.
QUIET_EDITABLE := PYTHONWARNINGS="ignore:Editable installation"

$(VENV)/.installed-run: pyproject.toml | $(BIN)/python
	$(QUIET_EDITABLE) $(BIN)/python -m pip install --quiet -e .
	touch $@

$(VENV)/.installed-dev: pyproject.toml | $(BIN)/python
	$(QUIET_EDITABLE) $(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $@ $(VENV)/.installed-run

run: $(VENV)/.installed-run
	$(BIN)/dreamd run $(ARGS)

# --durations: the slowest tests in every run's log, to keep `make test` short.
# Exit status 5 is "no test selected" (a PYTEST_ARGS that picks none of one part).
test: $(VENV)/.installed-dev
	$(BIN)/python -m pytest -n $(WORKERS) --dist worksteal --durations=30 -m "$(TIER) not serial" $(PYTEST_ARGS) || [ $$? -eq 5 ]
	$(BIN)/python -m pytest --durations=10 -m "$(TIER) serial" $(or $(PYTEST_ARGS),$(SERIAL_FILES)) || [ $$? -eq 5 ]

test-all: $(VENV)/.installed-dev
	$(MAKE) test TIER=

# Benchmarks (not tests): results go in bench/RESULTS.md with the machine and command.
bench: $(VENV)/.installed-dev
	$(BIN)/python bench/pipeline.py

bench-ledger: $(VENV)/.installed-dev
	$(BIN)/python bench/ledger.py

bench-churn: $(VENV)/.installed-dev
	$(BIN)/python bench/churn.py

bench-governor: $(VENV)/.installed-dev
	$(BIN)/python bench/governor.py

# The Rainmeter skin as a .rmskin package (Rainmeter's Skin Installer), in dist/
rmskin: $(VENV)/.installed-run
	$(BIN)/python -m dreamd.rainmeter dist/DreamWindow.rmskin

# Mutation testing of the core (by hand, not CI; hours on 2 cores for the whole core):
# `make mutate` or `make mutate MUTANTS='dreamd.ledger.transitions*'`. Config in
# pyproject.toml [tool.mutmut]; survivors: .venv/bin/mutmut results / mutmut show NAME.
MUTANTS ?=
# one OpenMP thread: mutmut forks each mutant's test run from a process that has used
# torch, and a forked child waits forever on the parent's thread pool
mutate: $(VENV)/.installed-dev
	OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 $(BIN)/mutmut run --max-children 2 $(MUTANTS)
	$(BIN)/mutmut results

clean-venv:
	rm -rf $(VENV)
