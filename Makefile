# Two commands do everything on a fresh machine with Python 3.11:
#   make demo   - install into .venv, then run the main job on the embedded demo data
#   make test   - install into .venv (with test extras), then run the test suite
PYTHON ?= python3
VENV   ?= .venv
BIN     = $(VENV)/bin

.PHONY: demo test test-all bench clean browser

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip

$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $@

demo: $(VENV)/.installed
	$(BIN)/python jobs/pipeline.py --config configs/demo.toml

# Debian's chromium renders the HTML contact sheet in the tests; without it (no root, no apt) they skip.
browser:
	@command -v chromium >/dev/null 2>&1 || { apt-get update -qq && \
		DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; } 2>/dev/null || \
		echo "chromium could not be installed: the HTML report tests will be skipped"

test: $(VENV)/.installed browser
	$(BIN)/python -m pytest -m "not slow" -q

test-all: $(VENV)/.installed browser
	$(BIN)/python -m pytest -q

bench: $(VENV)/.installed
	$(BIN)/python benchmarks/bench_captioner.py

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache runs
