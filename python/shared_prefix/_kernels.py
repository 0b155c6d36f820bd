"""The kernel policy's process-wide settings (the Rust core's ``policy`` module), as context managers that restore
the previous value on leaving the block."""

from __future__ import annotations

import contextlib
import numbers

from . import _core


@contextlib.contextmanager
def _setting(setter, value):
    before = setter(value)
    try:
        yield
    finally:
        setter(before)


def self_calls(mode: str):
    """Inside the block, run the prefixes' and completions' causal calls apart (``"split"``, DESIGN's calls 1
    and 3), as one (``"fused"``) or as the kernels prefer (``"auto"``, the default: one call on flash-attention 2,
    apart on the kernels that run per run of equal segments). Read when a layer runs; for tests and benchmarks."""
    return _setting(_core.set_self_calls, mode)


def cudnn_after(plans: int):
    """Inside the block, plans made on CUDA give an fp16/bf16 attention call to cuDNN (under the default
    ``kernels="auto"``) once ``plans`` earlier plans had its shape (by default 8).

    Only calls that are one dense batch of at least 8192 keys qualify. cuDNN's first call of a shape builds a
    graph, which costs more than its steady-state gain over flash-attention 2 for several steps, so the default
    waits for a shape to recur; ``cudnn_after(0)`` suits fixed-shape runs (padded batches, benchmarks).
    ``Plan.auto_kernels`` tells what a plan will use.
    """
    if isinstance(plans, bool) or not isinstance(plans, numbers.Integral) or not 0 <= plans < 2**32:
        raise ValueError(f"plans: expected an int >= 0 (earlier plans of a shape before cuDNN), got {plans!r}")
    return _setting(_core.set_cudnn_after, int(plans))


def cudnn_bucket(tokens: int):
    """Inside the block, plans pad their causal self-attention calls of at least 8192 keys that run on dense
    kernels (cuDNN; also the CPU and explicit-math kernels) at each segment's tail to a multiple of ``tokens`` rows
    (0: no padding, the default).

    Plans whose prompts (one length per plan: prompts of different lengths are separate runs, on flash-attention
    2) fall in one bucket then share one cuDNN graph for the prefixes' call (cuDNN builds one per shape), and count
    as one shape for :func:`cudnn_after`. Exact (no real query sees a padded key; padded rows add nothing to any
    gradient), at the cost of copies into padded buffers and up to ``tokens - 1`` extra rows per segment.
    Experimental: not yet measured on a GPU.
    """
    if isinstance(tokens, bool) or not isinstance(tokens, numbers.Integral) or not 0 <= tokens < 2**31:
        raise ValueError(f"tokens: expected an int >= 0 (a padding multiple; 0 for none), got {tokens!r}")
    return _setting(_core.set_cudnn_bucket, int(tokens))
