# recloop developer commands. `make setup` is idempotent: it reinstalls only when the lock changed.
PY ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.lock-stamp

.PHONY: setup lock demo test test-fast lint clean

setup: $(STAMP)

$(STAMP): requirements.lock pyproject.toml
	@command -v $(PY) >/dev/null 2>&1 || { echo "need $(PY) on PATH"; exit 1; }
	@test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check --no-deps -r requirements.lock
	$(BIN)/pip install --quiet --disable-pip-version-check --no-deps --no-build-isolation -e .
	@touch $(STAMP)

lock:  ## recompile requirements.lock from requirements.in (needs uv; torch CPU build from a local wheel dir)
	uv pip compile requirements.in -o requirements.lock --python-version 3.11 --no-header \
		--custom-compile-command "make lock" $(if $(WHEELS),--find-links $(WHEELS),)

demo: setup  ## the main job: the whole loop on the embedded synthetic data, ending with a served model
	$(BIN)/recloop demo

test: setup  ## the whole suite, slow end-to-end tests included
	$(BIN)/python -m pytest

test-fast: setup
	$(BIN)/python -m pytest -m "not slow"

lint: setup
	$(BIN)/ruff check .

clean:
	rm -rf .recloop .pytest_cache
