# One command each: `make demo` installs and runs the main job; `make test` installs and runs the tests.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.installed

.PHONY: install browser demo test test-fast lint bench clean serve

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	$(PIP) install --quiet -c constraints.txt -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

# Debian's chromium + chromedriver for the browser tests of `multidiff serve` (needs root or sudo).
browser:
	bash scripts/install_browser.sh

# Train the digits recipe briefly (about 10 minutes on 2 CPU cores), then generate from a prompt.
demo: $(STAMP)
	$(VENV)/bin/multidiff train recipe=image_digits run_dir=runs/demo
	$(VENV)/bin/multidiff generate model=runs/demo/model prompt="a handwritten digit seven" \
		num_samples=8 seed=0 sampler=dpmpp_2m steps=20 guidance_scale=4.0 out=runs/demo/generated overwrite=true
	@echo "samples: runs/demo/generated (training previews: runs/demo/samples)"

# A web page for the demo model (after `make demo`): open http://127.0.0.1:7860
serve: $(STAMP)
	$(VENV)/bin/multidiff serve model=runs/demo/model out=runs/demo/served

# Two pytest workers (pytest-xdist), each running whole test files, with one intra-op thread each: on
# 2 cores this takes the suite from ~27 to ~17 minutes (tiny tensors gain nothing from a second thread,
# and two workers of two threads would oversubscribe). TEST_WORKERS=0 runs it in one process.
TEST_WORKERS ?= 2
PYTEST_PARALLEL := -n $(TEST_WORKERS) --dist loadfile

test: $(STAMP) browser
	OMP_NUM_THREADS=1 $(PY) -m pytest -q $(PYTEST_PARALLEL) --durations=25

test-fast: $(STAMP)
	OMP_NUM_THREADS=1 $(PY) -m pytest -q $(PYTEST_PARALLEL) -m "not slow"

lint: $(STAMP)
	$(VENV)/bin/ruff check multidiff tests benchmarks

bench: $(STAMP)
	$(PY) benchmarks/image_digits_quality.py

clean:
	rm -rf runs .pytest_cache
