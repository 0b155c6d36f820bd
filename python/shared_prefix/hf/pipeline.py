"""The packed forward: one micro-batch through a transformers causal LM with each prompt forwarded once per group.
``completion_logprobs``, the TRL trainers and the verl plugin all run it; each only translates its framework's
batch in and the results out.

The sequence (:class:`PackedForward`):

1. ``prepare``: the model-support checks a config shows, the plan (with the model's sliding windows), and the
   checks the plan's lengths need, all before any forward;
2. the forward on the packed stream, through the model's own forward: ``run`` (the model, or a wrapper such as
   DDP, DeepSpeed's engine or FSDP), or the caller's own call (verl's engine) with ``inputs()``. Every attention
   layer counts itself on this object, and the LM head, called by the model on the predictor rows alone, computes
   the requested log-probs in its own module call (``lm_head``), where every engine hands it whole weights. Under
   sequence parallelism each rank runs its slice of the stream and the layers exchange over the group
   (``sequence_parallel``);
3. ``check``: every decoder layer took the plan, none refused it and the head ran once, else the forward's
   numbers are discarded; ``outputs`` then gives the log-probs (and entropies) in ``[B, Lc]`` order.

A :class:`StockFallbacks` keeps, per integration, the reasons already logged and the model classes whose forward
showed that they cannot take a plan.
"""

from __future__ import annotations

import logging
from typing import Callable, Optional, Union

import torch

from .._logprobs import linear_logprobs
from .._plan import Plan, plan as make_plan
from .._refusals import UnsupportedModelError, lacks_window_tables
from . import lm_head
from .lm_head import Head, HeadRequest, lm_head_refusal
from .registry import NAME, PLAN_KWARG, attention_implementation, register
from .sequence_parallel import SequenceParallel, StreamSlice, head_refusal
from .support import load_balancing_loss, model_windows, text_config, unsupported_config, unsupported_for

logger = logging.getLogger("shared_prefix")


# What the integrations log: the fraction of the stock computation's tokens the packed stream did not forward, and
# the fraction of a whole-prompt plan's tokens the prefix tree saved beyond it (0 where rows share only prompts).
TOKENS_SAVED_METRIC = "shared_prefix/tokens_saved_frac"
TREE_TOKENS_SAVED_METRIC = "shared_prefix/tree_tokens_saved_frac"


def tokens_saved(forwarded: int, stock: int, by_prompt: int) -> dict:
    """Both metrics for ``forwarded`` packed tokens against ``stock`` and ``by_prompt`` (whole prompts shared)."""
    return {TOKENS_SAVED_METRIC: 1.0 - forwarded / stock if stock else 0.0,
            TREE_TOKENS_SAVED_METRIC: 1.0 - forwarded / by_prompt if by_prompt else 0.0}


