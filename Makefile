# Tollgate: `make run` starts the whole system with a demo fleet; `make test` runs the suite.
# Everything needed is installed here, into .venv, from the package registries.
SHELL := /bin/bash
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install system-deps run test lint typecheck unit integration e2e bench clean

# Debian packages: iptables and iproute2 for the meter (accounting chains, network
# namespaces), chromium for the web page's browser tests. Installed when missing and we
# may (root with apt-get); elsewhere the tests that need them skip with the reason.
SYSTEM_TOOLS := iptables:iptables ip6tables:iptables iptables-save:iptables ip:iproute2 \
	chromium:chromium
system-deps:
	@pkgs=""; for tp in $(SYSTEM_TOOLS); do t=$${tp%%:*}; p=$${tp##*:}; \
	  command -v $$t >/dev/null 2>&1 || pkgs="$$pkgs $$p"; done; \
	pkgs=$$(echo $$pkgs | tr ' ' '\n' | sort -u | tr '\n' ' '); \
	if [ -n "$${pkgs// /}" ]; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    echo "Installing Debian packages:$$pkgs"; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$pkgs >/dev/null; \
	  else \
	    echo "Note: missing$$pkgs and cannot install them here; the tests that need them skip"; \
	  fi; \
	fi

install: $(STAMP) system-deps

$(STAMP): pyproject.toml
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "Tollgate needs Python 3.11 or newer; set PYTHON=/path/to/python3.11")'
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

run: install
	$(BIN)/tollgate up --demo

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: install
	$(BIN)/mypy

test: install lint typecheck
	$(BIN)/pytest -q -ra tests

unit: install
	$(BIN)/pytest -q tests/unit

integration: install
	$(BIN)/pytest -q tests/integration

e2e: install
	$(BIN)/pytest -q tests/e2e

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
