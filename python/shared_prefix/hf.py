"""Hugging Face transformers integration: the ``"shared_prefix"`` attention implementation and completion log-probs.

A model set to ``"shared_prefix"`` and called without ``shared_prefix_plan=`` behaves exactly like ``"sdpa"``
(so ``generate`` works). Called with ``shared_prefix_plan=plan`` on the packed stream, it runs our attention.
"""

from __future__ import annotations

import contextlib
import logging
import math
import threading
from typing import Any, Callable, Hashable, Optional, Sequence, Union

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from ._attention import attention
from ._logprobs import check_linear_head, check_token_ids, linear_logprobs
from ._plan import Plan, plan as make_plan

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


def _window_refusal(window: int, p: Plan) -> str:
    return (f"sliding_window={window} is shorter than the longest sequence ({p.max_seqlen} tokens) and the plan was "
            f"made without it (shared_prefix.plan(..., windows=[{window}]))")


def _cuts(window: Any, p: Plan) -> bool:
    return isinstance(window, int) and not isinstance(window, bool) and window < p.max_seqlen


def _layer_window(module: torch.nn.Module, p: Plan, kwargs: dict) -> Optional[int]:
    """The sliding window this attention call applies (a ``sliding_window`` keyword, else the module's attribute),
    if it cuts some row of ``p``; None otherwise."""
    window = kwargs.get("sliding_window", getattr(module, "sliding_window", None))
    return window if _cuts(window, p) else None


def _unsupported(module: torch.nn.Module, p: Plan, dropout: float, kwargs: dict) -> "tuple[Optional[str], bool]":
    """Why this attention layer cannot take the plan exactly, and whether the reason is this micro-batch's length
    (rather than the model as configured)."""
    window = _layer_window(module, p, kwargs)
    if window is not None and window not in p.windows:
        return _window_refusal(window, p), True
    if "sliding_window" not in kwargs and not hasattr(module, "sliding_window"):
        # The layer does not say which window it applies, yet its config has one: its model may apply it through
        # the mask alone (PhiMoE does), which the plan never builds. Refuse rather than attend past it.
        cut = [w for w in _config_windows(getattr(module, "config", None)) if _cuts(w, p)]
        if cut:
            return (f"the config's sliding_window={cut[0]} is shorter than the longest sequence ({p.max_seqlen} "
                    "tokens) and the attention layer does not say whether it applies it"), True
    if kwargs.get("softcap") is not None:
        return "attention logit softcapping is not supported", False
    if dropout and dropout > 0:
        return f"attention dropout ({dropout}) in train mode is not supported; set attention_dropout=0", False
    return None, False


class UnsupportedModelError(NotImplementedError):
    """The model, or this micro-batch, cannot run shared-prefix attention exactly (the stock computation can).
    TRL's and verl's integrations catch it and fall back to the stock computation."""


def _refuse(module, p: Plan, why: str, per_batch: bool) -> None:
    """Raise :class:`UnsupportedModelError`, or, where the caller cannot stop the forward (verl), record the first
    reason on the plan and let the forward go on; its caller discards it."""
    why = f"shared_prefix ({type(module).__name__}): {why}"
    if not p._defer_refusal:
        raise UnsupportedModelError(why)
    if p._refusal is None:
        p._refusal, p._refusal_per_batch = why, per_batch


