"""The packed forward: one micro-batch through a transformers causal LM with each prompt forwarded once per group.
``completion_logprobs``, the TRL trainers and the verl plugin all run it; each only translates its framework's
batch in and the results out.

The sequence (:class:`PackedForward`):

1. ``prepare``: the model-support checks a config shows, the plan (with the model's sliding windows), and the
   checks the plan's lengths need, all before any forward;
2. the forward on the packed stream: ``run`` (through the model, its decoder, or a wrapper such as DDP), or the
   caller's own (verl's engine) with ``inputs()``; every attention layer counts itself on this object;
3. ``check``: every decoder layer took the plan and none refused it, else the forward's numbers are discarded;
4. ``logprobs``: the LM head on the predictor rows alone (unsharded through FSDP2), back in ``[B, Lc]`` order.

A :class:`StockFallbacks` keeps, per integration, the reasons already logged and the model classes whose forward
showed that they cannot take a plan.
"""

from __future__ import annotations

import logging
from typing import Callable, Optional, Union

import torch

from .._logprobs import linear_logprobs
from .._plan import Plan, plan as make_plan
from .._refusals import UnsupportedModelError
from .fsdp import is_fsdp2, unsharded_lm_head
from .registry import NAME, PLAN_KWARG, attention_implementation, register
from .support import (lm_head_refusal, load_balancing_loss, model_windows, text_config, unsupported_config,
                      unsupported_for)

logger = logging.getLogger("shared_prefix")

# A head: (predictor rows [Nc, H], weight, bias, targets [Nc], temperature, with_entropy, chunk_size) ->
# (log-probs [Nc], entropy [Nc] or None).
Head = Callable[..., "tuple[torch.Tensor, Optional[torch.Tensor]]"]


# What the integrations log: the fraction of the stock computation's tokens the packed stream did not forward, and
# the fraction of a whole-prompt plan's tokens the prefix tree saved beyond it (0 where rows share only prompts).
TOKENS_SAVED_METRIC = "shared_prefix/tokens_saved_frac"
TREE_TOKENS_SAVED_METRIC = "shared_prefix/tree_tokens_saved_frac"


def tokens_saved(forwarded: int, stock: int, by_prompt: int) -> dict:
    """Both metrics for ``forwarded`` packed tokens against ``stock`` and ``by_prompt`` (whole prompts shared)."""
    return {TOKENS_SAVED_METRIC: 1.0 - forwarded / stock if stock else 0.0,
            TREE_TOKENS_SAVED_METRIC: 1.0 - forwarded / by_prompt if by_prompt else 0.0}


