"""TRL integration: GRPO/RLOO trainers that forward each prompt once per group, with identical training.

    from shared_prefix.trl import SharedPrefixGRPOTrainer as GRPOTrainer   # the one-line swap

Supported: trl >= 1.16, < 1.17 (the override matches ``_get_per_token_logps_and_entropies`` of trl 1.16.0).

The override computes the policy, old and reference log-probs (and entropies) with one plan per micro-batch:
groups are rows with identical prompts (TRL shuffles rows, so groups are not consecutive); prompts are left-padded
and completions right-padded as TRL builds them; the first completion token is predicted by the group's last prompt
token; the LM head, temperature and entropy go through TRL's own chunked log-prob kernel, so the numbers are TRL's.
The LM head runs inside the model's own forward, so DDP, DeepSpeed ZeRO-2/ZeRO-3 and FSDP1/FSDP2 gather and reduce it
through their own hooks. Multimodal inputs, MoE auxiliary losses other than transformers' own, and anything else we
do not support fall back to the stock method, with the reason logged once.
"""

from __future__ import annotations

import weakref
from typing import Any, Optional

import torch

from ._refusals import UnsupportedModelError
from .hf.lm_head import lm_head_refusal
from .hf.pipeline import (TOKENS_SAVED_METRIC, TREE_TOKENS_SAVED_METRIC, PackedForward, StockFallbacks, tokens_saved,
                          version_refusal)
from .hf.registry import register
from .hf.support import load_balancing_loss, model_windows, text_config, unsupported_config

SUPPORTED_TRL = (">=1.16", "<1.17")
# Keyword arguments that carry multimodal inputs: the packed stream has no place for them.
_MULTIMODAL_KEYS = ("pixel_values", "image_grid_thw", "num_images", "pixel_attention_mask", "spatial_shapes",
                    "num_tiles", "image_sizes", "token_type_ids", "mm_token_type_ids", "image_position_ids")
# Logged per step: tokens saved against TRL's padded rows, and what the prefix tree saves beyond whole prompts.
METRIC, TREE_METRIC = TOKENS_SAVED_METRIC, TREE_TOKENS_SAVED_METRIC
_EXPECTED_PARAMS = ("model", "input_ids", "attention_mask", "logits_to_keep", "batch_size", "compute_entropy",
                    "compute_aux_loss")


def _check_trl(stock_method) -> None:
    """The supported trl versions, and the signature of the method we override (checked, not assumed)."""
    import inspect

    import trl

    why = version_refusal("trl", trl.__version__, SUPPORTED_TRL)
    if why is not None:
        raise ImportError(f"shared_prefix.trl: {why}")
    params = tuple(inspect.signature(stock_method).parameters)
    if params[: len(_EXPECTED_PARAMS)] != _EXPECTED_PARAMS:
        raise ImportError(f"shared_prefix.trl: {stock_method.__qualname__}{params} is not the signature overridden")


def _group_shuffle(seq_dict: dict) -> dict:
    """Shuffle whole groups (runs of rows with the same prompt) instead of rows, so micro-batches keep groups."""
    prompt_ids = seq_dict["prompt_ids"]
    rows = prompt_ids.shape[0]
    starts = torch.ones(rows, dtype=torch.bool)
    if rows > 1:
        starts[1:] = (prompt_ids[1:] != prompt_ids[:-1]).any(-1).cpu()
    group = starts.long().cumsum(0) - 1
    order = torch.randperm(int(group[-1]) + 1)
    # Rows of the groups in their new order, each group's rows kept in place.
    permutation = torch.argsort(torch.argsort(order)[group], stable=True)

    def permute(v):
        if v is None or (isinstance(v, torch.Tensor) and v.ndim == 0):
            return v
        if isinstance(v, torch.Tensor):
            return v[permutation.to(v.device)]
        return [v[i] for i in permutation.tolist()]

    return {k: permute(v) for k, v in seq_dict.items()}


class _PlanReuse:
    """The plans of the last call's micro-batches, for a later call on the very same (unmodified) tensors: TRL
    computes the old and the reference log-probs of a batch with the same ``input_ids`` and ``attention_mask``.
    Keyed by the tensors' identity (held weakly) and version counters, so an in-place change or a new tensor plans
    afresh."""

    def __init__(self):
        self._tensors: tuple = ()
        self._state: tuple = ()
        self._plans: dict = {}

    def lookup(self, input_ids, attention_mask, logits_to_keep, batch_size) -> dict:
        if torch.is_inference(input_ids) or torch.is_inference(attention_mask):
            return {}  # inference tensors keep no version counter: plan afresh
        alive = [ref() for ref in self._tensors]
        state = (input_ids._version, attention_mask._version, logits_to_keep, batch_size)
        if len(alive) != 2 or alive[0] is not input_ids or alive[1] is not attention_mask or self._state != state:
            self._tensors = (weakref.ref(input_ids), weakref.ref(attention_mask))
            self._state, self._plans = state, {}
        return self._plans


