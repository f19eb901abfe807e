# Two commands matter: `make run` (the whole pipeline in local mode) and `make test` (every check).
# Each sets itself up first; a second call skips what is already done.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
SAM_VENV := .venv-sam
CHECKOV_VENV := .venv-checkov
# PyPI's Linux torch wheels are the CUDA build (~4.5 GB with its nvidia-* packages); local mode and the tests run on
# the CPU. `make run TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu` installs the same torch version's
# CPU-only wheels (~0.2 GB) first, where that index can be reached. macOS wheels on PyPI are CPU-only already.
TORCH_INDEX_URL ?=
export PYTHONDONTWRITEBYTECODE := 1

.PHONY: setup run up test lint unit bench clean preflight images deploy

$(VENV)/.stamp: requirements/dev.txt requirements/lambda.txt requirements/train.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	if [ -n "$(TORCH_INDEX_URL)" ]; then \
	  $(PY) -m pip install -q --disable-pip-version-check --index-url "$(TORCH_INDEX_URL)" \
	    $$(grep -E '^(torch|torchvision)==' requirements/train.txt); fi
	$(PY) -m pip install -q --disable-pip-version-check -r requirements/dev.txt
	# The layers' packages importable from this venv, as /opt/python makes them on Lambda and PYTHONPATH in the
	# images: `python -m lesionml.model_dir ...` and the benchmarks work from a plain shell.
	printf '%s\n' "$(CURDIR)" "$(CURDIR)/layers/common" "$(CURDIR)/layers/imaging" "$(CURDIR)/layers/monitoring" \
	  > "$$($(PY) -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')/skin-lesion-layers.pth"
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

## Serve the stack locally for the AWS CLI and boto3 until Ctrl-C (README, "Rehearse operations locally").
## UP_ARGS passes options, e.g. make up UP_ARGS="--port 4567 --no-sample".
up: $(VENV)/.stamp
	$(PY) -m localmode up $(UP_ARGS)

## Every check: lint, types, template and ASL validation, unit and end-to-end tests.
test: $(VENV)/.stamp $(SAM_VENV)/.stamp $(CHECKOV_VENV)/.stamp node_modules/.stamp
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy
	PATH="$(CURDIR)/$(SAM_VENV)/bin:$(CURDIR)/node_modules/.bin:$(CURDIR)/$(CHECKOV_VENV)/bin:$$PATH" $(PY) -m pytest

## Fast checks while working: lint and types (what `make test` runs first, without the slow tools).
lint: $(VENV)/.stamp
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy

## Fast tests (under a minute): everything but the end-to-end runs, the tests that need the SAM/Node tools and the
## slow ones (real training, serving processes, real data: the `slow` marker, tests/conftest.py). `make test` runs all.
## Bytecode (and pytest's rewritten test modules) is cached outside the tree, in .pytest_cache/pycache: compiling it
## again on every run costs more than a third of the run.
unit: $(VENV)/.stamp
	PYTHONDONTWRITEBYTECODE= PYTHONPYCACHEPREFIX="$(CURDIR)/.pytest_cache/pycache" \
	  $(PY) -m pytest -q -n 2 -m "not e2e and not tools and not slow"

## First deployment (README, "First deployment"): preflight, images, deploy.
CONFIG_ENV ?= default
IMAGES_ENV := .aws-sam/images.env

## Check credentials, region, SageMaker quotas, the images in ECR and (with STACK=name) the e-mail subscription.
preflight: $(VENV)/.stamp
	$(PY) -m tools.preflight --config-env $(CONFIG_ENV) $(if $(STACK),--stack $(STACK))

## Build and push the training and inference images to ECR; print their URIs (kept in .aws-sam/images.env).
images:
	@command -v docker >/dev/null 2>&1 || { echo "error: make images needs docker, which is not on PATH: install Docker (docs.docker.com/get-docker) and start it" >&2; exit 1; }
	@command -v aws >/dev/null 2>&1 || { echo "error: make images needs the AWS CLI v2, which is not on PATH" >&2; exit 1; }
	@mkdir -p $(dir $(IMAGES_ENV))
	@set -e; train=$$(scripts/build_and_push.sh training_image); infer=$$(scripts/build_and_push.sh inference_image); \
	  printf 'TrainingImageUri=%s\nInferenceImageUri=%s\n' "$$train" "$$infer" | tee $(IMAGES_ENV)

## sam build + sam deploy with the URIs of `make images` (--guided the first time; CONFIG_ENV=prod for prod).
deploy: $(SAM_VENV)/.stamp
	$(SAM_VENV)/bin/sam build
	@args=$$($(PYTHON) -m tools.deploy_args --config-env $(CONFIG_ENV)); \
	  echo "sam deploy --config-env $(CONFIG_ENV) $$args"; \
	  eval "$(SAM_VENV)/bin/sam deploy --config-env $(CONFIG_ENV) $$args"

## The benchmarks that need nothing but this checkout: handler cold start and local mode's startup (each writes
## its figures down; the run fails if a target is missed). benchmarks/README.md lists all of them; the others need
## ../shared/data, Docker, the SAM CLI or many minutes.
bench: $(VENV)/.stamp
	status=0; \
	  $(PY) -m benchmarks.cold_start --repeats 5 || status=1; \
	  $(PY) -m benchmarks.localmode.startup --repeats 3 || status=1; \
	  exit $$status

clean:
	rm -rf $(VENV) $(SAM_VENV) $(CHECKOV_VENV) node_modules .aws-sam .local
