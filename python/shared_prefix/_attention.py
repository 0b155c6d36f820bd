"""Shared-prefix attention as a differentiable op. The forward and the exact backward both run in Rust."""

from __future__ import annotations

import contextlib
import math
import numbers
import os
from typing import Optional

import torch

from . import _core
from ._plan import Plan

_FLOAT_KINDS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


class _SharedPrefixAttention(torch.autograd.Function):
    # The log-sum-exp of flash kernels is not differentiable, so autograd through the merge would be silently
    # wrong; the backward here calls each kernel's backward with the merged out/lse instead (DESIGN: exact backward).
    @staticmethod
    def forward(ctx, q, k, v, core_plan, scale, kernels, window, sinks):  # type: ignore[override]
        out, lse = _core.attention_forward(q, k, v, core_plan, scale, kernels, window)
        if sinks is not None:
            # A sink is one more key per head with logit s_h and a zero value: it joins the softmax's denominator.
            # The kernels' backward with the final out/lse stays exact (the sink adds nothing to rowsum(dO∘O)).
            with_sink = torch.logaddexp(lse, sinks.to(lse.dtype))
            out = (out.to(lse.dtype) * (lse - with_sink).exp_().unsqueeze(-1)).to(out.dtype)
            lse = with_sink
        ctx.save_for_backward(q, k, v, out, lse, sinks)
        ctx.core_plan = core_plan
        ctx.scale = scale
        ctx.kernels = kernels
        ctx.window = window
        return out

    @staticmethod
    def backward(ctx, dout):  # type: ignore[override]
        if torch.is_grad_enabled():
            # create_graph=True: the kernels' backward is not differentiable. Refuse rather than return gradients
            # without their second-order terms.
            raise RuntimeError("shared_prefix.attention has no double backward (create_graph=True)")
        q, k, v, out, lse, sinks = ctx.saved_tensors
        # backward() may be called inside an autocast region (whose casts reach the ops the Rust side dispatches);
        # the kernels' backward runs in the forward's dtypes. Entering the context only when needed saves host time.
        device = q.device.type
        with torch.autocast(device, enabled=False) if torch.is_autocast_enabled(device) else contextlib.nullcontext():
            dq, dk, dv = _core.attention_backward(dout, q, k, v, out, lse, ctx.core_plan, ctx.scale, ctx.kernels,
                                                  ctx.window)
            d_sinks = None
            if sinks is not None and ctx.needs_input_grad[7]:
                # d s_h = -Σ_rows p_sink · rowsum(dO∘O), p_sink = e^(s_h - lse).
                row = (dout.to(lse.dtype) * out.to(lse.dtype)).sum(-1)
                d_sinks = -((sinks.to(lse.dtype) - lse).exp() * row).sum(0).to(sinks.dtype)
        return dq, dk, dv, None, None, None, None, d_sinks


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
    if not isinstance(plan, Plan):
        raise TypeError(f"plan: expected a shared_prefix.Plan, got {type(plan).__name__}")
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
        if t.dtype not in _FLOAT_KINDS:
            raise TypeError(f"{name}: expected float16, bfloat16, float32 or float64, got {t.dtype}")
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
        finite = math.isfinite(scale)
    except OverflowError:  # an int beyond a float's range
        finite = False
    if not finite or scale <= 0:
        # ATen's CPU flash kernel returns NaN for scale <= 0; no attention layer uses one.
        raise ValueError(f"scale: must be a finite positive number, got {scale!r}")
    if sinks is not None and (not isinstance(sinks, torch.Tensor) or q.dim() != 3 or sinks.shape != q.shape[1:2]
                              or sinks.device != q.device or not sinks.dtype.is_floating_point):
        raise ValueError(f"sinks: expected a float [Hq] tensor on q's device (one logit per query head), got "
                         f"{tuple(sinks.shape) if isinstance(sinks, torch.Tensor) else type(sinks).__name__}")
    if window is not None:
        if isinstance(window, bool) or not isinstance(window, numbers.Integral) or window < 1:
            raise ValueError(f"window: expected a positive int (a sliding window in tokens) or None, got {window!r}")
        window = int(window) if window < plan.max_seqlen else None  # a window as long as every row cuts nothing
    if kernels is None:
        kernels = os.environ.get("SHARED_PREFIX_KERNELS") or None
    dv = v.shape[-1] if v.dim() == 3 else None
    if q.dim() == k.dim() == 3 and q.shape[-1] == k.shape[-1] and dv and dv != q.shape[-1]:
        # A value head dim unlike the query/key one (DeepSeek's MLA): the kernels take one head dim, so the
        # narrower side gets zero columns (the scores q·k and the first dv output columns are unchanged, and so
        # are their gradients), as transformers does for flash-attention.
        width = max(dv, q.shape[-1])
        q, k, v = (torch.nn.functional.pad(t, (0, width - t.shape[-1])) for t in (q, k, v))
        return _apply(q, k, v, plan, float(scale), kernels, window, sinks)[..., :dv]
    return _apply(q, k, v, plan, float(scale), kernels, window, sinks)


def _apply(q, k, v, plan: Plan, scale: float, kernels: Optional[str], window: Optional[int],
           sinks: Optional[torch.Tensor]) -> torch.Tensor:
    device = q.device.type
    if device in _AUTOCAST_DEVICES and torch.is_autocast_enabled(device):
        # As autocast treats scaled_dot_product_attention: fp16/bf16/fp32 operands run in autocast's dtype (fp64
        # stays fp64). Under autocast HF's RoPE returns fp32 q/k beside a bf16 v (cos/sin follow the fp32 hidden
        # states), which SDPA accepts only because autocast casts them. Autograd casts the gradients back.
        q, k, v = (_autocast_operand(t, device) for t in (q, k, v))
        with torch.autocast(device, enabled=False):  # our kernels run in exactly these dtypes
            return _SharedPrefixAttention.apply(q, k, v, plan.core, scale, kernels, window, sinks)
    return _SharedPrefixAttention.apply(q, k, v, plan.core, scale, kernels, window, sinks)


_AUTOCAST_DEVICES = ("cpu", "cuda")


def _autocast_operand(t: torch.Tensor, device: str) -> torch.Tensor:
    if t.dtype in (torch.float16, torch.bfloat16, torch.float32):
        return t.to(torch.get_autocast_dtype(device))
    return t
