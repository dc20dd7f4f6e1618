# Two commands on a fresh Debian machine:
#   make run    install everything, then serve the shipped default bundle (Swagger UI at /docs)
#   make test   install everything, then run the test suite
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
FMNIST := /usr/share/datasets/fashion-mnist/t10k-images-idx3-ubyte.gz
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
BUNDLE ?= fmnist-dpsh-32

.PHONY: run eval test install data tools lint bench-service bench-audit bench-hashing bundle clean

HOST ?= 127.0.0.1
PORT ?= 8000

run: install
	HASHAUDIT_DEFAULT_BUNDLE=$(BUNDLE) $(VENV)/bin/hashaudit serve --host $(HOST) --port $(PORT)

eval: install
	$(VENV)/bin/hashaudit eval $(BUNDLE)

test: install data tools
	./scripts/run_tests.sh

install: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	touch $(STAMP)

data: $(FMNIST)

# Test tools from Debian: chromium renders the audit report in a headless browser;
# docker-compose (v1) lets the deploy tests run `docker-compose config` (no engine needed).
tools: /usr/bin/chromium /usr/bin/docker-compose

/usr/bin/chromium:
	$(SUDO) apt-get update -qq
	$(SUDO) apt-get install -y -qq --no-install-recommends chromium

/usr/bin/docker-compose:
	-$(SUDO) apt-get install -y -qq --no-install-recommends docker-compose

$(FMNIST):
	$(SUDO) apt-get update -qq
	$(SUDO) apt-get install -y -qq --no-install-recommends dataset-fashion-mnist

lint: install
	$(VENV)/bin/ruff check service tests benchmarks
	$(VENV)/bin/lint-imports

bundle: install data
	$(VENV)/bin/hashaudit train bundle --config configs/default_bundle.toml

bench-hashing: install data
	$(PY) benchmarks/hashing.py

bench-service: install
	$(PY) benchmarks/service.py

bench-audit: install
	$(PY) benchmarks/audit.py

clean:
	rm -rf $(VENV) .pytest_cache
