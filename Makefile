# csr-service: the two commands a newcomer needs are `make run` and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STATE_DIR ?= .dev-state
GRPC_LISTEN ?= 127.0.0.1:6443
UNIT := tests/unit
# The bed-free tiers: unit tests plus the end-to-end tests that only start csr-service itself.
PEER_MARKERS := kube or vault or certmanager or istio or istiod or helm or image or multicluster

.PHONY: run test test-unit test-e2e testbed image lint bench proto docs clean venv lock

# The C extension (csr_service/transport/_hpack.c) is built by the install: a changed source rebuilds it.
$(VENV)/.installed: pyproject.toml constraints.txt csr_service/transport/_hpack.c
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -c constraints.txt -e '.[dev]'
	touch $@

venv: $(VENV)/.installed

## lock: after upgrading a dependency in the venv, record every version in constraints.txt
lock: venv
	{ sed -n '/^#/p' constraints.txt; $(PY) -m pip freeze --exclude-editable; } > constraints.txt.new
	mv constraints.txt.new constraints.txt

## run: set up and run csr-service in dev mode (local CA generated on first start)
run: venv
	$(VENV)/bin/csr-service serve --dev --state-dir $(STATE_DIR) --grpc-listen $(GRPC_LISTEN)

## test: set up the test bed and run the whole suite (lint, unit, e2e, integration, image)
# The peers are built first; the container image (root only) is built by pytest for the image
# tests, so where it cannot be built those tests fail with the reason and the rest still run.
test: venv lint
	$(PY) -m tests.testbed.install peers
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

## image: build the container image from this tree on a local Python base (podman, as root; docs/install.md)
image: venv
	$(PY) -m tests.testbed.containers build

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