def _plan_attention(module, query, key, value, p: Plan, scaling, dropout, kwargs):
    if not isinstance(p, Plan):
        raise TypeError(f"{PLAN_KWARG}: expected a shared_prefix.Plan, got {type(p).__name__}")
    why, per_batch = _unsupported(module, p, dropout, kwargs)
    if why is not None:
        _refuse(module, p, why, per_batch)
    p.attention_calls += 1
    if query.shape[0] != 1:
        raise ValueError(
            f"{PLAN_KWARG}: the model must run on the packed stream [1, T] (plan.input_ids), got batch {query.shape[0]}"
        )
    # HF hands [1, H, T, D]; ours is [T, H, D] (a view, no copy).
    q, k, v = query[0].transpose(0, 1), key[0].transpose(0, 1), value[0].transpose(0, 1)
    window = _layer_window(module, p, kwargs)
    window = window if window in p.windows else None  # a deferred refusal goes on without it; its result is dropped
    try:
        out = attention(q, k, v, p, scale=scaling, window=window, sinks=kwargs.get("s_aux"))
    except RuntimeError as e:
        # A torch built with FLASHATTENTION_DISABLE_LOCAL refuses windows in FA2 with this message (before any
        # launch): the model cannot run here, which TRL and verl answer with the stock method.
        if window is None or "does not support local attention" not in str(e):
            raise
        _refuse(module, p, f"this torch build's flash-attention has no sliding windows ({e})", False)
        out = attention(q, k, v, p, scale=scaling, sinks=kwargs.get("s_aux"))  # deferred: discarded by the caller
    return out.unsqueeze(0), None


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
        return _plan_attention(module, query, key, value, p, scaling, dropout, kwargs)
    if isinstance(attention_mask, _DeferredMask):
        attention_mask = attention_mask.materialize()
    return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs)


@contextlib.contextmanager
def unsharded_lm_head(root: torch.nn.Module, head: Optional[torch.nn.Module] = None):
    """The LM head's ``(weight, bias)`` as FSDP2 hands them to the head's own forward, for code that runs the head
    outside it (after ``packed_model_inputs``'s forward, which ran it on one row). A context manager: compute with
    them inside the block.

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
    if _is_dtensor(head.weight):
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
        if _is_dtensor(head.weight):
            raise RuntimeError("the LM head stayed sharded after unsharding its FSDP2 unit")
    grad_mode = torch.is_grad_enabled()
    try:
        yield head.weight, head.bias
    finally:
        if owner is not None and not grad_mode:
            owner.reshard()


def _is_fsdp2(model: torch.nn.Module) -> bool:
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:
        return False
    return isinstance(model, FSDPModule)


def _is_dtensor(t: torch.Tensor) -> bool:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # a torch built without distributed support
        return False
    return isinstance(t, DTensor)


def packed_model_inputs(p: Plan) -> dict:
    """Keyword arguments for calling a (possibly wrapped) causal LM on the packed stream when only its last
    hidden state is wanted (the LM head then runs on the predictor rows alone)."""
    return {
        "input_ids": p.input_ids,
        "position_ids": p.position_ids,
        "attention_mask": p.attention_mask,
        "output_hidden_states": True,
        "logits_to_keep": 1,
        PLAN_KWARG: p,
    }


def _make_plan_aware(fn: Callable) -> Callable:
    # A plan kwarg is authoritative whatever the implementation: gradient checkpointing recomputes layers during
    # backward, after completion_logprobs has restored the model's own implementation.
    def wrapped(module, query, key, value, attention_mask, *args, **kwargs):
        p = kwargs.pop(PLAN_KWARG, None)
        if p is not None:
            # transformers' functions take (..., attention_mask, dropout, scaling, ...).
            dropout = kwargs.pop("dropout", args[0] if len(args) > 0 else 0.0)
            scaling = kwargs.pop("scaling", args[1] if len(args) > 1 else None)
            return _plan_attention(module, query, key, value, p, scaling, dropout, kwargs)
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


_SOFTCAPS = ("final_logit_softcapping", "attn_logit_softcapping")
# Logit multipliers and divisors: Granite/MiniCPM3 `logits_scaling`, Cohere `logit_scale`, Falcon-H1 and others.
_SCALES = ("logits_scaling", "logit_scale", "output_multiplier", "lm_head_multiplier")


# Layer kinds that mix tokens by attention alone (transformers' `layer_types` vocabulary); any other kind (linear
# attention, Mamba/SSM, convolution, recurrent blocks) runs along the packed stream, so a completion would see the
# completions packed before it.
_ATTENTION_LAYER_TYPES = frozenset({"full_attention", "sliding_attention", "chunked_attention", "attention"})
_LAYER_TYPE_KEYS = ("layer_types", "layers_block_type", "block_types")
_RECURRENT_PREFIXES = ("mamba_", "ssm_", "linear_num_", "conv_L_cache")


def unsupported_config(cfg) -> Optional[str]:
    """Why a model's logits are not plain ``lm_head(hidden)``, its attention not plain softmax, or its layers mix
    tokens outside attention (hybrid recurrent/convolution models); None when the config shows nothing of the
    kind. :func:`check_planned_forward` checks the rest on the forward itself."""
    if cfg is None:
        return None
    cfg = _as_text_config(cfg)
    for attr in _SOFTCAPS + _SCALES:
        value = getattr(cfg, attr, None)
        if value is not None and (attr in _SOFTCAPS or value != 1):
            return f"the model config sets {attr}={value}"
    for key in _LAYER_TYPE_KEYS:
        kinds = getattr(cfg, key, None)
        if isinstance(kinds, (list, tuple)):
            other = sorted({str(k) for k in kinds} - _ATTENTION_LAYER_TYPES)
            if other:
                return (f"the model has {', '.join(other)} layers ({key}), which mix tokens outside attention: "
                        "packed completions would see each other")
    recurrent = sorted(a for a in vars(cfg) if a.startswith(_RECURRENT_PREFIXES))
    if recurrent:
        return f"the model config has recurrent/state-space layers ({recurrent[0]}), which mix tokens outside attention"
    return None


def _as_text_config(cfg):
    """A multimodal config's text (decoder) config; any other config, or None, as it is."""
    return cfg.get_text_config() if cfg is not None and hasattr(cfg, "get_text_config") else cfg


