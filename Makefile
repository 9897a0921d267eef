# Two entry points: `make demo` (the offline simulated call) and `make test` (the whole suite).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: demo test install install-test lint

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

install: $(BIN)/python
	$(BIN)/pip install --quiet -e '.[offline]'

install-test: $(BIN)/python
	$(BIN)/pip install --quiet -e '.[offline,test]'
	@# The browser tests drive Debian's Chromium (never a browser downloaded at run time).
	@command -v chromium >/dev/null || { $(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq chromium; }
	@# The Ruby receiver example is syntax-checked with Debian's Ruby.
	@command -v ruby >/dev/null || { $(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq ruby; }

demo: install
	$(BIN)/callbridge demo

lint: install-test
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/ruff format --check src tests benchmarks
	$(BIN)/mypy
	$(BIN)/lint-imports

test: lint
	$(BIN)/pytest
