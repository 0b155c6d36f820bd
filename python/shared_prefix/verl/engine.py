"""The plugin's hooks in verl's FSDP engine: ``FSDPEngineWithLMHead.prepare_model_inputs`` and
``prepare_model_outputs`` (and ``forward_step``, for the metrics).

For an eligible micro-batch the engine's own ``forward_step`` (autocast, loss, metrics) runs the model once on the
packed shared-prefix stream, its LM head computing the log-probs inside the model's forward (so FSDP1 and FSDP2
gather and reduce it as for the stock logits), and gets back ``log_probs``/``entropy`` in exactly its own layout
(nested over prompt+response, position t = log p(x[t+1] | x[:t+1]), zeros at prompt positions, which verl's losses
never read). Groups come from the ``uid`` key (falling back to identical prompts when a uid group's prompts
differ, e.g. verl's synthetic padding samples). Both ``use_remove_padding`` settings take the same path, since the
engine's ``input_ids`` are nested either way. Text-only batches pack whatever empty multimodal containers verl's
agent loop attaches. With ``use_fused_kernels`` the packed forward runs the model's decoder and LM head as
transformers does instead of verl's fused forward, the head computing the log-probs as lean as the fused kernel.
Under Ulysses sequence parallelism each rank of the group runs its slice of the packed stream, the attention
exchanged over the group with verl's own helpers and the log-probs gathered as verl gathers them
(``hf.sequence_parallel``). Everything else (the critic, per-sample temperatures, real multimodal inputs,
vision-language models under Ulysses, distillation, ``sum_pi_squared``, eager attention) falls back to stock, the
reason logged once.
"""

from __future__ import annotations

from typing import Optional

import torch

from .._refusals import UnsupportedModelError
from ..hf.pipeline import PackedForward, tokens_saved
from ..hf.registry import takes_plan
from ..hf.sequence_parallel import SequenceParallel, head_refusal
from ..hf.support import as_text_config, unsupported_config
from .settings import enabled, fallbacks

_KEY = "_shared_prefix"
# The plan of the micro-batch the engine's forward_step just packed, for its metrics.
_PACKED = "_shared_prefix_packed"
# Micro-batch flags that keep the stock path, and the verl setting behind each.
_FLAG_SETTINGS = {"calculate_sum_pi_squared": "actor_rollout_ref.actor.calculate_sum_pi_squared",
                  "distillation_use_topk": "distillation.distillation_loss.loss_settings.use_topk",
                  "distillation_only": "distillation.distillation_loss.loss_settings.use_topk"}


def _ineligible(engine, mb, ti, tu) -> Optional[str]:
    if not enabled():
        return "disabled"
    if isinstance(engine, ti.FSDPEngineWithValueHead):
        return "value model"
    flag = lambda key, default=False: tu.get_non_tensor_data(data=mb, key=key, default=default)  # noqa: E731
    for key, setting in _FLAG_SETTINGS.items():
        if flag(key):
            return f"{key} is set (set {setting}=False to share prompts)"
    if "multi_modal_inputs" in mb.keys() and _multimodal(mb["multi_modal_inputs"]):
        return "multimodal inputs"
    if isinstance(mb["temperature"], torch.Tensor) and mb["temperature"].numel() > 1:
        return "per-sample temperatures"
    ids, pos = mb["input_ids"], mb["position_ids"]
    if not (ids.is_nested and pos.is_nested and pos.values().dim() == 1):
        return "position ids that are not one id per token (e.g. mrope)"
    module = engine.module
    why = fallbacks.refused_reason(module)
    if why is not None:
        return why
    cfg = getattr(module, "config", None)
    if cfg is None or not takes_plan(cfg._attn_implementation):
        return (f"attention implementation {getattr(cfg, '_attn_implementation', None)!r} cannot take a plan (set "
                "actor_rollout_ref.model.override_config.attn_implementation to flash_attention_2 or sdpa)")
    if getattr(engine, "use_ulysses_sp", False):
        if hasattr(cfg, "vision_config"):
            return ("a vision-language model under Ulysses sequence parallelism (set "
                    "actor_rollout_ref.actor.ulysses_sequence_parallel_size=1 to share prompts)")
        why = head_refusal(as_text_config(cfg), engine.ulysses_sequence_parallel_size)
        if why is not None:
            return f"{why} (set actor_rollout_ref.actor.ulysses_sequence_parallel_size to a size they split over)"
    return unsupported_config(cfg)


