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

.PHONY: install demo test test-fast lint sample clean airflow

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml scripts/install.sh
	bash scripts/install.sh $(VENV) $(PYTHON)
	touch $@

# The demo's monitoring window: the day that ends at midnight UTC today (a scheduler passes its own).
DEMO_WINDOW_END ?= $(shell date -u +%Y-%m-%dT00:00:00Z)

## demo: run the whole pipeline on the embedded default (CPU, offline, local DVC remote),
## then simulate a day of half-drifted traffic and write its drift report
demo: install
	dvc repro
	dvc push -q || echo "note: dvc push to the local remote failed; outputs are still in the workspace"
	llmops simulate-traffic --requests 120 --drift-share 0.5 --end $(DEMO_WINDOW_END)
	llmops monitor --end $(DEMO_WINDOW_END)
	@echo
	@dvc metrics show
	@echo
	@echo "Done. Look at:"
	@echo "  .venv/bin/mlflow ui --backend-store-uri sqlite:///mlflow.db   runs, curves, the registered champion"
	@echo "  reports/validate/data_docs/index.html                        Great Expectations Data Docs"
	@echo "  dvc metrics show / dvc plots show / dvc dag                  metrics, loss curves, the stage graph"
	@echo "  reports/monitor/latest.json and reports/monitor/<window>/report.html   the drift report and decision"
	@echo "  LLMOPS_API_TOKEN=... llmops serve                            the champion over HTTP (docs/serving.md)"

## test: lint, then the whole test suite (slow and integration tests included)
test: install
	ruff check pipelines tests dags benchmarks scripts
	python -m pytest

## test-fast: everything but tests marked slow
test-fast: install
	python -m pytest -m "not slow"

lint: install
	ruff check pipelines tests dags benchmarks scripts

## airflow: a local Airflow (UI, scheduler) for dags/ on 127.0.0.1:8080 until Ctrl-C
airflow: install
	llmops airflow

## sample: rebuild data/sample/ from Debian's wordnet-base and dict-foldoc
sample: install
	python scripts/build_sample.py

clean:
	rm -rf data/ingested data/prepared data/inference data/monitor reports .pytest_cache
