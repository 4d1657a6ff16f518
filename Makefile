# Set-up and checks. `make run` and `make test` work on a fresh machine with Python 3.11+.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
PIP := $(BIN)/python -m pip
PACKAGES := -e packages/core -e packages/data -e packages/models-memory \
            -e packages/models-flow -e packages/models-reconstruction -e packages/deploy

.PHONY: install install-test run test test-all lint typecheck benchmark clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip

install: $(BIN)/python
	$(PIP) install --quiet -c constraints.txt torch==2.14.1 torchvision==0.29.1
	$(PIP) install --quiet -c constraints.txt $(PACKAGES) -e .

install-test: install
	$(PIP) install --quiet -c constraints.txt -e '.[test]'

run: install
	$(BIN)/anomaly run

test: install-test
	$(BIN)/python -m pytest

lint: install-test
	$(BIN)/ruff check packages tests benchmarks
	$(BIN)/ruff format --check packages tests benchmarks
	$(BIN)/lint-imports

typecheck: install-test
	$(BIN)/mypy packages/core/src packages/data/src packages/models-memory/src

benchmark: install
	$(BIN)/python benchmarks/benchmark.py --root ../shared/datasets/mtd --category magnetic_tile

clean:
	rm -rf $(VENV) results
