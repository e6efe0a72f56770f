# Two entry points: `make demo` (install + run the main job on the embedded data) and
# `make test` (install, lint, run the test suite). Both create .venv on first use.
SHELL := /bin/bash
.SHELLFLAGS := -eo pipefail -c
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

export DAGSTER_HOME := $(CURDIR)/dagster_home
export SKMM_PROJECT_ROOT := $(CURDIR)
export DVC_NO_ANALYTICS := 1
export MLFLOW_DISABLE_TELEMETRY := true

.PHONY: install demo lint test clean

install: $(VENV)/.installed

# pip on these machines also consults local wheel folders; their "location ignored" notices are noise.
$(VENV)/.installed: pyproject.toml
	@echo "[make] installing into $(VENV) (first run only; about 3 minutes, more on a busy machine)"
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q -e '.[test]' 2>&1 | { grep -v "^WARNING: Location" || true; }
	touch $@

demo: install
	$(BIN)/skmm demo --root $(CURDIR)

# The layers and the import rules (pyproject.toml: [tool.importlinter], [tool.ruff]) are checked first.
lint: install
	$(BIN)/ruff check skmm_pipeline benchmarks tests
	$(BIN)/lint-imports

test: lint
	$(BIN)/python -m pytest

clean:
	rm -rf $(VENV) .skmm data
	find dagster_home -mindepth 1 ! -name dagster.yaml -exec rm -rf {} +