class SharedPrefixMixin:
    """The override, shared by the GRPO and RLOO trainers (both define the same method in trl 1.16)."""

    shared_prefix_group_shuffle: bool = False
    shared_prefix_fallbacks: StockFallbacks

    def _shared_prefix_setup(self, group_shuffle: Optional[bool]) -> None:
        # The stock method this mixin overrides (bound: its signature has no `self`).
        _check_trl(super(SharedPrefixMixin, self)._get_per_token_logps_and_entropies)
        register()
        self.shared_prefix_fallbacks = StockFallbacks("shared_prefix: using the stock log-prob computation")
        self._shared_prefix_plans = _PlanReuse()
        args_flag = getattr(self.args, "shared_prefix_group_shuffle", False)
        self.shared_prefix_group_shuffle = bool(args_flag if group_shuffle is None else group_shuffle)

    def _shared_prefix_refusal(self, base, compute_aux_loss: bool, extra: dict) -> Optional[str]:
        """Why no micro-batch of this call can take a plan (the model and the trainer's set-up)."""
        router = compute_aux_loss or getattr(text_config(base), "output_router_logits", False)
        if router and load_balancing_loss(base) is None:
            return "the model returns an auxiliary (MoE) loss that shared_prefix cannot weight"
        if any(extra.get(k) is not None for k in _MULTIMODAL_KEYS):
            return "multimodal inputs"
        cfg = text_config(base)
        return unsupported_config(cfg) or self.shared_prefix_fallbacks.refused_reason(base) or lm_head_refusal(base)

    def _shared_prefix_head(self, hidden, weight, bias, targets, temperature, entropy, chunk_size):
        """TRL's own fused LM head (``ChunkedLogProbFunction``), so the numbers are TRL's: optionally in fp32
        outside autocast (``cast_lm_head_to_fp32``), else under the trainer's autocast."""
        from trl.kernels import ChunkedLogProbFunction

        cast_fp32 = bool(getattr(self.args, "cast_lm_head_to_fp32", False))
        if cast_fp32:
            hidden = hidden.float()
        context = torch.autocast(hidden.device.type, enabled=False) if cast_fp32 else self.accelerator.autocast()
        outputs = ("log_probs", "entropy") if entropy else ("log_probs",)
        with context:
            per_token = ChunkedLogProbFunction.apply(hidden, weight, bias, targets, temperature, 32768, None, 1.0,
                                                     outputs)
        return per_token[0], (per_token[1] if entropy else None)

    def _shared_prefix_logps(self, model, base, ids, mask, logits_to_keep, compute_entropy, compute_aux_loss,
                             plans: dict, start):
        """Log-probs, entropies (or None) and the auxiliary loss (or None) of one micro-batch through the packed
        forward; a string saying why not. ``plans``: this batch's plans by micro-batch ``start`` and the model's
        windows, reused and filled."""
        prompt_ids, completion_ids = ids[:, :-logits_to_keep], ids[:, -logits_to_keep:]
        prompt_mask, completion_mask = mask[:, :-logits_to_keep], mask[:, -logits_to_keep:]
        if not bool(prompt_mask.any(1).all()):
            # A row without prompt tokens (an empty prompt, no BOS) has no prefix to share.
            return "a row without prompt tokens", None
        key = (start, tuple(model_windows(base)))  # a reference model may differ from the policy in its windows
        try:
            # The padded rows' width is the sequence length the stock forward's RoPE sees.
            forward = PackedForward.prepare(base, prompt_ids, prompt_mask, completion_ids, completion_mask,
                                            stock_seq_len=ids.shape[1], plan=plans.get(key))
        except UnsupportedModelError as e:
            return str(e), None
        plans[key] = forward.plan
        try:
            # Through the trainer's (DDP-, DeepSpeed- or FSDP-wrapped) model, so that its hooks run.
            with self.accelerator.autocast():
                logps, entropies = forward.run(model, temperature=self.temperature, entropy=compute_entropy,
                                               head=self._shared_prefix_head, router_logits=compute_aux_loss)
                aux = forward.aux_loss() if compute_aux_loss else None
        except UnsupportedModelError as e:
            self.shared_prefix_fallbacks.forward_failed(base, e)
            return str(e), None
        return (logps, entropies, aux), (forward.plan.num_tokens, forward.plan.by_prompt_tokens)

    def _get_per_token_logps_and_entropies(
        self,
        model,
        input_ids,
        attention_mask,
        logits_to_keep,
        batch_size=None,
        compute_entropy=False,
        compute_aux_loss=False,
        **extra: Any,
    ):
        unwrapped = self.accelerator.unwrap_model(model)
        base = unwrapped.get_base_model() if hasattr(unwrapped, "get_base_model") else unwrapped
        why = self._shared_prefix_refusal(base, compute_aux_loss, extra)
        if why is not None:
            self.shared_prefix_fallbacks.say(why)
            self._shared_prefix_log(model, input_ids.numel(), input_ids.numel(), input_ids.numel())  # nothing saved
            return super()._get_per_token_logps_and_entropies(  # type: ignore[misc]
                model, input_ids, attention_mask, logits_to_keep, batch_size, compute_entropy, compute_aux_loss,
                **extra,
            )
        batch_size = batch_size or input_ids.size(0)
        plans = self._shared_prefix_plans.lookup(input_ids, attention_mask, logits_to_keep, batch_size)
        all_logps, all_entropies, all_aux = [], [], []
        forwarded = stock = by_prompt = 0
        for start in range(0, input_ids.size(0), batch_size):
            ids = input_ids[start : start + batch_size]
            mask = attention_mask[start : start + batch_size]
            stock += ids.numel()  # TRL forwards the padded rows
            result, tokens = self._shared_prefix_logps(model, base, ids, mask, logits_to_keep, compute_entropy,
                                                       compute_aux_loss, plans, start)
            if isinstance(result, str):  # this micro-batch (or the model) cannot take the plan: the stock method
                self.shared_prefix_fallbacks.say(result)
                logps, entropies, aux = super()._get_per_token_logps_and_entropies(  # type: ignore[misc]
                    model, ids, mask, logits_to_keep, ids.size(0), compute_entropy, compute_aux_loss)
                tokens = (ids.numel(), ids.numel())
            else:
                logps, entropies, aux = result
            if compute_aux_loss:
                all_aux.append(aux)
            forwarded += tokens[0]
            by_prompt += tokens[1]
            all_logps.append(logps)
            if compute_entropy:
                all_entropies.append(entropies)
        self._shared_prefix_log(model, forwarded, stock, by_prompt)
        logps = torch.cat(all_logps)
        entropies = torch.cat(all_entropies) if compute_entropy else None
        # As the stock method: the micro-batches' auxiliary losses averaged.
        aux_loss = torch.stack(all_aux).mean() if compute_aux_loss else None
        return logps, entropies, aux_loss

    def _shared_prefix_log(self, model, forwarded: int, stock: int, by_prompt: int) -> None:
        """The token metrics of one call: ``forwarded`` packed tokens against the ``stock`` padded rows TRL would
        forward (and the ``by_prompt`` tokens of whole-prompt plans)."""
        if stock:
            mode = "train" if model.training else "eval"
            for name, value in tokens_saved(forwarded, stock, by_prompt).items():
                self._metrics[mode][name].append(value)

    def _prepare_inputs(self, generation_batch):
        if not self.shared_prefix_group_shuffle:
            return super()._prepare_inputs(generation_batch)  # type: ignore[misc]
        import sys

        module = sys.modules[super()._prepare_inputs.__module__]  # type: ignore[misc]
        original = module.shuffle_sequence_dict
        module.shuffle_sequence_dict = _group_shuffle
        try:
            return super()._prepare_inputs(generation_batch)  # type: ignore[misc]
        finally:
            module.shuffle_sequence_dict = original


