"""Shared-prefix attention as a differentiable op. The forward and the exact backward both run in Rust."""

from __future__ import annotations

import math
import numbers
import os
from typing import Optional

import torch

from . import _core
from ._plan import _FLOAT_KINDS, Plan


class _SharedPrefixAttention(torch.autograd.Function):
    # The log-sum-exp of flash kernels is not differentiable, so autograd through the merge would be silently
    # wrong; the backward here calls each kernel's backward with the merged out/lse instead (DESIGN: exact backward).
    @staticmethod
    def forward(ctx, q, k, v, core_plan, scale, kernels):  # type: ignore[override]
        out, lse = _core.attention_forward(q, k, v, core_plan, scale, kernels)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.core_plan = core_plan
        ctx.scale = scale
        ctx.kernels = kernels
        return out

    @staticmethod
    def backward(ctx, dout):  # type: ignore[override]
        if torch.is_grad_enabled():
            # create_graph=True: the kernels' backward is not differentiable. Refuse rather than return gradients
            # without their second-order terms.
            raise RuntimeError("shared_prefix.attention has no double backward (create_graph=True)")
        q, k, v, out, lse = ctx.saved_tensors
        # backward() may be called inside an autocast region; the kernels' backward runs in the forward's dtypes.
        with torch.autocast(q.device.type, enabled=False):
            dq, dk, dv = _core.attention_backward(dout, q, k, v, out, lse, ctx.core_plan, ctx.scale, ctx.kernels)
        return dq, dk, dv, None, None, None


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    plan: Plan,
    *,
    scale: Optional[float] = None,
    kernels: Optional[str] = None,
) -> torch.Tensor:
    """Shared-prefix attention on packed tensors.

    ``q`` is ``[T, Hq, D]``, ``k`` and ``v`` are ``[T, Hkv, D]`` with ``Hq % Hkv == 0`` (GQA without repeating K/V);
    ``v`` may have its own head dim ``Dv`` (DeepSeek's MLA), and the output then has it.
    Prompt tokens attend causally within their prompt; completion tokens attend to their group's whole prompt and
    causally to their own completion. Returns ``[T, Hq, Dv]``; forward and backward are exact.

    ``kernels`` forces a backend (for tests and measurements): ``"cpu_flash"`` (ATen's CPU flash kernel, the CPU
    default), ``"auto"`` (CUDA fp16/bf16 default: cuDNN for calls that are one dense batch with ≥ 8192 keys,
    flash-attention 2 varlen otherwise), ``"flash"``, ``"cudnn"`` (cuDNN dense attention per run of equal-length
    segments), ``"cudnn_views"`` (the same without copying operands to contiguous tensors; experimental, not yet
    verified on a GPU) or ``"math"`` (explicit matmuls, any device, the CUDA fp32/fp64 default). Without it, the
    environment variable ``SHARED_PREFIX_KERNELS`` may name one.
    """
    if not isinstance(plan, Plan):
        raise TypeError(f"plan: expected a shared_prefix.Plan, got {type(plan).__name__}")
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
        if t.dtype not in _FLOAT_KINDS:
            raise TypeError(f"{name}: expected float16, bfloat16, float32 or float64, got {t.dtype}")
    if scale is None:
        if q.dim() != 3 or q.shape[-1] == 0:
            raise ValueError(f"q: expected a packed [T, H, D] tensor with D >= 1, got shape {tuple(q.shape)}")
        scale = q.shape[-1] ** -0.5
    if isinstance(scale, bool) or not isinstance(scale, numbers.Real):
        raise TypeError(f"scale: expected a real number, got {type(scale).__name__}")
    if not math.isfinite(scale) or scale <= 0:
        # ATen's CPU flash kernel returns NaN for scale <= 0; no attention layer uses one.
        raise ValueError(f"scale: must be a finite positive number, got {scale!r}")
    if kernels is None:
        kernels = os.environ.get("SHARED_PREFIX_KERNELS") or None
    dv = v.shape[-1] if v.dim() == 3 else None
    if q.dim() == k.dim() == 3 and q.shape[-1] == k.shape[-1] and dv and dv != q.shape[-1]:
        # A value head dim unlike the query/key one (DeepSeek's MLA): the kernels take one head dim, so the
        # narrower side gets zero columns (the scores q·k and the first dv output columns are unchanged, and so
        # are their gradients), as transformers does for flash-attention.
        width = max(dv, q.shape[-1])
        q, k, v = (torch.nn.functional.pad(t, (0, width - t.shape[-1])) for t in (q, k, v))
        return _apply(q, k, v, plan, float(scale), kernels)[..., :dv]
    return _apply(q, k, v, plan, float(scale), kernels)


def _apply(q, k, v, plan: Plan, scale: float, kernels: Optional[str]) -> torch.Tensor:
    device = q.device.type
    if device in _AUTOCAST_DEVICES and torch.is_autocast_enabled(device):
        # As autocast treats scaled_dot_product_attention: fp16/bf16/fp32 operands run in autocast's dtype (fp64
        # stays fp64). Under autocast HF's RoPE returns fp32 q/k beside a bf16 v (cos/sin follow the fp32 hidden
        # states), which SDPA accepts only because autocast casts them. Autograd casts the gradients back.
        q, k, v = (_autocast_operand(t, device) for t in (q, k, v))
        with torch.autocast(device, enabled=False):  # our kernels run in exactly these dtypes
            return _SharedPrefixAttention.apply(q, k, v, plan._core, scale, kernels)
    return _SharedPrefixAttention.apply(q, k, v, plan._core, scale, kernels)


_AUTOCAST_DEVICES = ("cpu", "cuda")


def _autocast_operand(t: torch.Tensor, device: str) -> torch.Tensor:
    if t.dtype in (torch.float16, torch.bfloat16, torch.float32):
        return t.to(torch.get_autocast_dtype(device))
    return t