def _sequence_parallel(engine) -> Optional[SequenceParallel]:
    """The engine's Ulysses group, with verl's own exchanges and gather (the gradient scaled by the group size, as
    verl's gather of the stock log-probs scales it for FSDP's average over every rank)."""
    if not getattr(engine, "use_ulysses_sp", False):
        return None
    import torch.distributed as dist
    from verl.utils import ulysses

    group = engine.ulysses_parallel_group
    return SequenceParallel(
        size=int(engine.ulysses_sequence_parallel_size), rank=dist.get_rank(group),
        to_heads=lambda x, seq, head: ulysses.gather_seq_scatter_heads(x, seq_dim=seq, head_dim=head, group=group),
        to_sequence=lambda x, seq, head: ulysses.gather_heads_scatter_seq(x, head_dim=head, seq_dim=seq, group=group),
        gather=lambda x: ulysses.gather_outputs_and_unpad(x, gather_dim=0, grad_scaler=True, group=group))


def _multimodal(entries) -> bool:
    """Whether a micro-batch's ``multi_modal_inputs`` hold anything: verl's agent loop stores an empty dict per
    text-only sample (a ``NonTensorStack`` of them, or a list)."""
    for entry in entries:
        value = getattr(entry, "data", entry)  # NonTensorData wraps each sample's dict
        if value is not None and (not isinstance(value, dict) or len(value) > 0):
            return True
    return False


def response_lengths(mb) -> torch.Tensor:
    """Each row's response tokens in a verl micro-batch (nested ``responses``, or the attention mask's tail)."""
    responses = mb["responses"]
    if responses.is_nested:
        return responses.offsets().diff()
    return mb["attention_mask"][:, -responses.shape[1] :].sum(1)


def _unpack(mb):
    """Nested ``input_ids`` → left-padded prompts and right-padded completions (vectorized, no token loops)."""
    ids = mb["input_ids"]
    offsets, flat = ids.offsets(), ids.values()
    total = offsets.diff()
    resp = response_lengths(mb).to(total.device)
    prompt = total - resp
    lens = torch.stack([prompt.max(), resp.max()]).tolist()  # one host read per micro-batch, outside the layers
    max_p, max_r = int(lens[0]), max(1, int(lens[1]))
    cols = torch.arange(max_p, device=flat.device)
    p_valid = cols[None] >= (max_p - prompt)[:, None]
    p_src = (offsets[:-1, None] + cols[None] - (max_p - prompt)[:, None]).clamp(0, flat.numel() - 1)
    rcols = torch.arange(max_r, device=flat.device)
    r_valid = rcols[None] < resp[:, None]
    r_src = (offsets[:-1, None] + prompt[:, None] + rcols[None]).clamp(0, flat.numel() - 1)
    return (flat[p_src] * p_valid, p_valid, flat[r_src] * r_valid, r_valid, offsets, prompt)


def _prepare_model_inputs(self, micro_batch, _orig, ti, tu):
    why = _ineligible(self, micro_batch, ti, tu)
    if why is not None:
        if why != "disabled":
            fallbacks.say(why)
        return _orig(self, micro_batch)
    prompt_ids, prompt_mask, completion_ids, completion_mask, offsets, prompt_len = _unpack(micro_batch)
    if bool((prompt_len <= 0).any()):
        fallbacks.say("a sample without prompt tokens")
        return _orig(self, micro_batch)
    uid = list(micro_batch["uid"]) if "uid" in micro_batch.keys() else None
    batch = (prompt_ids, prompt_mask, completion_ids, completion_mask)
    # verl's position ids count each row's valid tokens: its RoPE sees the longest row, as the packed stream does.
    # The engine runs the forward between these two hooks, so a layer that cannot take the plan records why and
    # the forward goes on; prepare_model_outputs then discards it and runs the stock forward.
    packed = dict(stock_seq_len="longest", defer_refusals=True, sequence_parallel=_sequence_parallel(self))
    try:
        try:
            forward = PackedForward.prepare(self.module, *batch, group_ids=uid, **packed)
        except ValueError:  # a uid group whose prompts differ (verl's padding samples): group by identical prompts
            forward = PackedForward.prepare(self.module, *batch, **packed)
    except UnsupportedModelError as e:
        fallbacks.say(str(e))
        return _orig(self, micro_batch)
    temperature = micro_batch["temperature"]
    temperature = float(temperature.reshape(-1)[0]) if isinstance(temperature, torch.Tensor) else float(temperature)
    temperature = max(temperature, 1e-8)  # as the stock engine clamps it (rollout.temperature=0 is greedy decoding)
    entropy = bool(tu.get_non_tensor_data(data=micro_batch, key="calculate_entropy", default=False))
    state = {"forward": forward, "offsets": offsets, "prompt_len": prompt_len, "mask": completion_mask}
    if tu.get_non_tensor_data(data=micro_batch, key="use_fused_kernels", default=False):
        _plain_forward_once(_causal_lm(self.module))
    # The engine's forward_step adds use_cache=False.
    return forward.inputs(temperature, entropy=entropy), {_KEY: state}


