"""The LM head under FSDP: the packed forward runs the head on the predictor rows after the model's forward, so
under FSDP2 it must be unsharded through its own unit (for FSDP to reduce its gradient), and under FSDP1 it cannot
be reached at all."""

from __future__ import annotations

import contextlib
from typing import Optional

import torch


@contextlib.contextmanager
def unsharded_lm_head(root: torch.nn.Module, head: Optional[torch.nn.Module] = None):
    """The LM head's ``(weight, bias)`` as FSDP2 hands them to the head's own forward, for code that runs the head
    outside it (after a packed forward that ran it on one row only). A context manager: compute with them inside
    the block.

    With ``reshard_after_forward`` the head is sharded again after the root's forward, in the root's unit or in its
    own. Unsharding the nearest FSDP2 unit that holds it, as that unit's forward would, gives the unsharded
    parameters; FSDP's post-backward then reduce-scatters their gradients across ranks and reshards, as for any
    parameter. Gathering the DTensor directly (``full_tensor()``) would not: its gradient would stay rank-local.
    Under no-grad (no backward will run through them) the unit is resharded on leaving the block, as FSDP2
    reshards after a no-grad forward: left unsharded, the next forward would skip its all-gather and read the
    weights from before the optimizer's step. With grad enabled it stays unsharded even for a frozen head (LoRA):
    the backward to the hidden states reads the weight, and resharding frees its storage.
    Without FSDP2 this is just the head's parameters.
    """
    head = root.get_output_embeddings() if head is None else head
    owner = None
    if is_dtensor(head.weight):
        from torch.distributed.fsdp import FSDPModule

        path = next((name for name, m in root.named_modules() if m is head), None)
        if path is not None:
            parts = path.split(".") if path else []
            for depth in range(len(parts) + 1):  # root first, the head itself last: keep the deepest unit
                m = root.get_submodule(".".join(parts[:depth]))
                if isinstance(m, FSDPModule):
                    owner = m
        if owner is None:
            raise RuntimeError("the LM head's weight is a sharded DTensor but no FSDP2 unit under the model holds "
                               "the head")
        owner.unshard()
        if is_dtensor(head.weight):
            raise RuntimeError("the LM head stayed sharded after unsharding its FSDP2 unit")
    grad_mode = torch.is_grad_enabled()
    try:
        yield head.weight, head.bias
    finally:
        if owner is not None and not grad_mode:
            owner.reshard()


def is_fsdp2(model: torch.nn.Module) -> bool:
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:
        return False
    return isinstance(model, FSDPModule)


def is_dtensor(t: torch.Tensor) -> bool:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # a torch built without distributed support
        return False
    return isinstance(t, DTensor)


def fsdp1_refusal(model: torch.nn.Module) -> Optional[str]:
    """Why the LM head of ``model`` cannot run outside its forward: FSDP1's flat parameters."""
    try:
        from torch.distributed.fsdp import FullyShardedDataParallel
    except ImportError:  # a torch built without distributed support
        return None
    if any(isinstance(m, FullyShardedDataParallel) for m in model.modules()):
        return "FSDP1 (flat parameters): the LM head is not reachable outside its forward"
    return None
