"""Shared-prefix attention as torch library ops (namespace ``shared_prefix``): the forward and the exact backward,
their CPU and CUDA kernels (the Rust executor), fake implementations (shapes and dtypes, for FakeTensor, meta
tracing and ``torch.compile``) and the forward's autograd formula.

The plan crosses the op boundary as its handle (``Plan.handle``), a tensor: compiled graphs take it as an input
like any other, so a new plan each step neither breaks the graph nor recompiles it.

- ``attention_forward(q, k, v, plan, scale, kernels, window, sinks) -> (out, lse)``
- ``attention_backward(dout, q, k, v, out, lse, plan, scale, kernels, window, sinks) -> (dq, dk, dv, dsinks)``

``window``: a sliding window, ignored where it cuts no row of the plan. ``sinks``: ``[Hq]`` attention-sink logits
(each head's softmax also covers one key with that logit and a zero value), or None; ``dsinks`` is empty without.
"""

from __future__ import annotations

import contextlib

import torch

from . import _core

_LIB = torch.library.Library("shared_prefix", "DEF")
_LIB.define("attention_forward(Tensor q, Tensor k, Tensor v, Tensor plan, float scale, str? kernels, int? window, "
            "Tensor? sinks) -> (Tensor, Tensor)")
_LIB.define("attention_backward(Tensor dout, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, Tensor plan, "
            "float scale, str? kernels, int? window, Tensor? sinks) -> (Tensor, Tensor, Tensor, Tensor)")

attention_forward = torch.ops.shared_prefix.attention_forward.default
attention_backward = torch.ops.shared_prefix.attention_backward.default


def _kernels_in_their_dtypes(device: torch.device):
    # Autocast's state reaches the ATen ops the Rust side dispatches; the kernels run in the operands' dtypes.
    return torch.autocast(device.type, enabled=False) if torch.is_autocast_enabled(device.type) \
        else contextlib.nullcontext()


def _forward(q, k, v, plan, scale, kernels, window, sinks):
    with _kernels_in_their_dtypes(q.device):
        out, lse = _core.attention_forward(q, k, v, plan, scale, kernels, window)
        if sinks is not None:
            # A sink is one more key per head with logit s_h and a zero value: it joins the softmax's denominator.
            # The kernels' backward with the final out/lse stays exact (the sink adds nothing to rowsum(dO∘O)).
            with_sink = torch.logaddexp(lse, sinks.to(lse.dtype))
            out = (out.to(lse.dtype) * (lse - with_sink).exp_().unsqueeze(-1)).to(out.dtype)
            lse = with_sink
    # Contiguous, as the fake implementations say (a compiled graph plans its views on those strides).
    return out.contiguous(), lse.contiguous()


def _backward(dout, q, k, v, out, lse, plan, scale, kernels, window, sinks):
    with _kernels_in_their_dtypes(q.device):
        dq, dk, dv = _core.attention_backward(dout, q, k, v, out, lse, plan, scale, kernels, window)
        dq, dk, dv = dq.contiguous(), dk.contiguous(), dv.contiguous()
        if sinks is None:
            return dq, dk, dv, q.new_empty(0)
        # d s_h = -Σ_rows p_sink · rowsum(dO∘O), p_sink = e^(s_h - lse).
        row = (dout.to(lse.dtype) * out.to(lse.dtype)).sum(-1)
        return dq, dk, dv, -((sinks.to(lse.dtype) - lse).exp() * row).sum(0).to(sinks.dtype)


for _device in ("CPU", "CUDA"):
    _LIB.impl("attention_forward", _forward, _device)
    _LIB.impl("attention_backward", _backward, _device)


def _lse_dtype(q: torch.Tensor) -> torch.dtype:
    return torch.float64 if q.dtype == torch.float64 else torch.float32


@torch.library.register_fake("shared_prefix::attention_forward", lib=_LIB)
def _forward_fake(q, k, v, plan, scale, kernels, window, sinks):
    return q.new_empty(q.shape[:2] + v.shape[2:]), q.new_empty(q.shape[:2], dtype=_lse_dtype(q))


@torch.library.register_fake("shared_prefix::attention_backward", lib=_LIB)
def _backward_fake(dout, q, k, v, out, lse, plan, scale, kernels, window, sinks):
    return (q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape),
            q.new_empty(0) if sinks is None else sinks.new_empty(sinks.shape))


def _setup_context(ctx, inputs, output):
    q, k, v, plan, scale, kernels, window, sinks = inputs
    out, lse = output
    ctx.mark_non_differentiable(lse)
    ctx.save_for_backward(q, k, v, out, lse, plan, sinks)
    ctx.scale, ctx.kernels, ctx.window = scale, kernels, window


def _autograd(ctx, dout, _dlse):
    # The log-sum-exp of flash kernels is not differentiable, so autograd through the merge would be silently
    # wrong; the backward op calls each kernel's backward with the merged out/lse instead (exact).
    if torch.is_grad_enabled() and not torch.compiler.is_compiling():
        # create_graph=True: the kernels' backward is not differentiable. Refuse rather than return gradients
        # without their second-order terms.
        raise RuntimeError("shared_prefix.attention has no double backward (create_graph=True)")
    q, k, v, out, lse, plan, sinks = ctx.saved_tensors
    dq, dk, dv, dsinks = attention_backward(dout, q, k, v, out, lse, plan, ctx.scale, ctx.kernels, ctx.window, sinks)
    return dq, dk, dv, None, None, None, None, (dsinks if sinks is not None and ctx.needs_input_grad[7] else None)


torch.library.register_autograd("shared_prefix::attention_forward", _autograd, setup_context=_setup_context, lib=_LIB)