def _causal_lm(module: torch.nn.Module) -> torch.nn.Module:
    """The transformers causal LM inside the engine's module (under FSDP1's wrapper, under a PEFT model)."""
    module = getattr(module, "_fsdp_wrapped_module", module)
    return module.get_base_model() if hasattr(module, "get_base_model") else module


def _plain_forward_once(lm: torch.nn.Module) -> None:
    """For the engine's next call of ``lm``: a causal LM forward in place of verl's fused-kernel one.

    ``use_fused_kernels`` replaces the model class's forward with one that drops the keyword arguments attention
    needs and reads ``lm_head.weight`` directly for every position's next token, where a packed stream has several
    targets at a shared node's last token. The packed forward instead gets the decoder, then the LM head module on
    the rows ``logits_to_keep`` selects, as transformers' own forward computes them: the head computes ours there,
    memory-lean as the fused kernel is. An instance attribute, removed on that call; a call without a plan (or the
    class forward after it) is verl's."""
    from transformers.modeling_outputs import CausalLMOutputWithPast

    from ..hf.registry import PLAN_KWARG

    def forward(*args, **kwargs):
        lm.__dict__.pop("forward", None)
        if PLAN_KWARG not in kwargs:
            return type(lm).forward(lm, *args, **kwargs)
        logits_to_keep = kwargs.pop("logits_to_keep")
        kwargs.pop("use_cache", None)
        hidden = lm.get_decoder()(*args, use_cache=False, **kwargs).last_hidden_state
        return CausalLMOutputWithPast(logits=lm.get_output_embeddings()(hidden[:, logits_to_keep, :]))

    lm.forward = forward


def _prepare_model_outputs(self, output, output_args, micro_batch, logits_processor_func, _orig, _orig_inputs, tu):
    state = output_args.get(_KEY) if isinstance(output_args, dict) else None
    if state is None:
        return _orig(self, output, output_args, micro_batch, logits_processor_func)
    forward = state["forward"]
    _causal_lm(self.module).__dict__.pop("forward", None)  # the fused-kernel case's, had the call not happened
    try:
        logp, ent = forward.outputs(output)
    except UnsupportedModelError as e:
        fallbacks.forward_failed(self.module, e)
        # The stock forward, inside the engine's autocast (this hook runs within forward_step's).
        inputs, args = _orig_inputs(self, micro_batch)
        stock = self.module(**inputs, use_cache=False)
        return _orig(self, stock, args, micro_batch, logits_processor_func)
    self.__dict__[_PACKED] = forward.plan
    # Back to the engine's layout: nested over prompt+response, position t predicts token t+1.
    offsets, mask = state["offsets"], state["mask"]
    cols = torch.arange(mask.shape[1], device=offsets.device)
    where = (offsets[:-1, None] + state["prompt_len"][:, None] - 1 + cols[None])[mask]

    def nested(rows):
        # The caller's [B, Lc] rows → flat positions; out-of-place, so autograd flows.
        full = rows.new_zeros(int(offsets[-1])).index_put((where,), rows[mask])
        return torch.nested.nested_tensor_from_jagged(full, offsets)

    out = {"log_probs": nested(logp)}
    if ent is not None:
        out["entropy"] = nested(ent)
    return out


def install(ti, tu) -> None:
    """Patch ``ti.FSDPEngineWithLMHead`` (verl's ``transformer_impl``; ``tu``: its ``tensordict_utils``).
    Idempotent."""
    cls = ti.FSDPEngineWithLMHead
    if getattr(cls, "_shared_prefix_installed", False):
        return
    orig_inputs, orig_outputs, orig_step = cls.prepare_model_inputs, cls.prepare_model_outputs, cls.forward_step

    def prepare_model_inputs(self, micro_batch):
        return _prepare_model_inputs(self, micro_batch, orig_inputs, ti, tu)

    def prepare_model_outputs(self, output, output_args, micro_batch, logits_processor_func=None):
        return _prepare_model_outputs(self, output, output_args, micro_batch, logits_processor_func, orig_outputs,
                                      orig_inputs, tu)

    def forward_step(self, micro_batch, loss_function, forward_only):
        self.__dict__.pop(_PACKED, None)
        loss, output = orig_step(self, micro_batch, loss_function, forward_only)
        plan = self.__dict__.pop(_PACKED, None)
        if enabled() and isinstance(output, dict) and isinstance(output.get("metrics"), dict):
            # Against the stock engine's unpadded tokens (0 for a micro-batch that took the stock path); verl
            # averages them over the update's micro-batches.
            counts = (plan.num_tokens, plan.stock_tokens, plan.by_prompt_tokens) if plan is not None else (1, 1, 1)
            output["metrics"].update(tokens_saved(*counts))
        return loss, output

    cls.prepare_model_inputs = prepare_model_inputs
    cls.prepare_model_outputs = prepare_model_outputs
    cls.forward_step = forward_step
    cls._shared_prefix_installed = True
