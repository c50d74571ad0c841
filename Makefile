# Tollgate: `make run` starts the whole system with a demo fleet; `make test` runs the suite.
# Everything needed is installed here, into .venv, from the package registries.
SHELL := /bin/bash
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install system-deps bpf run test lint typecheck unit integration e2e bench clean

# Debian packages: iptables and iproute2 for the meter (accounting chains, network
# namespaces); clang, libbpf-dev (headers) and libbpf1 (loaded at run time) for its
# per-cgroup eBPF counters; chromium and two font packages for the web page's browser
# test. Installed when missing and we may (root with apt-get); elsewhere the tests that
# need them skip.
DEB_PACKAGES := iptables iproute2 clang libbpf-dev libbpf1 chromium fonts-dejavu-core fonts-liberation
system-deps:
	@command -v dpkg-query >/dev/null 2>&1 || { echo "Note: not a Debian system; install $(DEB_PACKAGES) yourself or the tests that need them skip"; exit 0; }; \
	missing=""; for p in $(DEB_PACKAGES); do \
	  dpkg-query -W -f='$${Status}' $$p 2>/dev/null | grep -q "ok installed" || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    echo "Installing Debian packages:$$missing"; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null; \
	  else \
	    echo "Note: missing$$missing and cannot install them here; the tests that need them skip"; \
	  fi; \
	fi

install: $(STAMP) system-deps bpf

# The meter's cgroup_skb programs, compiled once here (no CO-RE: the object loads on any
# kernel with cgroup-BPF). Without clang or the headers the meter falls back to iptables.
BPF_SRC := services/meter/bpf/cgroup_net.bpf.c
BPF_OBJ := services/meter/bpf/cgroup_net.bpf.o
bpf: system-deps
	@if command -v clang >/dev/null 2>&1 && [ -f /usr/include/bpf/bpf_helpers.h ]; then \
	  $(MAKE) --no-print-directory $(BPF_OBJ); \
	else \
	  echo "Note: clang or libbpf-dev missing: $(BPF_OBJ) not built; the meter counts cgroups' traffic with iptables instead (egress only)"; \
	fi

$(BPF_OBJ): $(BPF_SRC)
	clang -O2 -g -Wall -target bpf -I/usr/include/$$(uname -m)-linux-gnu -c $< -o $@

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

# Benchmarks against raw baselines in the same run: quick mode (< 5 min) by default,
# BENCH_FULL=1 for the 10M-event runs. Prints a table, writes bench/results/latest.json.
bench: install
	BENCH_FULL=$(BENCH_FULL) $(BIN)/python -m bench

clean:
	rm -f $(BPF_OBJ)
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
