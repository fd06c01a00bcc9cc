# Two commands do everything on a fresh machine with Python 3.11:
#   make demo      - install into .venv, then run the main job, bulk captioning, with the packaged model
#                    (imgcap:flickr8k) on real photos that PyPI wheels ship (imgcap sample-photos)
#   make test      - install into .venv (with test extras), then run the test suite (all but `slow`; what CI runs)
# and, for working on the code:
#   make demo-pipeline - the whole pipeline (draw data -> features -> Ray Train -> captions) on drawn scenes
#   make test-unit - the fast loop: the tests that need no Ray cluster, S3 server, browser or child process
#   make test-all  - every test, the slow ones (full-scale Flickr8k, many images) included
PYTHON ?= python3
VENV   ?= .venv
BIN     = $(VENV)/bin
# The markers of tests that need more than this Python process (registered in pyproject.toml, set by tests/conftest.py).
INTEGRATION = ray or s3 or browser or subprocess
# Two pytest processes (pytest-xdist): every test on a Ray cluster goes to one of them, one after another
# (tests/conftest.py groups them: one Ray cluster at a time), the rest to either. PARALLEL= runs all in one.
PARALLEL ?= -n 2 --dist loadgroup
# Extra pytest arguments, e.g. make test PYTEST_ARGS="--durations=25 -x"
PYTEST_ARGS ?=

.PHONY: demo demo-pipeline test test-unit test-all bench clean browser

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip

$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $@

demo: $(VENV)/.installed
	$(BIN)/imgcap sample-photos runs/demo_photos/photos
	$(BIN)/python jobs/caption.py --config configs/caption_demo.toml

demo-pipeline: $(VENV)/.installed
	$(BIN)/python jobs/pipeline.py --config configs/demo.toml

# Debian's chromium renders the HTML contact sheet in the tests; without it (no root, no apt) they skip.
browser:
	@command -v chromium >/dev/null 2>&1 || { apt-get update -qq && \
		DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; } 2>/dev/null || \
		echo "chromium could not be installed: the HTML report tests will be skipped"

test: $(VENV)/.installed browser
	$(BIN)/python -m pytest -m "not slow" $(PARALLEL) -q $(PYTEST_ARGS)

test-unit: $(VENV)/.installed
	$(BIN)/python -m pytest -m "not slow and not ($(INTEGRATION))" $(PARALLEL) -q $(PYTEST_ARGS)

test-all: $(VENV)/.installed browser
	$(BIN)/python -m pytest $(PARALLEL) -q $(PYTEST_ARGS)

bench: $(VENV)/.installed
	$(BIN)/python benchmarks/bench_captioner.py

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache runs
