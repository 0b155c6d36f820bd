"""Hugging Face transformers integration.

- :func:`completion_logprobs`: per-token completion log-probs of a causal LM with each prompt forwarded once per
  group, exactly as each row alone through the stock model.
- :func:`register`: the ``"shared_prefix"`` attention implementation (``registry``); a model set to it behaves as
  ``"sdpa"`` unless handed a plan.
- :class:`PackedForward`: the packed forward every integration runs (``pipeline``).
- Model support (``support``), the LM head inside the model's forward under every engine (``lm_head``),
  sequence parallelism over the packed stream (``sequence_parallel``) and activation checkpointing
  (``checkpointing``).
"""

from __future__ import annotations

import math
from typing import Hashable, Optional, Sequence, Union

import torch

from .._logprobs import check_linear_head, check_token_ids
from .._plan import Plan
from .._refusals import UnsupportedModelError
from .checkpointing import checkpointing_on, enable_checkpointing
from .lm_head import output_linear
from .pipeline import PackedForward, StockFallbacks
from .registry import NAME, PLAN_KWARG, register
from .sequence_parallel import SequenceParallel
from .support import model_windows, unsupported_config, unsupported_for

__all__ = ["completion_logprobs", "register", "PackedForward", "SequenceParallel", "StockFallbacks",
           "UnsupportedModelError", "model_windows", "unsupported_config", "unsupported_for", "checkpointing_on",
           "enable_checkpointing", "NAME", "PLAN_KWARG"]


def completion_logprobs(
    model: torch.nn.Module,
    prompt_ids: torch.Tensor,
    prompt_mask: torch.Tensor,
    completion_ids: torch.Tensor,
    completion_mask: torch.Tensor,
    *,
    temperature: float = 1.0,
    group_sizes: Optional[Union[int, Sequence[int]]] = None,
    group_ids: Optional[Union[torch.Tensor, Sequence[Hashable]]] = None,
    return_entropy: bool = False,
    chunk_size: Optional[int] = None,
    max_depth: Optional[int] = None,
    min_node_tokens: Optional[int] = None,
):
    """Per-token log-probs of the completions, ``[B, Lc]``, computed with each shared prefix forwarded once.

    Each value equals what the row gives alone through the stock model, ``log_softmax(logits / temperature)`` at
    the completion token, and 0 at completion padding. Gradients reach the model's parameters. Returns
    ``(logprobs, entropy)`` when ``return_entropy``.

    The LM head runs over slices of ``chunk_size`` vocabulary columns (``None``: picked from the row count and the
    vocabulary size) with an exact recomputing backward, so full-vocabulary logits never exist for all rows at once.

    ``max_depth``, ``min_node_tokens``: how far prefixes are shared (see :func:`shared_prefix.set_prefix_tree`).
    """
    if not isinstance(model, torch.nn.Module) or not hasattr(model, "get_decoder"):
        raise TypeError(f"model: expected a transformers causal LM, got {type(model).__name__}")
    if isinstance(temperature, bool) or not (
        isinstance(temperature, (int, float)) and math.isfinite(temperature) and temperature > 0
    ):
        raise ValueError(f"temperature: must be a finite positive number, got {temperature!r}")

    def validate(p: Plan) -> None:  # bad input is the caller's error, before any refusal of the model
        for name, ids in (("prompt_ids", prompt_ids), ("completion_ids", completion_ids)):
            if ids.dtype not in (torch.int64, torch.int32):  # the planner takes narrower ids; embeddings do not
                raise TypeError(f"{name}: the model's embeddings take int64 or int32 token ids, got {ids.dtype}")
        embeddings = model.get_input_embeddings()
        if isinstance(embeddings, torch.nn.Embedding):  # the valid tokens only: ids at padding are never read
            check_token_ids(p.input_ids, embeddings.num_embeddings, "prompt_ids, completion_ids")
        head = output_linear(model)
        if head is None:
            raise TypeError(f"model: {type(model).__name__} has no output embeddings (LM head)")
        check_linear_head(head)

    forward = PackedForward.prepare(model, prompt_ids, prompt_mask, completion_ids, completion_mask,
                                    group_sizes=group_sizes, group_ids=group_ids, max_depth=max_depth,
                                    min_node_tokens=min_node_tokens, validate=validate)
    logprobs, entropy = forward.run(temperature=temperature, entropy=return_entropy, chunk_size=chunk_size)
    return (logprobs, entropy) if return_entropy else logprobs
