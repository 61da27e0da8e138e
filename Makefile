# `make demo` and `make test` set everything up on a fresh machine (see scripts/install.sh).
SHELL := /bin/bash
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV ?= .venv
BIN := $(CURDIR)/$(VENV)/bin
# Stages run as `llmops <stage>` from dvc.yaml, so the venv's bin must be on PATH.
export PATH := $(BIN):$(PATH)
# The embedded default is offline: models and data come from the repo and from packages.
export HF_HUB_OFFLINE ?= 1
export HF_DATASETS_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false

.PHONY: install demo test test-fast lint sample clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml scripts/install.sh
	bash scripts/install.sh $(VENV) $(PYTHON)
	touch $@

## demo: run the whole pipeline on the embedded default (CPU, offline, local DVC remote)
demo: install
	dvc repro
	dvc push -q || echo "note: dvc push to the local remote failed; outputs are still in the workspace"
	@echo
	@dvc metrics show
	@echo
	@echo "Done. Look at:"
	@echo "  .venv/bin/mlflow ui --backend-store-uri sqlite:///mlflow.db   runs, curves, the registered champion"
	@echo "  reports/validate/data_docs/index.html                        Great Expectations Data Docs"
	@echo "  dvc metrics show / dvc plots show / dvc dag                  metrics, loss curves, the stage graph"

## test: lint, then the whole test suite (slow and integration tests included)
test: install
	ruff check pipelines tests dags benchmarks scripts
	python -m pytest

## test-fast: everything but tests marked slow
test-fast: install
	python -m pytest -m "not slow"

lint: install
	ruff check pipelines tests dags benchmarks scripts

## sample: rebuild data/sample/ from Debian's wordnet-base and dict-foldoc
sample: install
	python scripts/build_sample.py

clean:
	rm -rf data/ingested data/prepared reports .pytest_cache
