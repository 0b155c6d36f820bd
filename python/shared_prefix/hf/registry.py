"""The ``"shared_prefix"`` attention implementation in transformers' registries, and the attention call a layer
makes when handed a plan.

A model set to ``"shared_prefix"`` and called without ``shared_prefix_plan=`` behaves exactly like ``"sdpa"`` (so
``generate`` works). Called with ``shared_prefix_plan=`` on the packed stream, every attention layer runs ours,
whatever implementation the model is set to (``register`` makes the stock ones plan-aware): gradient
checkpointing recomputes attention during backward, after the model's own implementation may have been restored.

``shared_prefix_plan`` takes a :class:`~shared_prefix.Plan`, or a per-forward object that carries one as ``.plan``
and is told of every layer that takes it (``count_layer()``) or refuses it (``refuse(why, per_batch)``, which
raises unless that forward defers refusals): :class:`~shared_prefix.hf.PackedForward`, which checks afterwards
that every layer took the plan.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from typing import Any, Callable, Optional

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from .._attention import attention
from .._plan import Plan
from .._refusals import UnsupportedModelError
from .checkpointing import checkpointing_on
from .support import layer_refusal, layer_window

NAME = "shared_prefix"
PLAN_KWARG = "shared_prefix_plan"
logger = logging.getLogger("shared_prefix")

_lock = threading.Lock()
_registered = False
_plan_aware: set = set()


class _DeferredMask:
    """What our mask function returns: the sdpa mask, built only if an attention call without a plan needs it.

    With a plan the dense mask is never built. The object is shared by all layers of one forward, so the sdpa mask
    is built at most once. It is deliberately not a tensor: any other attention function receiving it fails loudly.
    """

    __slots__ = ("_args", "_kwargs", "_mask", "_built")

    def __init__(self, args: tuple, kwargs: dict):
        self._args = args
        self._kwargs = kwargs
        self._mask = None
        self._built = False

    def materialize(self):
        if not self._built:
            self._mask = sdpa_mask(*self._args, **self._kwargs)
            self._built = True
        return self._mask


def _deferred_mask(*args, **kwargs) -> _DeferredMask:
    return _DeferredMask(args, kwargs)


def _resolve(value: Any) -> "tuple[Plan, Any]":
    """The plan a layer was handed, and the per-forward object that carries it (None for a bare plan)."""
    if isinstance(value, Plan):
        return value, None
    plan = getattr(value, "plan", None)
    if not isinstance(plan, Plan):
        raise TypeError(f"{PLAN_KWARG}: expected a shared_prefix.Plan (or a PackedForward), got {type(value).__name__}")
    return plan, value


def _refuse(module, forward: Any, why: str, per_batch: bool) -> None:
    why = f"shared_prefix ({type(module).__name__}): {why}"
    if forward is None:
        raise UnsupportedModelError(why, per_batch=per_batch)
    forward.refuse(why, per_batch)


def _planned_attention(module, query, key, value, planned: Any, scaling, dropout, kwargs):
    p, forward = _resolve(planned)
    why, per_batch = layer_refusal(module, p, dropout, kwargs)
    if why is not None:
        _refuse(module, forward, why, per_batch)  # a forward that defers refusals goes on; its result is dropped
    if forward is not None:
        forward.count_layer()
    if query.shape[0] != 1:
        raise ValueError(
            f"{PLAN_KWARG}: the model must run on the packed stream [1, T] (plan.input_ids), got batch {query.shape[0]}"
        )
    window = None if why is not None else layer_window(module, kwargs)  # refused: the result is dropped

    def run(q, k, v, sinks):
        try:
            return attention(q, k, v, p, scale=scaling, window=window, sinks=sinks)
        except RuntimeError as e:
            # A torch built with FLASHATTENTION_DISABLE_LOCAL refuses windows in FA2 with this message (before any
            # launch): the model cannot run here, which TRL and verl answer with the stock method.
            if window is None or "does not support local attention" not in str(e):
                raise
            _refuse(module, forward, f"this torch build's flash-attention has no sliding windows ({e})", False)
            return attention(q, k, v, p, scale=scaling, sinks=sinks)  # deferred: discarded by the caller

    stream = getattr(forward, "stream", None)
    if stream is not None:  # a slice of the stream: exchanged over the sequence-parallel group around the plan's
        return stream.attention(query, key, value, kwargs.get("s_aux"), run).unsqueeze(0), None
    # HF hands [1, H, T, D]; ours is [T, H, D] (a view, no copy).
    q, k, v = query[0].transpose(0, 1), key[0].transpose(0, 1), value[0].transpose(0, 1)
    return run(q, k, v, kwargs.get("s_aux")).unsqueeze(0), None


def shared_prefix_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: Any,
    dropout: float = 0.0,
    scaling: Optional[float] = None,
    **kwargs,
):
    """The ``"shared_prefix"`` entry of transformers' ``AttentionInterface`` (arguments ordered as sdpa's)."""
    p = kwargs.pop(PLAN_KWARG, None)
    if p is not None:
        return _planned_attention(module, query, key, value, p, scaling, dropout, kwargs)
    if isinstance(attention_mask, _DeferredMask):
        attention_mask = attention_mask.materialize()
    return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs)


def _make_plan_aware(fn: Callable) -> Callable:
    # A plan kwarg is authoritative whatever the implementation: gradient checkpointing recomputes layers during
    # backward, after the packed forward has restored the model's own implementation.
    def wrapped(module, query, key, value, attention_mask, *args, **kwargs):
        p = kwargs.pop(PLAN_KWARG, None)
        if p is not None:
            # transformers' functions take (..., attention_mask, dropout, scaling, ...).
            dropout = kwargs.pop("dropout", args[0] if len(args) > 0 else 0.0)
            scaling = kwargs.pop("scaling", args[1] if len(args) > 1 else None)
            return _planned_attention(module, query, key, value, p, scaling, dropout, kwargs)
        return fn(module, query, key, value, attention_mask, *args, **kwargs)

    wrapped.__wrapped__ = fn  # type: ignore[attr-defined]
    wrapped.__name__ = getattr(fn, "__name__", "attention")
    return wrapped


def register() -> None:
    """Register ``"shared_prefix"`` in transformers' ``AttentionInterface`` and ``AttentionMaskInterface``.

    Idempotent. Also makes the stock implementations dispatch to ours when a plan is passed.
    """
    global _registered
    with _lock:
        if _registered:
            return
        for name, fn in list(AttentionInterface._global_mapping.items()):
            if name != NAME and not name.startswith("paged|"):
                AttentionInterface._global_mapping[name] = _make_plan_aware(fn)
                _plan_aware.add(name)
        AttentionInterface.register(NAME, shared_prefix_attention_forward)
        AttentionMaskInterface.register(NAME, _deferred_mask)
        _plan_aware.add(NAME)
        _registered = True


def takes_plan(implementation: str) -> bool:
    """Whether a model set to this attention implementation runs ours when handed a plan (after :func:`register`)."""
    return implementation in _plan_aware


@contextlib.contextmanager
def attention_implementation(model: torch.nn.Module, name: str):
    """Switch the model to ``name`` and restore its own implementation afterwards."""
    previous = model.config._attn_implementation
    if previous == name:
        yield
        return
    model.set_attn_implementation(name)
    try:
        yield
    finally:
        keep = (
            previous not in _plan_aware
            and checkpointing_on(model)
            and torch.is_grad_enabled()
            and model.training
        )
        if keep:
            # Its own implementation (eager or a custom one) cannot take a plan during the checkpoint recompute
            # in backward; "shared_prefix" without a plan is exactly sdpa.
            logger.warning(
                "shared_prefix: leaving the model on 'shared_prefix' (sdpa without a plan) instead of %r, because "
                "gradient checkpointing recomputes attention during backward",
                previous,
            )
        else:
            model.set_attn_implementation(previous)
