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

# The newest transformers the `hf` extra allows (requirements-latest.txt), over the dev venv.
LATEST := $(CACHE)/transformers-latest
LATEST_VERSION := $(shell sed -n 's/^transformers==//p' requirements-latest.txt)
LATEST_TESTS := tests/test_hf.py tests/test_families.py tests/test_logprobs.py tests/test_trl.py tests/test_compat.py tests/test_bench.py

$(LATEST)/.installed: requirements-latest.txt $(VENV)/.installed
	rm -rf $(LATEST)
	$(PY) -m pip install --no-deps --target $(LATEST) -r requirements-latest.txt
	touch $@

test: build $(LATEST)/.installed
	PATH=$(VENV)/bin:$$PATH cargo test -p planner
	$(PY) -m pytest -q
	PYTHONPATH=$(LATEST) SHARED_PREFIX_EXPECT_TRANSFORMERS=$(LATEST_VERSION) $(PY) -m pytest -q $(LATEST_TESTS)

bench: build
	$(PY) -m shared_prefix.bench --preset cpu-small --out bench-out

# An abi3 wheel (one wheel for every CPython >= 3.10, torch 2.11's range), libtorch not bundled.
wheel: $(VENV)/.installed
	PATH=$(VENV)/bin:$$PATH maturin build --release --out dist
