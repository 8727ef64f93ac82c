# Two commands do everything on a fresh machine:
#   make demo   set up .venv and run the demo: the mesh (embedded NATS + every service) and the
#               pipeline on built-in data; the mesh keeps running until Ctrl-C
#   make test   set up .venv, lint, type-check and run the whole test suite
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo up test lint typecheck bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/aimesh demo

up: $(STAMP)
	$(BIN)/aimesh up

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: $(STAMP)
	$(BIN)/mypy

test: lint typecheck
	$(BIN)/pytest

bench: $(STAMP)
	$(BIN)/python bench/rpc.py
	$(BIN)/python bench/ingest.py
	$(BIN)/python bench/train.py
	$(BIN)/python bench/serve.py

clean:
	rm -rf $(VENV) .aimesh .mypy_cache .ruff_cache .pytest_cache
