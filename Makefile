# Two commands do everything on a fresh machine:
#   make demo   set up .venv and run the demo: the mesh (embedded NATS + every service) and the
#               pipeline on built-in data; the mesh keeps running until Ctrl-C
#   make test   set up .venv and the system packages the tests use, lint, type-check and run the
#               whole test suite
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# Debian packages the tests run, each named after the command it provides: a real Prometheus
# (with promtool) scrapes the metrics service, headless Chromium loads the dashboard.
SYSDEPS := prometheus chromium
# Set to 1 (CI does) to make a missing package that cannot be installed an error, not a skip.
SYSDEPS_REQUIRED ?=

.PHONY: demo up sysdeps test lint typecheck bench clean

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

# Installs only what is missing (one apt-get update), only as root; apt's output is shown only
# when it fails. Elsewhere it says what to install and the tests that need it skip.
sysdeps:
	@missing=; for cmd in $(SYSDEPS); do command -v $$cmd >/dev/null 2>&1 || missing="$$missing $$cmd"; done; \
	[ -n "$$missing" ] || exit 0; \
	if [ "$$(id -u)" != 0 ] || ! command -v apt-get >/dev/null 2>&1; then \
	  echo "sysdeps: missing:$$missing; not installed (needs root and apt-get)." \
	    "Install with: sudo apt-get install --no-install-recommends$$missing" >&2; \
	  [ -z "$(SYSDEPS_REQUIRED)" ] || { echo "sysdeps: SYSDEPS_REQUIRED is set: failing" >&2; exit 1; }; \
	  echo "sysdeps: the tests that need them will skip" >&2; exit 0; \
	fi; \
	echo "sysdeps: apt-get install$$missing"; log=$$(mktemp); \
	if ! { apt-get update -qq && DEBIAN_FRONTEND=noninteractive \
	       apt-get install -y -qq --no-install-recommends $$missing; } >$$log 2>&1; then \
	  cat $$log >&2; rm -f $$log; echo "sysdeps: apt-get failed (output above)" >&2; exit 1; \
	fi; rm -f $$log

test: sysdeps lint typecheck
	$(BIN)/pytest

bench: $(STAMP)
	$(BIN)/python bench/rpc.py
	$(BIN)/python bench/ingest.py
	$(BIN)/python bench/train.py
	$(BIN)/python bench/serve.py

clean:
	rm -rf $(VENV) .aimesh .mypy_cache .ruff_cache .pytest_cache
