# edgefleet: `make demo` brings up a local fleet, `make test` runs every check.
# `make setup` is idempotent: it installs only what is missing or out of date.
SHELL := /bin/bash
.DEFAULT_GOAL := help

VENV ?= .venv
# Test files run on this many workers: most tests wait on processes and sockets, not the CPU, so
# two halve the wall time on two cores without starving the timing-sensitive fault tests; a
# file's tests stay on one worker (they share its fixtures).
TEST_WORKERS ?= 2
PY := $(VENV)/bin/python
BIN := $(VENV)/bin
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
APT_STAMP := /tmp/.edgefleet-apt-updated
DASHBOARD_SOURCES := $(shell find dashboard/src dashboard/index.html dashboard/package.json dashboard/vite.config.ts dashboard/tsconfig.json -type f 2>/dev/null)

.PHONY: help setup system-deps demo test test-postgres lint typecheck pytest bench asyncapi clean

help:
	@echo "make demo   - bring up a local fleet: broker, service, dashboard and three devices"
	@echo "make test   - ruff + mypy (strict) + pytest, against a real mosquitto, SQLite and PostgreSQL"
	@echo "make bench  - run the benchmarks in bench/"
	@echo "make setup  - install everything (idempotent; demo and test run it first)"

setup: system-deps $(VENV)/.installed dashboard/dist/index.html

# Debian packages: the broker and its CLI clients, Chromium for the browser tests, and Prometheus
# (promtool and a real server scrape /metrics in tests/test_metrics.py).
system-deps:
	@missing=""; \
	command -v mosquitto >/dev/null || missing="$$missing mosquitto"; \
	command -v mosquitto_sub >/dev/null || missing="$$missing mosquitto-clients"; \
	[ -x /usr/bin/chromium ] || missing="$$missing chromium"; \
	command -v promtool >/dev/null || missing="$$missing prometheus"; \
	command -v npm >/dev/null || missing="$$missing nodejs npm"; \
	if [ -n "$$missing" ]; then \
	  echo "installing Debian packages:$$missing"; \
	  [ -f $(APT_STAMP) ] || { $(SUDO) apt-get update -qq && touch $(APT_STAMP); }; \
	  DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq $$missing >/dev/null; \
	fi

$(VENV)/.installed: pyproject.toml
	[ -x $(PY) ] || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	touch $@

dashboard/node_modules/.installed: dashboard/package.json dashboard/package-lock.json
	cd dashboard && npm ci --no-audit --no-fund --loglevel=error
	touch $@

dashboard/dist/index.html: dashboard/node_modules/.installed $(DASHBOARD_SOURCES)
	cd dashboard && npm run build --silent

demo: setup
	$(BIN)/edgefleet demo --devices 3

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: setup
	$(BIN)/mypy fleet_protocol broker fleet_service device_agent fleet_sim tests bench

pytest: setup
	$(BIN)/pytest -n $(TEST_WORKERS) --dist loadfile

test: lint typecheck pytest

# The whole suite on PostgreSQL: the fleets that default to SQLite use a fresh database too
# (`make test` already runs every storage test on both).
test-postgres: setup
	EDGEFLEET_TEST_DATABASE=postgres $(BIN)/pytest -n $(TEST_WORKERS) --dist loadfile

bench: setup
	$(PY) bench/ingest.py
	[ -z "$$EDGEFLEET_TEST_POSTGRES_URL" ] || $(PY) bench/ingest.py --postgres "$$EDGEFLEET_TEST_POSTGRES_URL"
	$(PY) bench/commands.py
	[ -z "$$EDGEFLEET_TEST_POSTGRES_URL" ] || $(PY) bench/commands.py --postgres "$$EDGEFLEET_TEST_POSTGRES_URL"
	PYTHONPATH=$(CURDIR) $(PY) bench/inference.py  # its test models come from tests/fixtures/models.py

asyncapi: setup
	$(PY) -m fleet_protocol.asyncapi > fleet_protocol/asyncapi.json

clean:
	rm -rf $(VENV) dashboard/node_modules dashboard/dist .edgefleet
