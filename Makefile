# `make run`: the whole pipeline on the built-in demo pool. `make test`: the test suite.
# Both create .venv on first use (pinned deps, see pyproject.toml).
SHELL := /bin/bash
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
export PATH := $(CURDIR)/$(VENV)/bin:$(PATH)
export HF_HUB_OFFLINE := 1
export GX_ANALYTICS_ENABLED := false
export DVC_NO_ANALYTICS := 1
export PREFECT_SERVER_ANALYTICS_ENABLED := false
export PREFECT_LOGGING_LEVEL ?= WARNING

.PHONY: run test test-fast flow check clean

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q -e ".[dev]"
	$(PY) -m pip check
	touch $(STAMP)

run: $(STAMP)
	$(PY) -m winnow run

flow: $(STAMP)
	$(PY) -m flows.pipeline

check: $(STAMP)
	$(PY) -m winnow check

test: $(STAMP)
	$(PY) -m pytest -q

test-fast: $(STAMP)
	$(PY) -m pytest -q -m "not slow"

clean:
	rm -rf data models reports/eval reports/filter reports/validation reports/timings reports/index.md mlflow.db