class PackedForward:
    """One forward of a planned micro-batch through ``model`` (a transformers causal LM, or a wrapper of it such as
    a PEFT model or FSDP1's, that its forward is called through), and what its attention layers and LM head
    reported. Pass it as ``shared_prefix_plan=`` (``inputs()`` does). Make it with :meth:`prepare`, which runs the
    support checks; constructed directly, those checks are the caller's.

    ``defer_refusals``: a layer that cannot take the plan records why and the forward goes on (for callers that
    cannot stop the forward midway, such as verl's engine); ``check`` then raises. Otherwise it raises at once.

    ``sequence_parallel``: run on this rank's slice of the stream of a Ulysses group (``stream``, a
    :class:`StreamSlice`); the attention layers exchange over the group and ``outputs`` gathers the log-probs.
    """

    def __init__(self, model: torch.nn.Module, plan: Plan, *, defer_refusals: bool = False,
                 sequence_parallel: Optional[SequenceParallel] = None):
        if not isinstance(plan, Plan):
            raise TypeError(f"plan: expected a shared_prefix.Plan, got {type(plan).__name__}")
        if sequence_parallel is not None and not isinstance(sequence_parallel, SequenceParallel):
            raise TypeError(f"sequence_parallel: expected a shared_prefix.hf.SequenceParallel, got "
                            f"{type(sequence_parallel).__name__}")
        register()  # the implementation run() switches the model to
        lm_head.install(model)
        self.model = model
        self.plan = plan
        self.defer_refusals = defer_refusals
        group = sequence_parallel if sequence_parallel is not None and sequence_parallel.size > 1 else None
        self.stream: Optional[StreamSlice] = None if group is None else StreamSlice(plan, group)
        self.attention_calls = 0
        self.head_calls = 0
        self.head_request: Optional[HeadRequest] = None
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
        defer_refusals: bool = False,
        plan: Optional[Plan] = None,
        validate: Optional[Callable[[Plan], None]] = None,
        sequence_parallel: Optional[SequenceParallel] = None,
        **planning,
    ) -> "PackedForward":
        """Plan the micro-batch for ``model`` and check everything that can be checked before a forward: the
        config, the plan (the planner's ``ValueError``/``TypeError`` for bad input), ``validate(plan)`` (the
        caller's own input checks), the LM head, and what depends on the micro-batch's lengths. Refusals raise
        :class:`UnsupportedModelError` (``per_batch`` for the lengths).

        ``planning``: :func:`shared_prefix.plan`'s ``group_sizes``/``group_ids``, ``max_depth`` and
        ``min_node_tokens``. ``plan``: one made earlier for these very tensors with the model's windows, reused.
        ``stock_seq_len``: the sequence length the stock forward's RoPE sees: TRL's padded width, ``"longest"`` for a
        batch as long as its longest row (verl's), or None when each row is its own forward.
        ``sequence_parallel``: this rank's Ulysses group (see the class)."""
        why = unsupported_config(text_config(model))
        if why is None and sequence_parallel is not None:
            why = head_refusal(text_config(model), sequence_parallel.size)
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
        return cls(model, p, defer_refusals=defer_refusals, sequence_parallel=sequence_parallel)

    # -- what the attention layers and the LM head report ---------------------------------------------------------
    def count_layer(self) -> None:
        self.attention_calls += 1

    def count_head(self) -> None:
        self.head_calls += 1

    def refuse(self, why: str, per_batch: bool) -> None:
        error = UnsupportedModelError(why, per_batch=per_batch)
        if not self.defer_refusals:
            raise error
        if self.refusal is None:
            self.refusal = error

    # -- the forward -------------------------------------------------------------------------------------------
    def inputs(self, temperature: float, *, entropy: bool = False, chunk_size: Optional[int] = None,
               head: Head = linear_logprobs) -> dict:
        """Keyword arguments for calling the causal LM (or a wrapper of it) on the packed stream. Its LM head then
        runs on the predictor rows alone and computes, in its own module call, ``head``'s log-probs of the
        completion tokens at ``temperature`` (and entropies), in slices of ``chunk_size`` vocabulary columns
        (``None``: picked from the row count and the vocabulary size). ``head``: by default the memory-lean
        vocabulary-sliced one; :meth:`outputs` reads the result from the model's output."""
        p, stream = self.plan, self.stream
        targets = p.completion_targets()
        if stream is None:
            tokens = {"input_ids": p.input_ids, "position_ids": p.position_ids, "attention_mask": p.attention_mask}
            keep = p.predictor_index
        else:  # this rank's slice, and the predictor rows inside it
            tokens, keep, targets = stream.inputs(), stream.keep, targets.index_select(0, stream.entries)
        self.head_request = HeadRequest(head, targets, float(temperature), bool(entropy), chunk_size)
        # Every micro-batch has other lengths: a compiled model traces them as sizes, not constants.
        for t in (*tokens.values(), keep, targets):
            torch._dynamo.maybe_mark_dynamic(t, t.dim() - 1)
        return {**tokens, "logits_to_keep": keep, PLAN_KWARG: self}

    def run(self, call: Optional[Callable] = None, *, temperature: float, entropy: bool = False,
            chunk_size: Optional[int] = None, head: Head = linear_logprobs, router_logits: bool = False):
        """The packed forward, checked: completion log-probs ``[B, Lc]`` and entropies (or None), 0 at completion
        padding (see :meth:`inputs`). ``call``: what to call with the inputs instead of the model (a DDP, DeepSpeed
        or FSDP wrapper, so that its hooks run). ``router_logits``: keep a MoE model's router logits for
        :meth:`aux_loss`."""
        extra = {"output_router_logits": True} if router_logits else {}
        inputs = self.inputs(temperature, entropy=entropy, chunk_size=chunk_size, head=head)
        with attention_implementation(self.model, NAME), _counting_under_checkpoint():
            out = (self.model if call is None else call)(**inputs, use_cache=False, **extra)
        if router_logits:
            self.router_logits = out.router_logits
        return self.outputs(out)

    def outputs(self, model_output):
        """Log-probs ``[B, Lc]`` and entropies (or None) from the output of a forward called with :meth:`inputs`,
        after :meth:`check`; 0 at completion padding. A completion token several rows share gives each of them its
        value (and, in backward, the sum of their gradients)."""
        self.check()
        values = lm_head.selected(model_output, self)
        if self.stream is not None:
            values = self.stream.gather(values)
        values = self.plan.unpack_completions(values)
        return values[..., 0], (values[..., 1] if self.head_request.entropy else None)

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
        per decoder layer), none refused it, and the LM head computed the requested log-probs once.

        A decoder layer that drops keyword arguments before its attention (StableLM, Nemotron), attention chosen
        outside transformers' ``AttentionInterface`` (Falcon) or token mixers other than attention (hybrid models)
        would otherwise run plain causal attention over the packed stream: wrong numbers, no error. A forward that
        never calls its output embeddings on the selected rows gives no log-probs at all."""
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
        if self.head_request is not None and self.head_calls != 1:
            raise UnsupportedModelError(
                f"shared_prefix: the LM head of {type(self.model).__name__} computed the log-probs {self.head_calls} "
                "times in one forward (once expected): its forward does not call get_output_embeddings() on the "
                "rows logits_to_keep selects")


def _counting_under_checkpoint():
    """Let a compiled forward keep the layers' reports (``count_layer``, ``refuse``) inside activation-checkpointed
    layers, which dynamo otherwise refuses as side effects of the checkpoint (a graph break per layer). Eager
    checkpointing repeats them in backward's recompute, after :meth:`PackedForward.check` has read them; compiled
    ones skip that repeat, which nothing reads."""
    return torch._dynamo.config.patch(skip_fwd_side_effects_in_bwd_under_checkpoint=True)


def _check_reused(plan, windows, prompt_ids, completion_ids) -> None:
    """A plan handed to ``prepare`` must have been made for tensors of these shapes and for these windows."""
    if not isinstance(plan, Plan):
        raise TypeError(f"plan: expected a shared_prefix.Plan, got {type(plan).__name__}")
    if any(lacks_window_tables(w, plan) for w in windows):
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

