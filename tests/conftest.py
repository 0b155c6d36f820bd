import os

import pytest
import torch

# Keep CPU runs reproducible and within the 2-core CI budget.
torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture
def uninitialized_memory_is_nan():
    """Run a test in torch's deterministic mode, whose fresh ``empty`` tensors are NaN-filled (Rust-side allocations
    included): an output or gradient element the code allocates but never writes (a run-coverage, merge-slice or
    head-slice bug) then fails the comparison instead of passing on whatever the allocator's memory held. CPU test
    modules only: on CUDA the mode makes some kernels refuse to run."""
    before = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(before)


@pytest.fixture
def prompts_only():
    """Plans made in the test share whole prompts only (``max_depth=1``): for tests of the one-level layout
    (``[prompts | completions]``) and its three attention calls. Prefix trees have their own tests."""
    import shared_prefix

    before = shared_prefix.set_prefix_tree(max_depth=1)
    try:
        yield
    finally:
        shared_prefix.set_prefix_tree(**before)


def pytest_report_header(config):
    import transformers

    import shared_prefix

    return (f"torch {torch.__version__}, transformers {transformers.__version__} ({transformers.__file__}), "
            f"shared_prefix from {shared_prefix.__file__}")


def pytest_configure(config):
    # `make test` reruns the HF/TRL tests over a newer transformers: fail rather than silently test the venv's.
    expected = os.environ.get("SHARED_PREFIX_EXPECT_TRANSFORMERS")
    if expected:
        import transformers

        if transformers.__version__ != expected:
            raise pytest.UsageError(f"expected transformers {expected} first on the path, got "
                                    f"{transformers.__version__} from {transformers.__file__}")
    # `make test-torch` runs the core tests under another torch: fail rather than test the wrong one.
    expected = os.environ.get("SHARED_PREFIX_EXPECT_TORCH")
    if expected and torch.__version__.split("+")[0] != expected:
        raise pytest.UsageError(f"expected torch {expected}, got {torch.__version__}")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)
