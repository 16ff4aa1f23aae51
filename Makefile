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

.PHONY: run test test-fast flow check clean chromium

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	set -o pipefail; $(PY) -m pip install -q -e ".[dev]" 2>&1 | { grep -v "is ignored: it is neither a file nor a directory" || true; }
	$(PY) -m pip check
	touch $(STAMP)

# img2dataset, as DataComp's download_upstream.py runs it, for the tests' real-layout pool fixture:
# its own environment (it pins pandas<3 and a dataclasses backport that breaks Prefect's server)
I2D := .venv-img2dataset
$(I2D)/.installed: Makefile
	test -x $(I2D)/bin/python || python3 -m venv $(I2D)
	$(I2D)/bin/python -m pip install -q "img2dataset==1.47.0"
	touch $@

run: $(STAMP)
	$(PY) -m winnow run

flow: $(STAMP)
	$(PY) -m flows.pipeline

check: $(STAMP)
	$(PY) -m winnow check

# the report test renders reports/index.html in headless Chromium (Debian's package)
chromium:
	@command -v chromium >/dev/null || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; }

# two workers (the CI machine has 2 cores); the tests of the built project are one group (tests/conftest.py)
test: $(STAMP) $(I2D)/.installed chromium
	PREFECT_LOGGING_LEVEL=WARNING $(PY) -m pytest -q -n 2 --dist loadgroup

test-fast: $(STAMP) $(I2D)/.installed
	PREFECT_LOGGING_LEVEL=WARNING $(PY) -m pytest -q -m "not slow"

# every generated file (DVC outputs, the report's documents, MLflow's store and artifacts, work dirs);
# the DVC cache and reports/compare/demo* (committed results) stay
clean:
	rm -rf data models reports/eval reports/filter reports/validation reports/timings reports/stages reports/plots \
		reports/index.html reports/index.md reports/compare/runs.md mlflow.db mlruns mlartifacts .winnow
