# `make run` and `make test` work on a fresh machine: they create .venv/ and install the pinned
# dependencies (constraints.txt) on first use.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: run chat test lint typecheck bench model clean

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet --constraint constraints.txt --editable '.[dev]'
	touch $(STAMP)

run: $(STAMP)
	$(BIN)/chatbot run

chat: $(STAMP)
	$(BIN)/chatbot chat

model: $(STAMP)
	$(BIN)/chatbot model init

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: $(STAMP)
	$(BIN)/mypy

test: lint typecheck
	$(BIN)/pytest

bench: $(STAMP)
	$(BIN)/python benchmarks/starter_corpus_recall.py

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache
