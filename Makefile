# Two commands matter: `make run` (the whole pipeline in local mode) and `make test` (every check).
# Each sets itself up first; a second call skips what is already done.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
SAM_VENV := .venv-sam
CHECKOV_VENV := .venv-checkov
export PYTHONDONTWRITEBYTECODE := 1

.PHONY: setup run test lint typecheck sam-validate bench clean

$(VENV)/.stamp: requirements/dev.txt requirements/lambda.txt requirements/train.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check -r requirements/dev.txt
	touch $@

$(SAM_VENV)/.stamp: requirements/sam.txt
	test -x $(SAM_VENV)/bin/python || $(PYTHON) -m venv $(SAM_VENV)
	$(SAM_VENV)/bin/pip install -q --disable-pip-version-check -r requirements/sam.txt
	touch $@

# checkov pins an old boto3, so it has a virtualenv of its own too (.venv-checkov).
$(CHECKOV_VENV)/.stamp: requirements/checkov.txt
	test -x $(CHECKOV_VENV)/bin/python || $(PYTHON) -m venv $(CHECKOV_VENV)
	$(CHECKOV_VENV)/bin/pip install -q --disable-pip-version-check -r requirements/checkov.txt
	touch $@

node_modules/.stamp: package.json package-lock.json
	npm ci --silent --no-audit --no-fund
	touch $@

setup: $(VENV)/.stamp

## Run the retraining pipeline end to end in local mode on the bundled data.
run: $(VENV)/.stamp
	$(PY) -m localmode run

## Every check: lint, types, template and ASL validation, unit and end-to-end tests.
test: $(VENV)/.stamp $(SAM_VENV)/.stamp $(CHECKOV_VENV)/.stamp node_modules/.stamp
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy
	PATH="$(CURDIR)/$(SAM_VENV)/bin:$(CURDIR)/node_modules/.bin:$(CURDIR)/$(CHECKOV_VENV)/bin:$$PATH" $(PY) -m pytest

bench: $(VENV)/.stamp
	$(PY) -m benchmarks.run_all

clean:
	rm -rf $(VENV) $(SAM_VENV) $(CHECKOV_VENV) node_modules .aws-sam .local
