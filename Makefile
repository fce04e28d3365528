# The two commands a new user needs: `make demo` and `make test`. Everything else is below.
SHELL := /bin/bash
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
RUN := .run
export AWS_ENDPOINT_URL ?= http://127.0.0.1:4566
export AWS_ACCESS_KEY_ID ?= test
export AWS_SECRET_ACCESS_KEY ?= test
export AWS_DEFAULT_REGION ?= us-east-1

.PHONY: help setup up down status demo train test test-fast bench lint clean

help:  ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | sed 's/:.*## /\t/' | column -t -s $$'\t'

$(STAMP): pyproject.toml requirements.lock package.json package-lock.json
	@command -v $(PYTHON) >/dev/null || { echo "need $(PYTHON) on PATH"; exit 1; }
	test -d $(VENV) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet pip==26.3  # the pip the lock was resolved and tested with
	$(PY) -m pip install --quiet -r requirements.lock
	$(PY) -m pip install --quiet --no-deps -e .
# exactly package-lock.json, or an error if it disagrees with package.json; onnxruntime-node bundles its CPU
# binaries, and its install script would fetch CUDA ones from NuGet, neither needed nor reachable from CI
	ONNXRUNTIME_NODE_INSTALL=skip npm ci --no-audit --no-fund --silent
	touch $(STAMP)

setup: $(STAMP)  ## create .venv and install every pinned dependency (Python and npm)

up: $(STAMP)  ## start the emulator on 127.0.0.1:4566, provision, start every component
	$(PY) -m infra.stack up

down:  ## stop every component and the emulator
	@if [ -x $(PY) ]; then $(PY) -m infra.stack down; else echo "nothing to stop"; fi

status: $(STAMP)  ## what is running
	$(PY) -m infra.stack status

demo: $(STAMP)  ## run the whole loop on generated traffic (DEMO_MINUTES=n for longer)
	$(PY) -m demo

train: $(STAMP)  ## retrain the model from the lake and publish it if it passes the gates
	$(PY) -m batch.train $(TRAIN_ARGS)

test: $(STAMP)  ## the whole test suite (starts its own emulators on free ports)
	env -u AWS_ENDPOINT_URL $(PY) -m pytest -q -p no:cacheprovider $(PYTEST_ARGS)

test-fast: $(STAMP)  ## the suite without Spark and browser tests
	env -u AWS_ENDPOINT_URL $(PY) -m pytest -q -p no:cacheprovider -m "not spark and not browser" $(PYTEST_ARGS)

bench: $(STAMP)  ## benchmarks side by side with their baselines; writes bench/report.md
	env -u AWS_ENDPOINT_URL $(PY) -m bench $(BENCH_ARGS)

lint: $(STAMP)  ## ruff over the code
	$(VENV)/bin/ruff check .

clean: down  ## remove the virtualenv, node_modules and run files
	rm -rf $(VENV) node_modules $(RUN)
