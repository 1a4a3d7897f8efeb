# One command each: `make demo` installs and runs the main job; `make test` installs and runs the tests.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.installed

.PHONY: install demo test test-fast lint bench clean

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	$(PIP) install --quiet -c constraints.txt -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

# Train the digits recipe briefly (about 10 minutes on 2 CPU cores), then generate from a prompt.
demo: $(STAMP)
	$(VENV)/bin/multidiff train recipe=image_digits run_dir=runs/demo
	$(VENV)/bin/multidiff generate model=runs/demo/model prompt="a handwritten digit seven" \
		num_samples=8 seed=0 sampler=dpmpp_2m steps=20 guidance_scale=4.0 out=runs/demo/generated overwrite=true
	@echo "samples: runs/demo/generated (training previews: runs/demo/samples)"

test: $(STAMP)
	$(PY) -m pytest -q

test-fast: $(STAMP)
	$(PY) -m pytest -q -m "not slow"

lint: $(STAMP)
	$(VENV)/bin/ruff check multidiff tests benchmarks

bench: $(STAMP)
	$(PY) benchmarks/image_digits_quality.py

clean:
	rm -rf runs .pytest_cache
