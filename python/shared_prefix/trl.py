"""TRL integration: GRPO/RLOO trainers that forward each prompt once per group, with identical training.

    from shared_prefix.trl import SharedPrefixGRPOTrainer as GRPOTrainer   # the one-line swap

Supported: trl >= 1.16, < 1.17 (the override matches ``_get_per_token_logps_and_entropies`` of trl 1.16.0).

The override computes the policy, old and reference log-probs (and entropies) with one plan per micro-batch:
groups are rows with identical prompts (TRL shuffles rows, so groups are not consecutive); prompts are left-padded
and completions right-padded as TRL builds them; the first completion token is predicted by the group's last prompt
token; the LM head, temperature and entropy go through TRL's own chunked log-prob kernel, so the numbers are TRL's.
Multimodal inputs, models that return an auxiliary (MoE) loss, and anything else we do not support fall back to the
stock method, with the reason logged once.
"""

from __future__ import annotations

import logging
from typing import Any, Optional

import torch

from . import hf
from ._plan import plan as make_plan

logger = logging.getLogger("shared_prefix")
SUPPORTED_TRL = (">=1.16", "<1.17")
METRIC = "shared_prefix/tokens_saved_frac"

_MULTIMODAL_KEYS = (
    "pixel_values",
    "image_grid_thw",
    "num_images",
    "pixel_attention_mask",
    "spatial_shapes",
    "num_tiles",
    "image_sizes",
    "token_type_ids",
    "mm_token_type_ids",
    "image_position_ids",
)


_EXPECTED_PARAMS = ("model", "input_ids", "attention_mask", "logits_to_keep", "batch_size", "compute_entropy",
                    "compute_aux_loss")


def _check_trl(stock_method) -> None:
    """The supported trl versions, and the signature of the method we override (checked, not assumed)."""
    import inspect

    import trl
    from packaging.version import Version

    v = Version(trl.__version__)
    if not (Version("1.16") <= v < Version("1.17")):
        raise ImportError(f"shared_prefix.trl supports trl {','.join(SUPPORTED_TRL)}, found {trl.__version__}")
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


