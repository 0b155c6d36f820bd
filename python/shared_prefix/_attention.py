"""Shared-prefix attention on packed tensors: the public call, its argument checks and the autocast rule, in front of
the ``shared_prefix::attention_forward`` op (:mod:`shared_prefix._ops`)."""

from __future__ import annotations

import math
import numbers
import os
from typing import Optional

import torch

from ._ops import attention_forward
from ._plan import Plan

def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    plan: Plan,
    *,
    scale: Optional[float] = None,
    kernels: Optional[str] = None,
    window: Optional[int] = None,
    sinks: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Shared-prefix attention on packed tensors.

    ``q`` is ``[T, Hq, D]``, ``k`` and ``v`` are ``[T, Hkv, D]`` with ``Hq % Hkv == 0`` (GQA without repeating K/V);
    ``v`` may have its own head dim ``Dv`` (DeepSeek's MLA), and the output then has it.
    Prompt tokens attend causally within their prompt; completion tokens attend to their group's whole prompt and
    causally to their own completion. Returns ``[T, Hq, Dv]``; forward and backward are exact.

    ``window``: a sliding window as transformers defines it (each token sees itself and the ``window - 1`` tokens
    before it in its own row). The plan must have been made with it (``plan(..., windows=[window])``) unless it is
    at least ``plan.max_seqlen``, when it cuts nothing and is ignored.

    ``sinks``: ``[Hq]`` attention-sink logits (GPT-OSS): each head's softmax also covers one key with that logit and
    a zero value. Differentiable.

    ``kernels`` forces a backend (for tests and measurements): ``"cpu_flash"`` (ATen's CPU flash kernel, the CPU
    default), ``"auto"`` (CUDA fp16/bf16 default: ``"cudnn_views"`` for calls that are one dense batch with ≥ 8192
    keys whose shape recurred in earlier plans, see :func:`cudnn_after`; flash-attention 2 varlen otherwise),
    ``"flash"``, ``"cudnn_views"`` (cuDNN dense attention per run of equal-length segments, on views of the packed
    tensors), ``"cudnn"`` (the same on contiguous copies) or ``"math"`` (explicit matmuls, any device, the CUDA
    fp32/fp64 default, and the CPU kernel for sliding windows). Without it, the environment variable
    ``SHARED_PREFIX_KERNELS`` may name one. The default's settings: :func:`shared_prefix.cudnn_after`,
    :func:`shared_prefix.cudnn_bucket`.
    """
    # Only what the op cannot see is checked here: Python types, and the layouts and devices the dispatcher would
    # refuse without naming the argument. Every value (shapes, dtypes, the plan's device, scale, window, sinks) is
    # checked once, by the op's kernel (src/op.rs).
    if not isinstance(plan, Plan):
        raise TypeError(f"plan: expected a shared_prefix.Plan, got {type(plan).__name__}")
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
        if t.layout != torch.strided:
            raise ValueError(f"{name}: expected a dense (strided) tensor, got layout {t.layout}")
        if t.device.type not in ("cpu", "cuda"):
            raise ValueError(f"{name}: expected a CPU or CUDA tensor, got one on {t.device}")
    if scale is None:
        if q.dim() != 3 or q.shape[-1] == 0:
            raise ValueError(f"q: expected a packed [T, H, D] tensor with D >= 1, got shape {tuple(q.shape)}")
        scale = q.shape[-1] ** -0.5
    if isinstance(scale, bool) or not isinstance(scale, numbers.Real):
        raise TypeError(f"scale: expected a real number, got {type(scale).__name__}")
    try:
        scale = float(scale)
    except OverflowError:  # an int beyond a float's range
        scale = math.inf
    if sinks is not None and not isinstance(sinks, torch.Tensor):
        raise TypeError(f"sinks: expected a tensor or None, got {type(sinks).__name__}")
    if window is not None:
        if isinstance(window, bool) or not isinstance(window, numbers.Integral):
            raise ValueError(f"window: expected a positive int (a sliding window in tokens) or None, got {window!r}")
        window = int(window)
    if kernels is None:
        kernels = os.environ.get("SHARED_PREFIX_KERNELS") or None
    dv = v.shape[-1] if v.dim() == 3 else None
    if q.dim() == k.dim() == 3 and q.shape[-1] == k.shape[-1] and dv and dv != q.shape[-1]:
        # A value head dim unlike the query/key one (DeepSeek's MLA): the kernels take one head dim, so the
        # narrower side gets zero columns (the scores q·k and the first dv output columns are unchanged, and so
        # are their gradients), as transformers does for flash-attention.
        width = max(dv, q.shape[-1])
        q, k, v = (torch.nn.functional.pad(t, (0, width - t.shape[-1])) for t in (q, k, v))
        return _apply(q, k, v, plan, scale, kernels, window, sinks)[..., :dv]
    return _apply(q, k, v, plan, scale, kernels, window, sinks)


def _apply(q, k, v, plan: Plan, scale: float, kernels: Optional[str], window: Optional[int],
           sinks: Optional[torch.Tensor]) -> torch.Tensor:
    device = q.device.type
    if device in _AUTOCAST_DEVICES and torch.is_autocast_enabled(device):
        # As autocast treats scaled_dot_product_attention: fp16/bf16/fp32 operands run in autocast's dtype (fp64
        # stays fp64). Under autocast HF's RoPE returns fp32 q/k beside a bf16 v (cos/sin follow the fp32 hidden
        # states), which SDPA accepts only because autocast casts them. Autograd casts the gradients back.
        q, k, v = (_autocast_operand(t, device) for t in (q, k, v))
    return attention_forward(q, k, v, plan.handle, scale, kernels, window, sinks)[0]


_AUTOCAST_DEVICES = ("cpu", "cuda")


def _autocast_operand(t: torch.Tensor, device: str) -> torch.Tensor:
    if t.dtype in (torch.float16, torch.bfloat16, torch.float32):
        return t.to(torch.get_autocast_dtype(device))
    return t
