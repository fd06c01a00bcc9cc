# Two commands do everything on a fresh machine with Python 3.11:
#   make demo   - install into .venv, then run the main job on the embedded demo data
#   make test   - install into .venv (with test extras), then run the test suite
PYTHON ?= python3
VENV   ?= .venv
BIN     = $(VENV)/bin

.PHONY: demo test test-all bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip

$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $@

demo: $(VENV)/.installed
	$(BIN)/python jobs/pipeline.py --config configs/demo.toml

test: $(VENV)/.installed
	$(BIN)/python -m pytest -m "not slow" -q

test-all: $(VENV)/.installed
	$(BIN)/python -m pytest -q

bench: $(VENV)/.installed
	$(BIN)/python benchmarks/bench_captioner.py

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache runs