class PackedForward:
    """One forward of a planned micro-batch through ``model`` (a transformers causal LM, unwrapped), and what its
    attention layers reported. Pass it as ``shared_prefix_plan=`` (``inputs()`` does). Make it with
    :meth:`prepare`, which runs the support checks; constructed directly, those checks are the caller's.

    ``root``: the module that holds the LM head for FSDP2 (the model itself, or a wrapper such as a PEFT model).
    ``defer_refusals``: a layer that cannot take the plan records why and the forward goes on (for callers that
    cannot stop the forward midway, such as verl's engine); ``check`` then raises. Otherwise it raises at once.
    """

    def __init__(self, model: torch.nn.Module, plan: Plan, *, root: Optional[torch.nn.Module] = None,
                 defer_refusals: bool = False):
        if not isinstance(plan, Plan):
            raise TypeError(f"plan: expected a shared_prefix.Plan, got {type(plan).__name__}")
        register()  # the implementation run() switches the model to
        self.model = model
        self.root = model if root is None else root
        self.plan = plan
        self.defer_refusals = defer_refusals
        self.attention_calls = 0
        self.refusal: Optional[UnsupportedModelError] = None
        self.router_logits: Optional[tuple] = None

    @classmethod
    def prepare(
        cls,
        model: torch.nn.Module,
        prompt_ids: torch.Tensor,
        prompt_mask: torch.Tensor,
        completion_ids: torch.Tensor,
        completion_mask: torch.Tensor,
        *,
        stock_seq_len: Union[int, str, None] = None,
        root: Optional[torch.nn.Module] = None,
        defer_refusals: bool = False,
        plan: Optional[Plan] = None,
        validate: Optional[Callable[[Plan], None]] = None,
        **planning,
    ) -> "PackedForward":
        """Plan the micro-batch for ``model`` and check everything that can be checked before a forward: the
        config, the plan (the planner's ``ValueError``/``TypeError`` for bad input), ``validate(plan)`` (the
        caller's own input checks), the LM head, and what depends on the micro-batch's lengths. Refusals raise
        :class:`UnsupportedModelError` (``per_batch`` for the lengths).

        ``planning``: :func:`shared_prefix.plan`'s ``group_sizes``/``group_ids``, ``max_depth`` and
        ``min_node_tokens``. ``plan``: one made earlier for these very tensors with the model's windows, reused.
        ``stock_seq_len``: the sequence length the stock forward's RoPE sees: TRL's padded width, ``"longest"`` for a
        batch as long as its longest row (verl's), or None when each row is its own forward."""
        why = unsupported_config(text_config(model))
        if why is not None:
            raise UnsupportedModelError(f"shared_prefix: {why}, which is not supported")
        windows = model_windows(model)
        if plan is None:
            p = make_plan(prompt_ids, prompt_mask, completion_ids, completion_mask, windows=windows, **planning)
        else:
            _check_reused(plan, windows, prompt_ids, completion_ids)
            p = plan
        if validate is not None:
            validate(p)
        why = lm_head_refusal(model)
        if why is not None:
            raise UnsupportedModelError(f"shared_prefix: {why}, which is not supported")
        why = unsupported_for(model, p, p.max_seqlen if stock_seq_len == "longest" else stock_seq_len)
        if why is not None:
            raise UnsupportedModelError(f"shared_prefix: {why}, which is not supported", per_batch=True)
        return cls(model, p, root=root, defer_refusals=defer_refusals)

    # -- what the attention layers report ----------------------------------------------------------------------
    def count_layer(self) -> None:
        self.attention_calls += 1

    def refuse(self, why: str, per_batch: bool) -> None:
        error = UnsupportedModelError(why, per_batch=per_batch)
        if not self.defer_refusals:
            raise error
        if self.refusal is None:
            self.refusal = error

    # -- the forward -------------------------------------------------------------------------------------------
    def inputs(self) -> dict:
        """Keyword arguments for calling the causal LM (or a wrapper of it) on the packed stream when only its last
        hidden state is wanted (the LM head then runs on the predictor rows alone)."""
        p = self.plan
        return {"input_ids": p.input_ids, "position_ids": p.position_ids, "attention_mask": p.attention_mask,
                "output_hidden_states": True, "logits_to_keep": 1, PLAN_KWARG: self}

    def run(self, call: Optional[Callable] = None, *, router_logits: bool = False) -> torch.Tensor:
        """The packed forward, checked: the last hidden state ``[1, T, H]``. ``call``: what to call with
        :meth:`inputs` (a DDP-wrapped model, so that its hooks run); by default the decoder alone (no LM head, no
        tuple of every layer's states), or the model itself under FSDP2 (whose root unit holds the embeddings).
        ``router_logits``: keep a MoE model's router logits for :meth:`aux_loss`."""
        model = self.model
        extra = {"output_router_logits": True} if router_logits else {}
        with attention_implementation(model, NAME):
            if call is None and not is_fsdp2(model) and model.get_decoder() is not model:
                p = self.plan
                out = model.get_decoder()(input_ids=p.input_ids, position_ids=p.position_ids,
                                          attention_mask=p.attention_mask, use_cache=False, **extra,
                                          **{PLAN_KWARG: self})
                hidden = out.last_hidden_state
            else:
                out = (model if call is None else call)(**self.inputs(), use_cache=False, **extra)
                hidden = out.hidden_states[-1]
        self.check()
        if router_logits:
            self.router_logits = out.router_logits
        return hidden

    def aux_loss(self) -> torch.Tensor:
        """A MoE model's auxiliary load-balancing loss as the stock forward of every row gives it (each packed
        token weighted by the rows it stands for), from the router logits :meth:`run` kept."""
        loss = load_balancing_loss(self.model)
        if loss is None or self.router_logits is None:
            raise UnsupportedModelError(f"shared_prefix: {type(self.model).__name__} computes no auxiliary loss this "
                                        "packed forward can weight")
        return loss(self.router_logits, self.plan.token_weights())

    def check(self) -> None:
        """Raise :class:`UnsupportedModelError` unless every attention layer of the model took the plan (one call
        per decoder layer) and none refused it.

        A decoder layer that drops keyword arguments before its attention (StableLM, Nemotron), attention chosen
        outside transformers' ``AttentionInterface`` (Falcon) or token mixers other than attention (hybrid models)
        would otherwise run plain causal attention over the packed stream: wrong numbers, no error."""
        if self.refusal is not None:
            raise self.refusal
        layers = getattr(text_config(self.model), "num_hidden_layers", None)
        calls = self.attention_calls
        if calls == 0 or (isinstance(layers, int) and calls != layers):
            raise UnsupportedModelError(
                f"shared_prefix: {calls} attention call(s) took the plan in a forward of {type(self.model).__name__}, "
                f"which has {layers} layers: its layers drop keyword arguments before attention, choose their "
                "attention outside transformers' AttentionInterface, or mix tokens outside attention, so the packed "
                "completions would see each other")

    # -- the LM head -------------------------------------------------------------------------------------------
    def logprobs(self, hidden: torch.Tensor, temperature: float, *, entropy: bool = False,
                 chunk_size: Optional[int] = None, head: Head = linear_logprobs):
        """Completion log-probs ``[B, Lc]`` (and entropies, or None) from the forward's last hidden state: ``head``
        (by default the memory-lean vocabulary-sliced one) on the predictor rows with the LM head's parameters,
        unsharded through their FSDP2 unit where sharded. 0 at completion padding."""
        p = self.plan
        with unsharded_lm_head(self.root, self.model.get_output_embeddings()) as (weight, bias):
            picked, ent = head(p.predictor_rows(hidden), weight, bias, p.completion_targets(), float(temperature),
                               entropy, chunk_size)
        return p.unpack_completions(picked), (p.unpack_completions(ent) if entropy else None)


