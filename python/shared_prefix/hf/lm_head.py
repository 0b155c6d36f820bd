"""The LM head inside the model's own forward: how the packed forward gets its log-probs under every engine.

Engines hand out whole weights only inside a forward they control: FSDP1's flat parameters and FSDP2's DTensors
are unsharded by the hooks of the unit that holds the head, DeepSpeed ZeRO-3 gathers a module's partitioned
parameters in that module's own pre-forward hook and reduces their gradients through hooks on its outputs. So the
selected-row log-probs (and entropies) are computed in the LM head module's own call, made by the causal LM's own
forward, and each engine gathers and reduces as it does for the stock logits. No engine has code of its own here.

How:

- the packed forward passes ``logits_to_keep`` = the predictor positions, so the causal LM calls its head on
  exactly those rows (``hidden_states[:, logits_to_keep, :]``), and itself as ``shared_prefix_plan=``;
- a forward pre-hook on the causal LM (:func:`install`) sees that keyword and, for that forward only, gives the
  head module a forward that computes the :class:`HeadRequest`'s log-probs from ``self.weight``/``self.bias`` as
  the engine's hooks hand them over; its ``[1, Nc, 1]`` (``[1, Nc, 2]`` with entropies) result takes the logits'
  place in the model's output, so the engine's backward hooks on the head's output fire; a forward hook restores
  the head (also when the forward raises).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Callable, Optional

import torch

from .._refusals import UnsupportedModelError
from .registry import PLAN_KWARG

# A head: (predictor rows [Nc, H], weight, bias, targets [Nc], temperature, with_entropy, chunk_size) ->
# (log-probs [Nc], entropy [Nc] or None).
Head = Callable[..., "tuple[torch.Tensor, Optional[torch.Tensor]]"]

_STATE = "_shared_prefix_lm_head"  # on the causal LM: its _HeadState, made by install()
_MISSING = object()


class _HeadState:
    """Per causal LM: the planned forward running now (None between forwards), the head module its hooks switched
    and that module's own ``forward`` attribute. One object with one head forward for the model's lifetime, so a
    compiled forward sees the same objects every step (a new callable each forward would invalidate its guards)."""

    def __init__(self):
        self.forward = None
        self.head = None
        self.own = _MISSING
        self.selected = functools.partial(_selected_logprobs, self)


@dataclasses.dataclass(frozen=True)
class HeadRequest:
    """What the packed forward asks of the LM head: ``head`` on the predictor rows against ``targets`` (token ids
    in packed order), at ``temperature``, with entropies if ``entropy``, in slices of ``chunk_size`` vocabulary
    columns (None: the head's choice)."""

    head: Head
    targets: torch.Tensor
    temperature: float
    entropy: bool = False
    chunk_size: Optional[int] = None


def output_linear(model: torch.nn.Module) -> Optional[torch.nn.Module]:
    """The module that holds the LM head's weight: ``get_output_embeddings()``, or the module FSDP1 wraps there
    (a size-based auto-wrap policy gives a large head a unit of its own)."""
    head = model.get_output_embeddings()
    return getattr(head, "_fsdp_wrapped_module", head)


def lm_head_refusal(model: torch.nn.Module) -> Optional[str]:
    """Why the model's LM head cannot compute the selected log-probs itself (it must be a ``torch.nn.Linear``)."""
    head = output_linear(model)
    if head is None:
        return f"{type(model).__name__} has no output embeddings (LM head)"
    if not isinstance(head, torch.nn.Linear):
        return f"the LM head is a {type(head).__name__}, not a torch.nn.Linear"
    return None


def install(model: torch.nn.Module) -> None:
    """Register the hooks on ``model`` (the causal LM, or a wrapper its planned forwards are called through) that
    turn its head into the requested log-probs during a forward passed a plan with a head request. Idempotent;
    every other forward (generation, the stock computation) is untouched."""
    if _STATE in model.__dict__:
        return
    model.__dict__[_STATE] = _HeadState()
    model.register_forward_pre_hook(_arm, with_kwargs=True)
    model.register_forward_hook(_disarm, always_call=True)


def _arm(model, args, kwargs):
    forward = kwargs.get(PLAN_KWARG)
    if getattr(forward, "head_request", None) is None:
        return None
    state = getattr(model, _STATE)
    if state.forward is not None:
        raise RuntimeError("shared_prefix: a planned forward of this model is already running")
    head = output_linear(model)
    state.forward, state.head, state.own = forward, head, head.__dict__.get("forward", _MISSING)
    head.forward = state.selected
    return None


def _disarm(model, args, output):
    state = getattr(model, _STATE)
    if state.forward is not None:
        head, own = state.head, state.own
        state.forward, state.head, state.own = None, None, _MISSING
        if own is _MISSING:
            del head.forward
        else:
            head.forward = own
    return None


def _selected_logprobs(state: _HeadState, hidden: torch.Tensor) -> torch.Tensor:
    """The head module's forward during a planned forward: ``[1, Nc, 1]`` log-probs (``[1, Nc, 2]`` with the
    entropies) of the rows the causal LM selected with ``logits_to_keep``."""
    head, forward = state.head, state.forward
    request = forward.head_request
    rows = hidden.reshape(-1, hidden.shape[-1])
    n = request.targets.shape[0]
    if rows.shape[0] != n:
        # The model applied its head to other rows than logits_to_keep selects: nothing here is the plan's.
        forward.refuse(f"shared_prefix: {type(forward.model).__name__} ran its LM head on {rows.shape[0]} rows, not "
                       f"the {n} that logits_to_keep selects", False)
        return rows.new_zeros(1, n, 2 if request.entropy else 1)  # a deferred refusal: the result is dropped
    logp, entropy = request.head(rows.to(head.weight.device), head.weight, head.bias, request.targets,
                                 request.temperature, request.entropy, request.chunk_size)
    forward.count_head()
    return (logp[:, None] if entropy is None else torch.stack([logp, entropy], 1))[None]


def selected(output, forward) -> torch.Tensor:
    """The head's ``[Nc, k]`` result from a planned forward's model output (its ``logits``)."""
    values = output.logits if hasattr(output, "logits") else output[0]
    request = forward.head_request
    k = 2 if request.entropy else 1
    if not isinstance(values, torch.Tensor) or tuple(values.shape) != (1, request.targets.shape[0], k):
        shape = tuple(values.shape) if isinstance(values, torch.Tensor) else type(values).__name__
        raise UnsupportedModelError(f"shared_prefix: {type(forward.model).__name__} transformed its LM head's output "
                                    f"(got {shape}): the log-probs cannot be read back")
    return values[0]
