# bullmq-http: `make run` serves the service locally, `make test` runs the test suite.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python

.DEFAULT_GOAL := help
.PHONY: help run test lint clean

help: ## List the targets
	@awk 'BEGIN {FS = ":.*## "} /^[a-z-]+:.*## / {printf "  make %-8s %s\n", $$1, $$2}' $(MAKEFILE_LIST)

$(VENV)/installed: requirements.txt requirements-dev.txt
	@$(PYTHON) -c 'import sys; sys.exit(sys.version_info < (3, 11) and "Python 3.11 or newer is needed")'
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -r requirements-dev.txt
	@touch $@

run: $(VENV)/installed ## Serve under gunicorn (with a throwaway Redis unless REDIS_URL is set)
	$(PY) dev.py

test: $(VENV)/installed lint ## Run the test suite against a real, throwaway Redis server
	$(PY) -m pytest

lint: $(VENV)/installed ## Check style with ruff
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

clean: ## Remove the virtualenv and local state
	rm -rf $(VENV) .run .pytest_cache .ruff_cache