def _text_config(model: torch.nn.Module):
    return _as_text_config(getattr(model, "config", None))


def model_windows(model: torch.nn.Module) -> list:
    """The sliding windows of the model's attention layers (from its text config, as transformers applies them:
    ``sliding_window`` on the layers ``layer_types`` marks as sliding, or on every layer where there are no layer
    types and ``use_sliding_window`` is not off), for :func:`shared_prefix.plan`'s ``windows``."""
    return _config_windows(getattr(model, "config", None))


def _config_windows(cfg) -> list:
    """:func:`model_windows` from a config (a multimodal one is read through its text config)."""
    cfg = _as_text_config(cfg)
    window = getattr(cfg, "sliding_window", None)
    if not isinstance(window, int) or isinstance(window, bool) or window < 1:
        return []
    kinds = getattr(cfg, "layer_types", None)
    if isinstance(kinds, (list, tuple)):
        windowed = "sliding_attention" in kinds
    else:
        windowed = getattr(cfg, "use_sliding_window", True)
    return [window] if windowed else []


def unsupported_for(model: torch.nn.Module, p: Plan, stock_seq_len: Optional[int] = None) -> Optional[str]:
    """Why this micro-batch cannot run exactly on this model (whose config :func:`unsupported_config` has passed),
    judged from the config before any forward: windows shorter than its longest sequence that the plan has no key
    tables for (plans made with :func:`model_windows` have them), Llama 4's chunked attention or
    position-dependent attention temperature beyond their first block, RoPE whose frequencies depend on the
    forward's length unlike the stock computation's (see :func:`_rope_refusal`; ``stock_seq_len``: the sequence
    length the stock forward's RoPE sees, None when each row is its own forward). The attention layers check
    again on the forward, with the window and the dropout they actually use (a config's dropout rate may be
    switched off in the modules, as TRL's disable_dropout does)."""
    cfg = _text_config(model)
    if cfg is None:
        return None
    why = _rope_refusal(cfg, p, stock_seq_len)
    if why is not None:
        return why
    for window in _config_windows(cfg):
        if window < p.max_seqlen and window not in p.windows:
            return _window_refusal(window, p)
    chunk = getattr(cfg, "attention_chunk_size", None)
    if isinstance(chunk, int) and chunk < p.max_seqlen:
        return f"chunked attention (attention_chunk_size={chunk}) is shorter than the longest sequence"
    floor = getattr(cfg, "floor_scale", None)
    if getattr(cfg, "attn_temperature_tuning", False) and isinstance(floor, int) and p.num_tokens >= floor:
        # Llama 4 scales queries by their cache position, which in the packed stream is not the row's position.
        return f"attention temperature tuning over a packed stream of {p.num_tokens} >= floor_scale={floor} tokens"
    return None


