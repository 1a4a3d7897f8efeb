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

test: $(STAMP) browser
	$(PY) -m pytest -q --durations=25

test-fast: $(STAMP)
	$(PY) -m pytest -q -m "not slow"

lint: $(STAMP)
	$(VENV)/bin/ruff check multidiff tests benchmarks

bench: $(STAMP)
	$(PY) benchmarks/image_digits_quality.py

clean:
	rm -rf runs .pytest_cache