def _check_reused(plan, windows, prompt_ids, completion_ids) -> None:
    """A plan handed to ``prepare`` must have been made for tensors of these shapes and for these windows."""
    if not isinstance(plan, Plan):
        raise TypeError(f"plan: expected a shared_prefix.Plan, got {type(plan).__name__}")
    if plan.windows != [w for w in sorted(set(windows)) if w < plan.max_seqlen]:
        raise ValueError("plan: not a plan made for this model's sliding windows")
    if plan.input_shapes != (tuple(prompt_ids.shape), tuple(completion_ids.shape)):
        raise ValueError(f"plan: made for prompts and completions of shapes {plan.input_shapes}, not "
                         f"{tuple(prompt_ids.shape)} and {tuple(completion_ids.shape)}")


class StockFallbacks:
    """An integration's record of why micro-batches went to the stock computation: each reason is logged once,
    and a model class whose forward showed that it cannot take a plan (not the micro-batch's lengths) is not tried
    again."""

    def __init__(self, what: str):
        self.what = what
        self.said: set = set()
        self.refused: dict = {}

    def say(self, why: str) -> None:
        if why not in self.said:
            self.said.add(why)
            logger.warning("%s: %s", self.what, why)

    def refused_reason(self, model: torch.nn.Module) -> Optional[str]:
        return self.refused.get(type(model))

    def forward_failed(self, model: torch.nn.Module, error: UnsupportedModelError) -> None:
        """A packed forward of ``model`` raised ``error`` (in a layer, or in :meth:`PackedForward.check`)."""
        if not error.per_batch:
            self.refused[type(model)] = str(error)
        self.say(str(error))


def version_refusal(package: str, version: str, supported: "tuple[str, str]") -> Optional[str]:
    """Why ``package`` at ``version`` is outside ``supported`` (``(">=lo", "<hi")``), or None."""
    from packaging.version import Version

    lo, hi = (Version(bound.lstrip("<>=")) for bound in supported)
    if lo <= Version(version) < hi:
        return None
    return f"{package} {version} is outside the supported {','.join(supported)}"