def _rope_parameters(cfg) -> list:
    """The config's RoPE parameter dicts (one, or one per layer type as Gemma 3 has them)."""
    params = getattr(cfg, "rope_parameters", None)
    if params is None:
        params = getattr(cfg, "rope_scaling", None)  # transformers before 5
    if not isinstance(params, dict):
        return []
    if "rope_type" in params or "type" in params:
        return [params]
    return [v for v in params.values() if isinstance(v, dict)]


def _rope_refusal(cfg, p: Plan, stock_seq_len: Optional[int]) -> Optional[str]:
    """Longrope and dynamic RoPE pick their frequencies per forward from its largest position (transformers'
    ``dynamic_rope_update``): the packed stream's is its longest row, the stock forward's is ``stock_seq_len``
    (TRL's padded width; verl's longest row) or, per row alone, each row's length. Refuse where the two would
    pick differently: longrope on opposite sides of ``original_max_position_embeddings``; dynamic NTK scaling at
    all (its frequencies also depend on the longest forward seen before)."""
    for params in _rope_parameters(cfg):
        kind = str(params.get("rope_type", params.get("type", "default")))
        if kind == "longrope":
            limit = params.get("original_max_position_embeddings") or getattr(
                cfg, "original_max_position_embeddings", None)
            if not isinstance(limit, int):
                continue
            # Each row alone picks by its own length: all agree with the packed forward iff the shortest does.
            stock = (p.min_seqlen if stock_seq_len is None else stock_seq_len) > limit
            if stock != (p.max_seqlen > limit):
                seen = (f"rows of {p.min_seqlen}-{p.max_seqlen} tokens" if stock_seq_len is None else
                        f"a stock forward of {stock_seq_len} tokens and a packed one of {p.max_seqlen}")
                return (f"longrope picks its frequencies by the forward's length, and {seen} lie on both sides of "
                        f"original_max_position_embeddings={limit}")
        elif "dynamic" in kind:
            limit = getattr(cfg, "max_position_embeddings", None)
            longest = max(p.max_seqlen, stock_seq_len or 0)
            if isinstance(limit, int) and longest >= limit:
                return (f"dynamic RoPE scaling rescales its frequencies by the forward's length beyond "
                        f"max_position_embeddings={limit} ({longest} tokens here)")
    return None


def check_planned_forward(model: torch.nn.Module, p: Plan, calls_before: int) -> None:
    """After a forward on ``p``'s packed stream: raise :class:`UnsupportedModelError` unless every attention layer
    of the model took the plan (``p.attention_calls`` grew by the number of layers) and none refused it.

    A decoder layer that drops keyword arguments before its attention (StableLM, Nemotron), attention classes
    chosen outside transformers' ``AttentionInterface`` (Falcon) or token mixers other than attention (hybrid
    models) would otherwise run plain causal attention over the packed stream: wrong numbers, no error."""
    if p._refusal is not None:
        raise UnsupportedModelError(p._refusal)
    calls = p.attention_calls - calls_before
    layers = getattr(_text_config(model), "num_hidden_layers", None)
    if calls == 0 or (isinstance(layers, int) and calls != layers):
        raise UnsupportedModelError(
            f"shared_prefix: {calls} attention call(s) took the plan in a forward of {type(model).__name__}, which "
            f"has {layers} layers: its layers drop keyword arguments before attention, choose their attention "
            "outside transformers' AttentionInterface, or mix tokens outside attention, so the packed completions "
            "would see each other"
        )


