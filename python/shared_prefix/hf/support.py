"""Model-support policy: which transformers models and micro-batches a plan splits exactly, and why not where it
cannot. Read from configs, modules and plans alone (no transformers import), before a forward and per attention
layer; the pipeline's check after the forward (every layer took the plan) catches what configs do not show."""

from __future__ import annotations

import functools
import inspect
import re
import sys
from typing import Callable, Optional

import torch

from .._plan import Plan
from .._refusals import attention_refusal, lacks_window_tables, missing_window, window_cuts

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
    kind. The packed forward's own check (:meth:`PackedForward.check`) finds the rest."""
    if cfg is None:
        return None
    cfg = as_text_config(cfg)
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


def as_text_config(cfg):
    """A multimodal config's text (decoder) config; any other config, or None, as it is."""
    return cfg.get_text_config() if cfg is not None and hasattr(cfg, "get_text_config") else cfg


def text_config(model: torch.nn.Module):
    """The text (decoder) config of a model, or None."""
    return as_text_config(getattr(model, "config", None))


def model_windows(model: torch.nn.Module) -> list:
    """The sliding windows of the model's attention layers (from its text config, as transformers applies them:
    ``sliding_window`` on the layers ``layer_types`` marks as sliding, or on every layer where there are no layer
    types and ``use_sliding_window`` is not off), for :func:`shared_prefix.plan`'s ``windows``."""
    return config_windows(getattr(model, "config", None))


def config_windows(cfg) -> list:
    """:func:`model_windows` from a config (a multimodal one is read through its text config)."""
    cfg = as_text_config(cfg)
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
    cfg = text_config(model)
    if cfg is None:
        return None
    why = _rope_refusal(cfg, p, stock_seq_len)
    if why is not None:
        return why
    for window in config_windows(cfg):
        if lacks_window_tables(window, p):
            return missing_window(window, p)
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


def layer_window(module: torch.nn.Module, kwargs: dict) -> Optional[int]:
    """The sliding window this attention call applies (a ``sliding_window`` keyword, else the module's attribute):
    an int, or None. The attention op ignores one that cuts no row."""
    window = kwargs.get("sliding_window", getattr(module, "sliding_window", None))
    return window if isinstance(window, int) and not isinstance(window, bool) else None


def layer_refusal(module: Optional[torch.nn.Module], p: Plan, dropout: float,
                  kwargs: dict) -> "tuple[Optional[str], bool]":
    """Why this attention layer cannot take the plan exactly, with the window, softcap and dropout it actually
    applies, and whether the reason is this forward (its micro-batch's lengths, the model's mode) rather than the
    model as configured."""
    why, per_batch = attention_refusal(p, window=layer_window(module, kwargs))
    if why is not None:
        return why, per_batch
    if "sliding_window" not in kwargs and not hasattr(module, "sliding_window"):
        # The layer does not say which window it applies, yet its config has one: its model may apply it through
        # the mask alone (PhiMoE does), which the plan never builds. Refuse rather than attend past it.
        cut = [w for w in config_windows(getattr(module, "config", None)) if window_cuts(w, p)]
        if cut:
            return (f"the config's sliding_window={cut[0]} is shorter than the longest sequence ({p.max_seqlen} "
                    "tokens) and the attention layer does not say whether it applies it"), True
    return attention_refusal(p, softcap=kwargs.get("softcap"), dropout=dropout)


# How transformers' MoE causal LMs (Mixtral, Qwen2/3-MoE, GPT-OSS, OLMoE, …) compute their auxiliary loss.
_AUX_CALL = re.compile(r"load_balancing_loss_func\(\s*outputs\.router_logits,\s*self\.num_experts,\s*"
                       r"self\.num_experts_per_tok,\s*attention_mask,?\s*\)")


def load_balancing_loss(model: torch.nn.Module) -> Optional[Callable]:
    """The model's own auxiliary (load-balancing) loss as ``loss(router_logits, token_weights)`` when its forward
    computes it as transformers' MoE causal LMs do, from every layer's router logits and the attention mask; None
    otherwise. The loss averages routing statistics over the mask's tokens, so token weights in place of the mask
    (how many rows each packed token stands for) give the stock value over the rows exactly."""
    fn = _stock_aux_loss(type(model))
    experts, top_k = getattr(model, "num_experts", None), getattr(model, "num_experts_per_tok", None)
    if fn is None or not isinstance(experts, int) or not isinstance(top_k, int):
        return None
    return lambda router_logits, weights: fn(tuple(router_logits), experts, top_k, weights[None])


@functools.cache
def _stock_aux_loss(cls: type) -> Optional[Callable]:
    """``load_balancing_loss_func`` of ``cls``'s module when ``cls.forward`` calls it as transformers' MoE causal LMs
    do; read once per class (the source check reads a file)."""
    fn = getattr(sys.modules.get(cls.__module__), "load_balancing_loss_func", None)
    try:
        source = inspect.getsource(cls.forward)
    except (OSError, TypeError):
        return None
    return fn if fn is not None and _AUX_CALL.search(source) else None
