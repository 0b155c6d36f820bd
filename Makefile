# One venv per torch and one cargo target dir per torch, outside the clone, so repeated builds are incremental and
# switching torch never reuses objects built for another libtorch (the build command adds torch-X.Y to the target dir).
CACHE ?= $(HOME)/.cache/shared_prefix
VENV ?= $(CACHE)/venv
export CARGO_TARGET_DIR ?= $(CACHE)/target
PY := $(VENV)/bin/python
BUILD := build_backend/shared_prefix_build.py

.PHONY: demo test test-dev build bench wheel wheels torch-install test-torch check-torch-mismatch

$(VENV)/.installed: requirements-dev.txt
	python3 -m venv $(VENV)
	$(PY) -m pip install --upgrade pip
	$(PY) -m pip install -r requirements-dev.txt
	touch $@

# Build the extension (release) into the dev venv (torch 2.11), editable.
build: $(VENV)/.installed
	$(PY) $(BUILD) develop

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

# Every test: the dev venv's (torch 2.11), the core tests under the newest supported torch, and the check that a build
# for one torch refuses to load under another.
test: test-dev test-torch check-torch-mismatch

test-dev: build $(LATEST)/.installed
	PATH=$(VENV)/bin:$$PATH cargo test -p planner
	$(PY) -m pytest -q
	PYTHONPATH=$(LATEST) SHARED_PREFIX_EXPECT_TRANSFORMERS=$(LATEST_VERSION) $(PY) -m pytest -q $(LATEST_TESTS)

bench: build
	$(PY) -m shared_prefix.bench --preset cpu-small --out bench-out

# Another supported torch (TORCH=2.13.0, 2.14.0, 2.15.0): a venv of its own with only what the core tests need, the
# extension built for it as a wheel and installed (the editable tree serves the dev venv's torch), then the core tests.
TORCH ?= 2.15.0
TVENV := $(CACHE)/venv-torch$(TORCH)
CORE_TESTS := tests/test_attention.py tests/test_plan.py tests/test_hf.py tests/test_logprobs.py

$(TVENV)/.installed: requirements-torch.txt
	python3 -m venv $(TVENV)
	$(TVENV)/bin/python -m pip install --upgrade pip
	$(TVENV)/bin/python -m pip install torch==$(TORCH) -r requirements-torch.txt
	touch $@

torch-install: $(TVENV)/.installed
	rm -rf $(CACHE)/dist-torch$(TORCH)
	$(TVENV)/bin/python $(BUILD) wheel $(CACHE)/dist-torch$(TORCH)
	$(TVENV)/bin/python -m pip install --no-deps --force-reinstall $(CACHE)/dist-torch$(TORCH)/*.whl

test-torch: torch-install
	SHARED_PREFIX_EXPECT_TORCH=$(TORCH) $(TVENV)/bin/python -m pytest -q -p no:cacheprovider $(CORE_TESTS)

# The package built for TORCH refuses to load under the dev venv's torch, with an ImportError naming both.
check-torch-mismatch: torch-install $(VENV)/.installed
	rm -rf $(CACHE)/mismatch && mkdir -p $(CACHE)/mismatch
	cp -r "$$($(TVENV)/bin/python -c 'import importlib.util as u; print(u.find_spec("shared_prefix").submodule_search_locations[0])')" $(CACHE)/mismatch/
	PYTHONPATH=$(CACHE)/mismatch $(PY) scripts/check_torch_mismatch.py $(TORCH)

# One abi3 wheel per supported torch, labelled with it (dist/shared_prefix-0.1.0+torch2.13-cp39-abi3-….whl), for every
# CPython >= 3.10; libtorch is never bundled. Each torch other than the dev venv's uses its test-torch venv.
wheel: $(VENV)/.installed
	$(PY) $(BUILD) wheel dist

wheels: wheel
	for t in 2.13.0 2.14.0 2.15.0; do $(MAKE) --no-print-directory $(CACHE)/venv-torch$$t/.installed TORCH=$$t && \
	  $(CACHE)/venv-torch$$t/bin/python $(BUILD) wheel dist || exit 1; done
