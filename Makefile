# dtx — one entry point for people and CI. Every target installs what it needs.
#
#   make test   lint, types and every test (unit, integration, e2e) on real servers
#   make tools  build the Go tools the tests and the cluster use, provision PostgreSQL and
#               Kafka's jars: once, cached in ~/.cache/dtx (make test runs it first)
#   make run    the whole system, locally: infrastructure, every service, the demo,
#               then the gateway keeps serving on http://127.0.0.1:8080 (Ctrl-C stops all)
#
# Caches live outside the repository: uv's in ~/.cache/uv, Kafka's jars and the
# Go-built tools in ~/.cache/dtx, Go's in its defaults.

SHELL := /bin/bash
export UV_PYTHON_DOWNLOADS := never
export UV_LINK_MODE := copy
UV ?= $(shell command -v uv 2>/dev/null || echo $(HOME)/.local/bin/uv)
PY := .venv/bin/python
# Test files run in parallel workers (pytest-xdist), a whole file per worker so that
# module fixtures (a control plane, a system of services) start once. The suite mostly
# waits on servers, so more workers than the 2 cores still pays.
TEST_WORKERS ?= 3
PYTEST_PARALLEL := -n $(TEST_WORKERS) --dist loadfile
# mypy's cache outside the repository: a fresh clone checks only what changed.
export MYPY_CACHE_DIR ?= $(HOME)/.cache/dtx/mypy

run: install
	.venv/bin/dtx up --demo

bench: install
	.venv/bin/dtx bench

.PHONY: run bench install tools images test lint typecheck unit integration e2e protos infra-up infra-down clean

install: .venv/.synced

$(UV):
	python3 -m pip install --quiet --user uv

.venv/.synced: pyproject.toml uv.lock | $(UV)
	$(UV) sync --frozen --quiet
	@touch $@

# Every compile and download the tests need happens here, never under a test's timeout.
tools: install
	.venv/bin/dtx toolchain build

# The container images of the charts' pods, built here without a Docker engine (buildah,
# mmdebstrap; root): OCI archives in ~/.cache/dtx/images, rebuilt only when an input changes.
images: tools
	.venv/bin/dtx images build

protos: install
	bash scripts/gen-protos.sh

lint: install
	.venv/bin/ruff check .
	.venv/bin/ruff format --check .

typecheck: install
	.venv/bin/mypy

unit: install
	$(PY) -m pytest -m unit

integration: tools
	$(PY) -m pytest $(PYTEST_PARALLEL) -m integration

e2e: images
	$(PY) -m pytest $(PYTEST_PARALLEL) -m e2e

# The README's test command.
test: lint typecheck images
	$(PY) -m pytest $(PYTEST_PARALLEL)

infra-up: install
	.venv/bin/dtx infra up

infra-down: install
	.venv/bin/dtx infra down

clean:
	-.venv/bin/dtx infra down
	rm -rf .venv .dtx
