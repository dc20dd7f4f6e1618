# Two commands on a fresh Debian machine:
#   make run    install everything, then evaluate the shipped default bundle
#   make test   install everything, then run the test suite
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
FMNIST := /usr/share/datasets/fashion-mnist/t10k-images-idx3-ubyte.gz
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
BUNDLE ?= fmnist-dpsh-32

.PHONY: run test install data tools lint bench-hashing bundle clean

run: install data
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

# docker-compose (v1, Debian) lets the deploy tests run `docker-compose config` (no engine needed)
tools: /usr/bin/docker-compose

/usr/bin/docker-compose:
	-$(SUDO) apt-get install -y -qq docker-compose

$(FMNIST):
	$(SUDO) apt-get update -qq
	$(SUDO) apt-get install -y -qq dataset-fashion-mnist

lint: install
	$(VENV)/bin/ruff check service tests benchmarks
	$(VENV)/bin/lint-imports

bundle: install data
	$(VENV)/bin/hashaudit train bundle --config configs/default_bundle.toml

bench-hashing: install data
	$(PY) benchmarks/hashing.py

clean:
	rm -rf $(VENV) .pytest_cache