def _check_model(model: torch.nn.Module) -> None:
    why = unsupported_config(getattr(model, "config", None))
    if why is not None:
        raise UnsupportedModelError(f"shared_prefix: {why}, which is not supported")


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


@contextlib.contextmanager
def _attn_implementation(model: torch.nn.Module, name: str):
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


def _lm_head(model: torch.nn.Module) -> torch.nn.Linear:
    head = model.get_output_embeddings()
    if head is None:
        raise TypeError(f"model: {type(model).__name__} has no output embeddings (LM head)")
    check_linear_head(head)
    return head


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
):
    """Per-token log-probs of the completions, ``[B, Lc]``, computed with each prompt forwarded once per group.

    Each value equals what the row gives alone through the stock model, ``log_softmax(logits / temperature)`` at
    the completion token, and 0 at completion padding. Gradients reach the model's parameters. Returns
    ``(logprobs, entropy)`` when ``return_entropy``.

    The LM head runs over slices of ``chunk_size`` vocabulary columns (``None``: picked from the row count and the
    vocabulary size) with an exact recomputing backward, so full-vocabulary logits never exist for all rows at once.
    """
    if not isinstance(model, torch.nn.Module) or not hasattr(model, "get_decoder"):
        raise TypeError(f"model: expected a transformers causal LM, got {type(model).__name__}")
    if isinstance(temperature, bool) or not (
        isinstance(temperature, (int, float)) and math.isfinite(temperature) and temperature > 0
    ):
        raise ValueError(f"temperature: must be a finite positive number, got {temperature!r}")
    _check_model(model)
    register()
    p = make_plan(prompt_ids, prompt_mask, completion_ids, completion_mask, group_sizes=group_sizes,
                  group_ids=group_ids, windows=model_windows(model))
    for name, ids in (("prompt_ids", prompt_ids), ("completion_ids", completion_ids)):
        if ids.dtype not in (torch.int64, torch.int32):  # the planner takes narrower ids; embeddings do not
            raise TypeError(f"{name}: the model's embeddings take int64 or int32 token ids, got {ids.dtype}")
    embeddings = model.get_input_embeddings()
    if isinstance(embeddings, torch.nn.Embedding):  # the valid tokens only: ids at padding are never read
        check_token_ids(p.input_ids, embeddings.num_embeddings, "prompt_ids, completion_ids")
    head = _lm_head(model)
    why = unsupported_for(model, p)
    if why is not None:
        raise UnsupportedModelError(f"shared_prefix: {why}, which is not supported")
    decoder = model.get_decoder()
    calls = p.attention_calls
    with _attn_implementation(model, NAME):
        if _is_fsdp2(model) or decoder is model:
            # Through the root's forward, so FSDP2 gathers the root unit's parameters (the embeddings); the head
            # is then unsharded through its unit, so its gradient is reduced like any other. (Also for models
            # whose get_decoder() is the model itself.)
            hidden = model(**packed_model_inputs(p), use_cache=False).hidden_states[-1]
        else:  # the decoder alone: no LM head on any row, no tuple of every layer's hidden states
            hidden = decoder(
                input_ids=p.input_ids,
                position_ids=p.position_ids,
                attention_mask=p.attention_mask,
                use_cache=False,
                **{PLAN_KWARG: p},
            ).last_hidden_state
    check_planned_forward(model, p, calls)
    with unsharded_lm_head(model, head) as (weight, bias):  # the head's own parameters unless FSDP2 resharded them
        picked, entropy = linear_logprobs(p.predictor_rows(hidden), weight, bias, p.completion_targets(),
                                          float(temperature), return_entropy, chunk_size)
    logprobs = p.unpack_completions(picked)
    if return_entropy:
        return logprobs, p.unpack_completions(entropy)
    return logprobs
