# One venv and one cargo target dir outside the clone, so repeated builds are incremental.
CACHE ?= $(HOME)/.cache/shared_prefix
VENV ?= $(CACHE)/venv
export CARGO_TARGET_DIR ?= $(CACHE)/target
PY := $(VENV)/bin/python

.PHONY: demo test build bench wheel

$(VENV)/.installed: requirements-dev.txt
	python3 -m venv $(VENV)
	$(PY) -m pip install --upgrade pip
	$(PY) -m pip install -r requirements-dev.txt
	touch $@

# Build the extension (release) into the venv; torch from the venv provides libtorch.
build: $(VENV)/.installed
	VIRTUAL_ENV=$(VENV) PATH=$(VENV)/bin:$$PATH maturin develop --release

demo: build
	$(PY) -m shared_prefix.demo

test: build
	PATH=$(VENV)/bin:$$PATH cargo test -p planner
	$(PY) -m pytest -q

bench: build
	$(PY) -m shared_prefix.bench --preset cpu-small --out bench-out

# An abi3 wheel (one wheel for CPython >= 3.9), libtorch not bundled.
wheel: $(VENV)/.installed
	PATH=$(VENV)/bin:$$PATH maturin build --release --out dist
