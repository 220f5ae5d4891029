# csr-service: the two commands a newcomer needs are `make run` and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STATE_DIR ?= .dev-state
GRPC_LISTEN ?= 127.0.0.1:6443
UNIT := tests/unit
# The bed-free tiers: unit tests plus the end-to-end tests that only start csr-service itself.
PEER_MARKERS := kube or vault or certmanager or istio or helm or multicluster

.PHONY: run test test-unit test-e2e testbed lint bench proto docs clean venv

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $@

venv: $(VENV)/.installed

## run: set up and run csr-service in dev mode (local CA generated on first start)
run: venv
	$(VENV)/bin/csr-service serve --dev --state-dir $(STATE_DIR) --grpc-listen $(GRPC_LISTEN)

## test: set up the test bed and run the whole suite (lint, unit, e2e, integration)
test: venv lint testbed
	$(PY) -m pytest tests

## test-unit: the fast tier, no test bed needed
test-unit: venv
	$(PY) -m pytest $(UNIT) -q

## test-e2e: unit tests plus csr-service as a subprocess; no test-bed peer needed
test-e2e: venv
	$(PY) -m pytest tests -m "not ($(PEER_MARKERS))"

## testbed: build or reuse every test-bed component (cache: ~/.cache/csr-service/testbed)
testbed: venv
	$(PY) -m tests.testbed.install all

lint: venv
	$(VENV)/bin/ruff check csr_service issuers tests bench scripts
	$(VENV)/bin/ruff format --check csr_service issuers tests bench scripts
	$(VENV)/bin/mypy

bench: venv
	$(PY) -m bench.local_ca

proto: venv
	$(PY) scripts/gen_proto.py

docs: venv
	$(PY) scripts/gen_config_docs.py

clean:
	rm -rf $(VENV) build dist *.egg-info
