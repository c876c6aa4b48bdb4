# gistress: `make demo` and `make test` each do all their own set-up on a fresh clone.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-dev
export MLFLOW_DISABLE_TELEMETRY ?= true
export YOLO_OFFLINE ?= 1

.PHONY: demo test lint venv clean ui

$(VENV)/bin/python:
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip

$(STAMP): pyproject.toml | $(VENV)/bin/python
	$(PY) -m pip install -q -e '.[dev]'
	touch $(STAMP)

venv: $(STAMP)

# one pytest worker per core (at most 4): the tests run single-threaded (tests/conftest.py)
test: $(STAMP)
	$(PY) -m pytest -n auto --maxprocesses 4

lint: $(STAMP)
	$(VENV)/bin/ruff check suite variants bench tests examples

demo: $(STAMP)
	$(VENV)/bin/gistress study runs/quickstart.yaml --profile smoke

ui: $(STAMP)
	$(VENV)/bin/gistress ui

clean:
	rm -rf $(VENV) mlruns mlflow.db gistress-out
