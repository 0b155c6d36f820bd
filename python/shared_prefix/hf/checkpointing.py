"""Activation (gradient) checkpointing: whether a model has it on, and turning it on, across the names
transformers has used and torch's own wrappers. A recompute during backward re-runs attention with the same
keyword arguments, which is why a plan passed as one stays authoritative there (see ``registry``)."""

from __future__ import annotations

from typing import Any

import torch


def checkpointing_on(model: torch.nn.Module) -> bool:
    """Whether activation (gradient) checkpointing is on: transformers' (by its current name: the older
    ``is_gradient_checkpointing`` warns from 5.2x on and goes in v6) or torch's on some submodule
    (``checkpoint_wrapper``, as FSDP's and accelerate's activation checkpointing apply it, or the composable
    ``checkpoint``)."""
    on = getattr(model, "is_activation_checkpointing", None)
    if getattr(model, "is_gradient_checkpointing", False) if on is None else on:
        return True
    try:
        from torch.distributed._composable.contract import _get_registry
        from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import CheckpointWrapper
    except ImportError:  # a torch built without distributed support
        return False
    return any(isinstance(m, CheckpointWrapper) or "checkpoint" in (_get_registry(m) or {}) for m in model.modules())


def enable_checkpointing(model: torch.nn.Module, **checkpoint_kwargs: Any) -> None:
    """Turn activation checkpointing on (non-reentrant unless ``checkpoint_kwargs`` say otherwise) through
    ``activation_checkpointing_enable`` where transformers has it, ``gradient_checkpointing_enable`` before."""
    kwargs = {"use_reentrant": False, **checkpoint_kwargs}
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
