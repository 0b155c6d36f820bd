"""shared_prefix: forward each GRPO prompt once for all its completions, with exact outputs and gradients.

Import order matters: torch first, so the Rust extension links against the libtorch already loaded.
"""

import torch  # noqa: F401  (loads libtorch before the extension)

from ._torch_check import check_extension, check_torch

check_torch()  # before the extension loads: one built for another torch would fail there, or worse

from . import _core  # noqa: E402
from ._attention import attention  # noqa: E402
from ._kernels import cudnn_after, cudnn_bucket  # noqa: E402
from ._plan import Plan, plan, set_prefix_tree  # noqa: E402
from ._refusals import UnsupportedModelError  # noqa: E402

check_extension(_core.TORCH_VERSION)

__all__ = ["Plan", "plan", "set_prefix_tree", "attention", "cudnn_after", "cudnn_bucket",
           "register", "completion_logprobs", "UnsupportedModelError"]
__version__ = "0.1.0"


# Integration modules load on first use (``sp.hf.…`` works without importing ``shared_prefix.hf`` first).
_SUBMODULES = ("hf", "trl", "verl", "compat", "bench", "demo")


def __getattr__(name):
    # transformers is imported only when an HF entry point is used.
    if name in ("register", "completion_logprobs"):
        from . import hf

        return getattr(hf, name)
    if name in _SUBMODULES:
        import importlib

        return importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module 'shared_prefix' has no attribute {name!r}")
