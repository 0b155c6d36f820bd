"""Shared-prefix attention as torch library ops (namespace ``shared_prefix``): the forward and the exact backward.
The extension defines them and registers their CPU and CUDA kernels (the Rust executor) and their autograd in C++
(``csrc/ops.cpp``), so that a call costs no Python past its front end; their fake implementations (shapes, dtypes
and strides, for FakeTensor, meta tracing and ``torch.compile``) are here.

The plan crosses the op boundary as its handle (``Plan.handle``), a tensor: compiled graphs take it as an input
like any other, so a new plan each step neither breaks the graph nor recompiles it.

- ``attention_forward(q, k, v, plan, scale, kernels, window, sinks) -> (out, lse)``
- ``attention_backward(dout, q, k, v, out, lse, plan, scale, kernels, window, sinks) -> (dq, dk, dv, dsinks)``

``window``: a sliding window, ignored where it cuts no row of the plan. ``sinks``: ``[Hq]`` attention-sink logits
(each head's softmax also covers one key with that logit and a zero value), or None; ``dsinks`` is empty without.
Gradients with ``create_graph=True`` work; differentiating them again raises (the kernels' backward is not
differentiable).
"""

from __future__ import annotations

import torch

from . import _core  # noqa: F401  (defines the ops)

attention_forward = torch.ops.shared_prefix.attention_forward.default
attention_backward = torch.ops.shared_prefix.attention_backward.default


def _lse_dtype(q: torch.Tensor) -> torch.dtype:
    return torch.float64 if q.dtype == torch.float64 else torch.float32


@torch.library.register_fake("shared_prefix::attention_forward")
def _forward_fake(q, k, v, plan, scale, kernels, window, sinks):
    return q.new_empty(q.shape[:2] + v.shape[2:]), q.new_empty(q.shape[:2], dtype=_lse_dtype(q))


@torch.library.register_fake("shared_prefix::attention_backward")
def _backward_fake(dout, q, k, v, out, lse, plan, scale, kernels, window, sinks):
    return (q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape),
            q.new_empty(0) if sinks is None else sinks.new_empty(sinks.shape))