def _make_trainer_class(base: type, name: str) -> type:
    def __init__(self, *args, shared_prefix_group_shuffle: Optional[bool] = None, **kwargs):
        base.__init__(self, *args, **kwargs)
        self._shared_prefix_setup(shared_prefix_group_shuffle)

    doc = (
        f"``trl.{base.__name__}`` with shared-prefix log-probs (see ``shared_prefix.trl``). Extra argument: "
        "``shared_prefix_group_shuffle=True`` shuffles whole groups instead of rows (default: TRL's row shuffle)."
    )
    return type(name, (SharedPrefixMixin, base), {"__init__": __init__, "__doc__": doc, "__module__": __name__})


def _grpo():
    from trl import GRPOTrainer

    return _make_trainer_class(GRPOTrainer, "SharedPrefixGRPOTrainer")


def _rloo():
    from trl import RLOOTrainer

    return _make_trainer_class(RLOOTrainer, "SharedPrefixRLOOTrainer")


def patch_trainer(trainer_or_class, *, group_shuffle: Optional[bool] = None):
    """Give an existing trainer instance (or trainer class) the shared-prefix override, for code that constructs
    its own trainer. Returns the patched instance or the new subclass."""
    if isinstance(trainer_or_class, type):
        return _make_trainer_class(trainer_or_class, "SharedPrefix" + trainer_or_class.__name__)
    trainer = trainer_or_class
    cls = type(trainer)
    trainer.__class__ = type("SharedPrefix" + cls.__name__, (SharedPrefixMixin, cls), {"__module__": __name__})
    trainer._shared_prefix_setup(group_shuffle)
    return trainer


def __getattr__(name):
    # trl is imported only when a trainer is asked for.
    if name == "SharedPrefixGRPOTrainer":
        cls = _grpo()
    elif name == "SharedPrefixRLOOTrainer":
        cls = _rloo()
    else:
        raise AttributeError(f"module 'shared_prefix.trl' has no attribute {name!r}")
    globals()[name] = cls
    return cls