class SharedPrefixMixin:
    """The override, shared by the GRPO and RLOO trainers (both define the same method in trl 1.16)."""

    shared_prefix_group_shuffle: bool = False
    _shared_prefix_fallbacks: set

    def _shared_prefix_setup(self, group_shuffle: Optional[bool]) -> None:
        # The stock method this mixin overrides (bound: its signature has no `self`).
        _check_trl(super(SharedPrefixMixin, self)._get_per_token_logps_and_entropies)
        hf.register()
        self._shared_prefix_fallbacks = set()
        # Model classes whose forward showed that they cannot take the plan (checked on every forward).
        self._shared_prefix_refused: dict = {}
        args_flag = getattr(self.args, "shared_prefix_group_shuffle", False)
        self.shared_prefix_group_shuffle = bool(args_flag if group_shuffle is None else group_shuffle)

    def _shared_prefix_fallback(self, why: str) -> None:
        if why not in self._shared_prefix_fallbacks:
            self._shared_prefix_fallbacks.add(why)
            logger.warning("shared_prefix: using the stock log-prob computation: %s", why)

    def _shared_prefix_unsupported(self, model, compute_aux_loss: bool, extra: dict) -> Optional[str]:
        if compute_aux_loss:
            return "the model returns an auxiliary (MoE) loss"
        if any(extra.get(k) is not None for k in _MULTIMODAL_KEYS):
            return "multimodal inputs"
        base = self.accelerator.unwrap_model(model)
        base = base.get_base_model() if hasattr(base, "get_base_model") else base
        cfg = hf._text_config(base)
        why = hf.unsupported_config(cfg) or self._shared_prefix_refused.get(type(base))
        if why is not None:
            return why
        if getattr(cfg, "output_router_logits", False):
            return "the model returns router logits"
        if not isinstance(base.get_output_embeddings(), torch.nn.Linear):
            return "the LM head is not a torch.nn.Linear"
        from torch.distributed.fsdp import FullyShardedDataParallel

        if any(isinstance(m, FullyShardedDataParallel) for m in model.modules()):
            return "FSDP1 (flat parameters): the LM head is not reachable outside its forward"
        from transformers.integrations.deepspeed import is_deepspeed_zero3_enabled

        if is_deepspeed_zero3_enabled():
            # ZeRO-3 partitions the head's weight outside its module's forward, and reduces its gradient only through
            # hooks armed by a forward around the loss (TRL's _ForwardRedirection), which this path does not run.
            return "DeepSpeed ZeRO-3 (the LM head is partitioned outside its forward)"
        return None

    def _shared_prefix_forward(self, model, base, p, stock_width):
        """The model's output on the packed stream, or why it cannot be used (then nothing of it is kept).
        ``stock_width``: the padded rows' width, the sequence length the stock forward's RoPE sees."""
        why = hf.unsupported_for(base, p, stock_seq_len=stock_width)
        if why is not None:
            return why
        calls = p.attention_calls
        try:
            # Through the (possibly DDP-wrapped) model, so its hooks run; the last hidden state is all we need.
            with hf._attn_implementation(base, hf.NAME), self.accelerator.autocast():
                out = model(**hf.packed_model_inputs(p), use_cache=False)
        except hf.UnsupportedModelError as e:  # raised by the first attention layer that cannot take the plan
            return str(e)
        try:
            hf.check_planned_forward(base, p, calls)
        except hf.UnsupportedModelError as e:  # a property of the model class: not tried again
            self._shared_prefix_refused[type(base)] = str(e)
            return str(e)
        return out

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
        why = self._shared_prefix_unsupported(model, compute_aux_loss, extra)
        if why is not None:
            self._shared_prefix_fallback(why)
            return super()._get_per_token_logps_and_entropies(  # type: ignore[misc]
                model, input_ids, attention_mask, logits_to_keep, batch_size, compute_entropy, compute_aux_loss,
                **extra,
            )
        from trl.kernels import ChunkedLogProbFunction

        batch_size = batch_size or input_ids.size(0)
        root = self.accelerator.unwrap_model(model)
        base = root.get_base_model() if hasattr(root, "get_base_model") else root
        cast_fp32 = bool(getattr(self.args, "cast_lm_head_to_fp32", False))
        outputs = ("log_probs", "entropy") if compute_entropy else ("log_probs",)
        all_logps, all_entropies = [], []
        forwarded = stock = 0
        for start in range(0, input_ids.size(0), batch_size):
            ids = input_ids[start : start + batch_size]
            mask = attention_mask[start : start + batch_size]
            prompt_ids, completion_ids = ids[:, :-logits_to_keep], ids[:, -logits_to_keep:]
            prompt_mask, completion_mask = mask[:, :-logits_to_keep], mask[:, -logits_to_keep:]
            if not bool(prompt_mask.any(1).all()):
                # A row without prompt tokens (an empty prompt, no BOS) has no prefix to share: the stock method.
                p, out = None, "a row without prompt tokens"
            else:
                p = make_plan(prompt_ids, prompt_mask, completion_ids, completion_mask,
                              windows=hf.model_windows(base))
                out = self._shared_prefix_forward(model, base, p, ids.shape[1])
            stock += ids.numel()  # TRL forwards the padded rows
            if isinstance(out, str):  # this micro-batch (or the model) cannot take the plan: the stock method
                self._shared_prefix_fallback(out)
                logps, entropies, _ = super()._get_per_token_logps_and_entropies(  # type: ignore[misc]
                    model, ids, mask, logits_to_keep, ids.size(0), compute_entropy)
                all_logps.append(logps)
                if compute_entropy:
                    all_entropies.append(entropies)
                forwarded += ids.numel()
                continue
            forwarded += p.num_tokens
            hidden = p.predictor_rows(out.hidden_states[-1])
            # As TRL's fused head: optionally in fp32 outside autocast, else under the trainer's autocast.
            if cast_fp32:
                hidden = hidden.float()
            head_ctx = torch.autocast(hidden.device.type, enabled=False) if cast_fp32 else self.accelerator.autocast()
            with hf.unsharded_lm_head(root, base.get_output_embeddings()) as (weight, bias), head_ctx:
                per_token = ChunkedLogProbFunction.apply(
                    hidden, weight, bias, p.completion_targets(), self.temperature, 32768, None, 1.0,
                    outputs,
                )
            all_logps.append(p.unpack_completions(per_token[0]))
            if compute_entropy:
                all_entropies.append(p.unpack_completions(per_token[1]))
        mode = "train" if model.training else "eval"
        if stock:
            self._metrics[mode][METRIC].append(1.0 - forwarded / stock)
        logps = torch.cat(all_logps)
        entropies = torch.cat(all_entropies) if compute_entropy else None
        return logps, entropies, None

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
