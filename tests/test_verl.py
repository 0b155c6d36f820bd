"""verl 0.9: the plugin's engine path against verl's own stock path.

Two levels. Unit tests drive the engine's `FSDPEngineWithLMHead.forward_step` (and the prepare_model_inputs /
prepare_model_outputs it calls) on a real TensorDict micro-batch of a tiny local model, one CPU rank: plain, under
FSDP1 and FSDP2 wrapped as verl wraps them. The two-rank tests (`verl_dist_worker.py`) build verl's actor as its
trainer does, from verl's own Hydra config with a user's overrides (FSDP1 or FSDP2, LoRA, gradient checkpointing,
verl's default mixed precision), and run the trainer's own old-log-prob and actor-update sequence through verl's
worker, micro-batching, loss and optimizer. CPU ranks through `verl_cpu` (a CPU platform registered with verl).
"""

from __future__ import annotations


import numpy as np
import pytest
import torch

pytest.importorskip("verl")
import verl_setup  # noqa: E402  (before the engine module, which reads the device when imported)
import torch.distributed as dist  # noqa: E402
from torch.distributed.tensor import DTensor  # noqa: E402
from transformers import Qwen2Config, Qwen2ForCausalLM  # noqa: E402
from verl.protocol import DataProto  # noqa: E402
from verl.utils import tensordict_utils as tu  # noqa: E402
from verl.workers.utils.padding import left_right_2_no_padding  # noqa: E402

import shared_prefix as sp  # noqa: E402
import shared_prefix.verl as spv  # noqa: E402
from shared_prefix.hf import pipeline  # noqa: E402
from verl_setup import engine_on_cpu, gloo  # noqa: E402,F401  (fixtures)




@pytest.fixture
def engine():
    return make_engine()


def make_engine(tie_word_embeddings=False):
    return verl_setup.engine(tie_word_embeddings)


def micro_batch(remove_padding: bool, temperature=0.7, seed=1, system=False):
    """Three uid groups (shuffled), ragged left-padded prompts, variable response lengths. ``system``: the prompts
    open with one shared system prompt, and each group's responses with one shared trunk (a rollout branching)."""
    g = torch.Generator().manual_seed(seed)
    groups = {"a": torch.randint(1, 97, (6,), generator=g), "b": torch.randint(1, 97, (3,), generator=g),
              "c": torch.randint(1, 97, (9,), generator=g)}
    trunks = {u: torch.randint(1, 97, (2,), generator=g) for u in groups}
    if system:
        head = torch.randint(1, 97, (5,), generator=g)
        groups = {u: torch.cat([head, p[:4]]) for u, p in groups.items()}
    rows = [("a", 5), ("c", 2), ("a", 1), ("b", 6), ("c", 6), ("a", 3), ("b", 4)]
    B, P, R = len(rows), 9, 6
    prompts, responses = torch.zeros(B, P, dtype=torch.long), torch.zeros(B, R, dtype=torch.long)
    pm, rm = torch.zeros(B, P, dtype=torch.long), torch.zeros(B, R, dtype=torch.long)
    for i, (u, r) in enumerate(rows):
        p = groups[u]
        prompts[i, P - len(p):] = p
        pm[i, P - len(p):] = 1
        responses[i, :r] = torch.randint(1, 97, (r,), generator=g)
        if system:
            responses[i, : min(r, 2)] = trunks[u][: min(r, 2)]
        rm[i, :r] = 1
    attn = torch.cat([pm, rm], 1)
    dp = DataProto.from_single_dict(
        {"prompts": prompts, "responses": responses, "input_ids": torch.cat([prompts, responses], 1),
         "attention_mask": attn, "position_ids": (attn.cumsum(1) - 1).clamp(min=0), "response_mask": rm},
        meta_info={"temperature": temperature},
    )
    dp.non_tensor_batch["uid"] = np.array([u for u, _ in rows], dtype=object)
    td = left_right_2_no_padding(dp.to_tensordict())
    tu.assign_non_tensor(td, use_remove_padding=remove_padding, calculate_entropy=True, use_dynamic_bsz=False,
                         micro_batch_size_per_gpu=B)
    return td, rm.bool()


def response_positions(offsets, resp_lens):
    """Flat positions that predict response tokens: the only ones verl's losses read."""
    return torch.cat([torch.arange(int(e) - int(r) - 1, int(e) - 1) for e, r in zip(offsets[1:], resp_lens)])


def run(engine, td, enabled: bool, resp_lens):
    spv.enable(enabled)
    _, output_args = engine.prepare_model_inputs(td)
    assert (spv._KEY in output_args) == enabled  # ours really runs (no silent fallback to stock)
    engine.module.zero_grad(set_to_none=True)
    captured = {}

    def loss_fn(model_output, data, dp_group=None):
        captured.update(model_output)
        lp, ent = model_output["log_probs"].values(), model_output["entropy"].values()
        w = torch.zeros(lp.numel(), dtype=lp.dtype)
        pos = response_positions(model_output["log_probs"].offsets(), resp_lens)
        w[pos] = torch.sin(pos.to(lp.dtype))  # fixed weights at response positions: the same loss both ways
        return (lp * w).sum() + 0.1 * (ent * w).sum(), {}

    loss, out = engine.forward_step(td, loss_function=loss_fn, forward_only=False)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in engine.module.named_parameters()}
    run.metrics = out["metrics"]
    return out["model_output"], grads


@pytest.mark.parametrize("system", [False, True], ids=["prompts", "system_prompt"])
@pytest.mark.parametrize("remove_padding", [True, False])
def test_plugin_matches_stock_engine(engine, remove_padding, system):
    td, rmask = micro_batch(remove_padding, system=system)
    resp = rmask.sum(1)
    before = sp.set_prefix_tree(min_node_tokens=2)  # the batch's shared runs are short
    try:
        stock, g_stock = run(engine, td, enabled=False, resp_lens=resp)
        assert not any(k.startswith("shared_prefix/") for k in run.metrics)
        ours, g_ours = run(engine, td, enabled=True, resp_lens=resp)
        _, output_args = engine.prepare_model_inputs(td)
        plan = output_args[spv._KEY]["forward"].plan
        assert (plan.levels > 2) == system  # the tree shares beyond prompts
        saved = run.metrics["shared_prefix/tokens_saved_frac"]
        assert saved == pytest.approx(1 - plan.num_tokens / plan.stock_tokens) and saved > 0.2
        tree_saved = run.metrics["shared_prefix/tree_tokens_saved_frac"]
        assert (tree_saved > 0) == system and tree_saved == pytest.approx(1 - plan.num_tokens / plan.by_prompt_tokens)
    finally:
        sp.set_prefix_tree(**before)
    assert torch.equal(ours["log_probs"].offsets(), stock["log_probs"].offsets())
    pos = response_positions(stock["log_probs"].offsets(), resp)
    for key in ("log_probs", "entropy"):
        a, b = ours[key].values()[pos], stock[key].values()[pos]
        assert (a - b).abs().max().item() <= 1e-5, key
    for n in g_stock:
        rel = ((g_ours[n] - g_stock[n]).norm() / g_stock[n].norm().clamp_min(1e-12)).item()
        assert rel <= 1e-5, (n, rel)
    spv.enable(False)


def test_temperature_zero_as_stock_engine(engine):
    """rollout.temperature=0 (greedy decoding): the stock engine divides by the temperature clamped to 1e-8, and
    so does ours (an unclamped 0 gave inf - inf = NaN)."""
    td, rmask = micro_batch(True, temperature=0.0)
    resp = rmask.sum(1)
    stock, _ = run(engine, td, enabled=False, resp_lens=resp)
    ours, _ = run(engine, td, enabled=True, resp_lens=resp)
    pos = response_positions(stock["log_probs"].offsets(), resp)
    a, b = ours["log_probs"].values()[pos], stock["log_probs"].values()[pos]
    assert bool(a.isfinite().all()) and bool(b.isfinite().all())
    assert ((a - b).abs().max() / b.abs().max()).item() <= 1e-5
    spv.enable(False)


def test_sliding_window_model_matches_stock_engine(engine):
    """A Qwen2 with a 4-token sliding window on every layer (shorter than every sample): ours runs, exactly."""
    cfg = Qwen2Config(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=128, use_sliding_window=True, sliding_window=4,
                      max_window_layers=0)
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(0)
    engine.module = Qwen2ForCausalLM(cfg)
    td, rmask = micro_batch(True)
    resp = rmask.sum(1)
    stock, g_stock = run(engine, td, enabled=False, resp_lens=resp)
    ours, g_ours = run(engine, td, enabled=True, resp_lens=resp)
    pos = response_positions(stock["log_probs"].offsets(), resp)
    for key in ("log_probs", "entropy"):
        assert (ours[key].values()[pos] - stock[key].values()[pos]).abs().max().item() <= 1e-5, key
    for n in g_stock:
        assert ((g_ours[n] - g_stock[n]).norm() / g_stock[n].norm().clamp_min(1e-12)).item() <= 1e-5, n
    spv.enable(False)


def test_bf16_autocast_as_close_as_stock(engine):
    """The engine's bf16 autocast over fp32 weights (no FSDP mixed-precision policy casting them): the model hands
    attention fp32 q/k beside a bf16 v. Ours runs and is as close to the fp32 computation as the stock engine under
    the same autocast, in log-probs, entropies and gradients."""
    td, rmask = micro_batch(True)
    resp = rmask.sum(1)
    ref, g_ref = run(engine, td, enabled=False, resp_lens=resp)
    engine._autocast_dtype = torch.bfloat16
    stock, g_stock = run(engine, td, enabled=False, resp_lens=resp)
    ours, g_ours = run(engine, td, enabled=True, resp_lens=resp)
    spv.enable(False)
    pos = response_positions(ref["log_probs"].offsets(), resp)

    def err(out, grads):
        values = [(out[k].values()[pos].float() - ref[k].values()[pos].float()).abs().max().item()
                  for k in ("log_probs", "entropy")]
        return values + [max(((grads[n] - g_ref[n]).norm() / g_ref[n].norm().clamp_min(1e-12)).item() for n in g_ref)]

    mine, theirs = err(ours, g_ours), err(stock, g_stock)
    assert all(m <= 2 * t + 1e-4 for m, t in zip(mine, theirs)), (mine, theirs)
    assert theirs[0] > 1e-5, theirs  # bf16 autocast was in effect


@pytest.mark.parametrize("kind", ["stablelm", "window_found_by_the_layers"])
def test_models_the_plan_cannot_split_run_stock(engine, caplog, monkeypatch, kind):
    """A model the plan cannot split gets the stock engine's numbers. StableLM's layers drop keyword arguments
    before attention: found on the forward (the engine runs it between the two hooks), so the stock forward runs
    instead and the class is not tried again. A window shorter than the micro-batch, when only the attention layers
    see it (the config-level check is switched off here), is the same for that micro-batch only."""
    import transformers

    common = dict(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=128)
    torch.manual_seed(0)
    if kind == "stablelm":
        cfg = transformers.StableLmConfig(**common)
        cfg._attn_implementation = "sdpa"
        engine.module = transformers.StableLmForCausalLM(cfg)
    else:
        cfg = Qwen2Config(use_sliding_window=True, sliding_window=4, max_window_layers=0, **common)
        cfg._attn_implementation = "sdpa"
        engine.module = Qwen2ForCausalLM(cfg)
        # Plans without the window's key tables, and the config-level check off: the layers find the window.
        monkeypatch.setattr(pipeline, "model_windows", lambda model: [])
        monkeypatch.setattr(pipeline, "unsupported_for", lambda model, p, stock_seq_len=None: None)
    spv.fallbacks.refused.clear()
    spv.fallbacks.said.clear()  # reasons are logged once per process
    td, rmask = micro_batch(True)
    resp = rmask.sum(1)
    stock, g_stock = run(engine, td, enabled=False, resp_lens=resp)
    spv.enable(True)
    try:
        with caplog.at_level("WARNING", logger="shared_prefix"):
            ours, g_ours = run_through_hooks(engine, td, resp)
            again = engine.prepare_model_inputs(td)[1]
        assert run_through_hooks.metrics["shared_prefix/tokens_saved_frac"] == 0.0  # the fallback saved nothing
    finally:
        spv.enable(False)
    pos = response_positions(stock["log_probs"].offsets(), resp)
    for key in ("log_probs", "entropy"):
        assert (ours[key].values()[pos] - stock[key].values()[pos]).abs().max().item() <= 1e-6, key
    for n in g_stock:
        assert ((g_ours[n] - g_stock[n]).norm() / g_stock[n].norm().clamp_min(1e-12)).item() <= 1e-6, n
    reason = "0 attention call" if kind == "stablelm" else "sliding_window=4"
    assert reason in caplog.text
    # The next micro-batch: StableLM goes stock from the first hook; the windowed model tries the plan again.
    assert (spv._KEY in again) == (kind != "stablelm")
    spv.fallbacks.refused.clear()


def run_through_hooks(engine, td, resp_lens):
    """``run`` with the plugin on, without its check that ours ran (here the plugin falls back inside the hooks)."""
    engine.module.zero_grad(set_to_none=True)

    def loss_fn(model_output, data, dp_group=None):
        lp, ent = model_output["log_probs"].values(), model_output["entropy"].values()
        w = torch.zeros(lp.numel(), dtype=lp.dtype)
        pos = response_positions(model_output["log_probs"].offsets(), resp_lens)
        w[pos] = torch.sin(pos.to(lp.dtype))
        return (lp * w).sum() + 0.1 * (ent * w).sum(), {}

    loss, out = engine.forward_step(td, loss_function=loss_fn, forward_only=False)
    loss.backward()
    run_through_hooks.metrics = out["metrics"]
    return out["model_output"], {n: p.grad.clone() for n, p in engine.module.named_parameters()}


def test_fallbacks_are_stock(engine, caplog):
    td, _ = micro_batch(True)
    tu.assign_non_tensor(td, calculate_sum_pi_squared=True)
    spv.enable(True)
    mi, oa = engine.prepare_model_inputs(td)
    assert spv._KEY not in oa and "shared_prefix_plan" not in mi
    engine.module.config._attn_implementation = "eager"  # eager cannot take a plan
    td, _ = micro_batch(True)
    mi, oa = engine.prepare_model_inputs(td)
    assert spv._KEY not in oa
    spv.enable(False)


def test_ulysses_settings_ours_cannot_split_name_the_setting(engine):
    """Under Ulysses a head count the group size does not split, and a vision-language model, keep the stock path,
    the reason naming verl's setting; a size that splits the heads packs."""
    import verl.workers.engine.fsdp.transformer_impl as ti

    from shared_prefix.verl import engine as plugin_engine

    td, _ = micro_batch(True)
    spv.enable(True)
    try:
        engine.use_ulysses_sp, engine.ulysses_sequence_parallel_size = True, 4  # 4 query, 2 key/value heads
        assert plugin_engine._ineligible(engine, td, ti, tu) is None
        engine.ulysses_sequence_parallel_size = 3
        why = plugin_engine._ineligible(engine, td, ti, tu)
        assert "4 attention heads do not split over 3" in why and "ulysses_sequence_parallel_size" in why
        engine.ulysses_sequence_parallel_size = 2
        engine.module.config.vision_config = {}
        assert "vision-language" in plugin_engine._ineligible(engine, td, ti, tu)
    finally:
        spv.enable(False)


def test_plugin_matches_stock_engine_under_fsdp1(engine):
    """FSDP1 as verl builds it by default (flat parameters, ``use_orig_params=False``; one rank): the head runs
    inside the wrapped forward, so ours packs and equals the stock engine, values and every flat gradient."""
    from torch.distributed.fsdp import FullyShardedDataParallel

    engine.module = FullyShardedDataParallel(engine.module, device_id=torch.device("cpu"), use_orig_params=False)
    td, rmask = micro_batch(True)
    resp = rmask.sum(1)
    stock, g_stock = run(engine, td, enabled=False, resp_lens=resp)
    ours, g_ours = run(engine, td, enabled=True, resp_lens=resp)
    spv.enable(False)
    assert run.metrics["shared_prefix/tokens_saved_frac"] > 0
    pos = response_positions(stock["log_probs"].offsets(), resp)
    for key in ("log_probs", "entropy"):
        assert (ours[key].values()[pos] - stock[key].values()[pos]).abs().max().item() <= 1e-5, key
    assert g_stock and all(((g_ours[n] - g_stock[n]).norm() / g_stock[n].norm()).item() <= 1e-5 for n in g_stock)


def test_flag_in_actor_config_enables():
    """verl building its actor config with ``use_prefix_grouper=True`` switches the plugin on; without it, not."""
    from verl.workers.config import FSDPActorConfig

    fields = dict(strategy="fsdp", ppo_micro_batch_size_per_gpu=2, ppo_mini_batch_size=4, rollout_n=1)
    spv.enable(False)
    try:
        FSDPActorConfig(use_prefix_grouper=False, **fields)
        assert not spv.enabled()
        FSDPActorConfig(use_prefix_grouper=True, **fields)
        assert spv.enabled()
    finally:
        spv.enable(False)


def shard_like_verl(module):
    """FSDP2 exactly as verl's engine applies it: verl's own ``apply_fsdp2`` with the engine's default
    ``reshard_after_forward=True`` (decoder layers, embeddings and head when untied, then the root), on a CPU mesh
    over every rank."""
    from torch.distributed.device_mesh import init_device_mesh
    from verl.utils.fsdp_utils import apply_fsdp2

    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    apply_fsdp2(module, {"mesh": mesh, "reshard_after_forward": True}, {})


def fsdp2_comparison(tie_word_embeddings, seed=1):
    """Stock engine vs plugin under verl's FSDP2 wrapping: max |Δ| of log-probs/entropies at response positions,
    max gradient rel diff over parameters (full tensors), and the head weight's type when the head's forward ran
    (a plain tensor: FSDP2 unsharded it for its own forward)."""
    engine = make_engine(tie_word_embeddings)
    shard_like_verl(engine.module)
    head = engine.module.lm_head
    seen = {"before": type(head.weight)}
    hook = head.register_forward_pre_hook(lambda m, args: seen.__setitem__("used", type(m.weight)))
    try:
        td, rmask = micro_batch(True, seed=seed)
        resp = rmask.sum(1)
        stock, g_stock = run(engine, td, enabled=False, resp_lens=resp)
        ours, g_ours = run(engine, td, enabled=True, resp_lens=resp)
    finally:
        hook.remove()
        spv.enable(False)
    pos = response_positions(stock["log_probs"].offsets(), resp)
    diff = max((ours[k].values()[pos] - stock[k].values()[pos]).abs().max().item() for k in ("log_probs", "entropy"))
    rel = 0.0
    for n in g_stock:
        a, b = g_ours[n].full_tensor(), g_stock[n].full_tensor()  # gradients of FSDP2 parameters are DTensors
        rel = max(rel, ((a - b).norm() / b.norm().clamp_min(1e-12)).item())
    return diff, rel, seen


@pytest.mark.parametrize("tie_word_embeddings", [False, True])
def test_plugin_matches_stock_engine_under_fsdp2(tie_word_embeddings):
    """verl reshards after forward, so the head (in the root's unit when tied, in its own when untied) is sharded
    between forwards: it computes ours inside its unit's forward, where FSDP2 unsharded it, and FSDP reduce-scatters
    its gradient like any other. Values and every parameter's gradient equal the stock engine's."""
    diff, rel, seen = fsdp2_comparison(tie_word_embeddings)
    assert seen["before"] is DTensor and seen["used"] is not DTensor  # the case this guards was hit
    assert diff <= 1e-5 and rel <= 1e-5, (diff, rel)


@pytest.mark.parametrize("tie_word_embeddings", [False, True])
def test_plugin_at_verls_default_mixed_precision(tie_word_embeddings):
    """verl's default FSDP2 setup: a bf16 parameter / fp32 reduce policy (cast_forward_inputs, as the engine builds
    it) and bf16 autocast. Ours is as close to the unsharded fp32 engine as the stock engine is, in log-probs,
    entropies and every parameter's gradient."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy
    from verl.utils.fsdp_utils import apply_fsdp2

    td, rmask = micro_batch(True)
    resp = rmask.sum(1)
    ref, g_ref = run(make_engine(tie_word_embeddings), td, enabled=False, resp_lens=resp)
    engine = make_engine(tie_word_embeddings)
    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32, cast_forward_inputs=True)
    apply_fsdp2(engine.module, {"mesh": init_device_mesh("cpu", (dist.get_world_size(),)), "mp_policy": mp,
                                "reshard_after_forward": True}, {})
    engine._autocast_dtype = torch.bfloat16
    try:
        stock, g_stock = run(engine, td, enabled=False, resp_lens=resp)
        ours, g_ours = run(engine, td, enabled=True, resp_lens=resp)
    finally:
        spv.enable(False)
    pos = response_positions(ref["log_probs"].offsets(), resp)

    def err(out, grads):
        values = [(out[k].values()[pos].float() - ref[k].values()[pos]).abs().max().item()
                  for k in ("log_probs", "entropy")]
        full = {n: g.full_tensor() for n, g in grads.items()}
        assert all(g.dtype == torch.float32 for g in full.values())
        return values + [max(((full[n] - g_ref[n]).norm() / g_ref[n].norm().clamp_min(1e-12)).item() for n in g_ref)]

    mine, theirs = err(ours, g_ours), err(stock, g_stock)
    assert all(m <= 2 * t + 1e-4 for m, t in zip(mine, theirs)), (mine, theirs)
    assert theirs[0] > 1e-5, theirs  # bf16 was in effect


# verl's actor on 2 CPU ranks as its trainer builds it from a user's overrides. fp32 (every dtype through the mixed
# precision policy) for exactness; verl's default bf16 policy separately, against an fp32 run.
FP32 = [f"+actor_rollout_ref.actor.fsdp_config.mixed_precision.{k}=fp32"
        for k in ("param_dtype", "reduce_dtype", "buffer_dtype")] + ["actor_rollout_ref.actor.optim.lr=0.01"]
LORA = ["actor_rollout_ref.model.lora_rank=4", "actor_rollout_ref.model.lora_alpha=8"]
NO_CKPT = ["actor_rollout_ref.model.enable_gradient_checkpointing=False"]  # verl checkpoints by default


def dynamic_bsz(tokens: int) -> list:
    """verl's dynamic batch size for the update and the log-prob passes, ``tokens`` per GPU."""
    return ["actor_rollout_ref.actor.use_dynamic_bsz=True", "actor_rollout_ref.rollout.log_prob_use_dynamic_bsz=True",
            f"actor_rollout_ref.actor.ppo_max_token_len_per_gpu={tokens}",
            f"actor_rollout_ref.rollout.log_prob_max_token_len_per_gpu={tokens}"]


ACTOR_CASES = {
    "fsdp1": (["actor_rollout_ref.actor.strategy=fsdp"], False),
    "fsdp2": (["actor_rollout_ref.actor.strategy=fsdp2"], False),
    "fsdp1-lora": (["actor_rollout_ref.actor.strategy=fsdp"] + LORA, False),
    "fsdp2-lora-no-ckpt": (["actor_rollout_ref.actor.strategy=fsdp2"] + LORA + NO_CKPT, False),
    "fsdp1-tied-no-ckpt": (["actor_rollout_ref.actor.strategy=fsdp"] + NO_CKPT, True),
    # Groups of 4 (prompt ≤ 8 + 4 × ≤ 6 tokens) fit 40 tokens whole; at 20 a group splits into sub-groups.
    "fsdp1-dynamic-bsz": (["actor_rollout_ref.actor.strategy=fsdp"] + dynamic_bsz(40), False),
    "fsdp2-dynamic-bsz-groups-over-budget": (["actor_rollout_ref.actor.strategy=fsdp2"] + dynamic_bsz(20), False),
    # verl's fused-kernel forward (torch backend, as its example scripts set it) for stock; ours packs beside it.
    "fsdp1-fused-kernels": (["actor_rollout_ref.actor.strategy=fsdp", "actor_rollout_ref.model.use_fused_kernels=True"],
                            False),
}


@pytest.fixture(scope="module")
def verl_checkpoints(tmp_path_factory):
    """The tiny model and its tokenizer saved as verl loads them, with an untied and with a tied head."""
    from trl_setup import model, tokenizer

    root = tmp_path_factory.mktemp("verl-checkpoints")
    for tied in (False, True):
        m = model()
        if tied:
            m.config.tie_word_embeddings = True
            torch.manual_seed(0)
            m = Qwen2ForCausalLM(m.config)
        m.save_pretrained(root / ("tied" if tied else "untied"))
        tokenizer().save_pretrained(root / ("tied" if tied else "untied"))
    return root


def actor_run(tmp_path, checkpoints, mode, overrides, tied=False, tag="", ranks=2):
    from pathlib import Path

    from helpers import torchrun

    out = tmp_path / f"{mode}{tag}.pt"
    torchrun(Path(__file__).with_name("verl_dist_worker.py"), mode, checkpoints / ("tied" if tied else "untied"), out,
             *overrides, ranks=ranks)
    return torch.load(out, weights_only=False)


@pytest.mark.parametrize("case", list(ACTOR_CASES))
def test_two_rank_actor_as_verl_builds_it_equals_stock(tmp_path, verl_checkpoints, case):
    """Old log-probs and entropies on each rank and the parameters after the update (2 mini-batches: verl's
    micro-batching, ppo_loss with an entropy bonus, gradient clipping, AdamW) equal the stock actor's; ours packed
    every micro-batch (the metric, no fallback) and the weights are as the engine keeps them."""
    overrides, tied = ACTOR_CASES[case]
    stock = actor_run(tmp_path, verl_checkpoints, "stock", FP32 + overrides, tied)
    ours = actor_run(tmp_path, verl_checkpoints, "ours", FP32 + overrides, tied)
    strategy = "fsdp2" if "strategy=fsdp2" in " ".join(overrides) else "fsdp1"
    assert stock["sharding"] == ours["sharding"] == strategy and stock["lora"] == ours["lora"] == ("lora" in case)
    assert len(ours["ranks"]) == 2 and ours["ranks"][0]["logp"] != ours["ranks"][1]["logp"]  # each rank its data
    for s, o in zip(stock["ranks"], ours["ranks"]):
        for key in ("logp", "entropy"):
            assert max(abs(a - b) for a, b in zip(s[key], o[key])) <= 1e-5, key
    assert ((ours["params"] - stock["params"]).norm() / stock["params"].norm()).item() <= 1e-5
    saved = ours["metrics"]["shared_prefix/tokens_saved_frac"]
    assert saved and not ours["fallbacks"] and "shared_prefix/tokens_saved_frac" not in stock["metrics"]
    # Every micro-batch packs; one of sub-groups of a single row each (groups over the budget) has nothing to share.
    assert all(v > 0 for v in saved) if "over-budget" not in case else sum(saved) > 0


def test_two_rank_actor_at_verls_default_precision(tmp_path, verl_checkpoints):
    """verl's defaults (FSDP1, bf16 parameters, fp32 reduction, bf16 autocast, gradient checkpointing): ours packs
    and its old log-probs and entropies are as close to the fp32 actor's as the stock actor's are."""
    ref = actor_run(tmp_path, verl_checkpoints, "stock", FP32[:3], tag="-fp32")
    stock = actor_run(tmp_path, verl_checkpoints, "stock", [])
    ours = actor_run(tmp_path, verl_checkpoints, "ours", [])

    def err(run_, key):
        return max(abs(a - b) for r, q in zip(ref["ranks"], run_["ranks"]) for a, b in zip(r[key], q[key]))

    for key in ("logp", "entropy"):
        mine, theirs = err(ours, key), err(stock, key)
        assert theirs > 1e-4 and mine <= 2 * theirs + 1e-4, (key, mine, theirs)  # bf16 was in effect
    assert all(v > 0 for v in ours["metrics"]["shared_prefix/tokens_saved_frac"]) and not ours["fallbacks"]


def ulysses(size):
    return [f"actor_rollout_ref.actor.ulysses_sequence_parallel_size={size}"]


LONG_PROMPTS = "prompt_len=12,24"  # beside responses of 1-6 tokens: prompts cross the slices' boundaries
# (overrides, ranks); the tiny model has 4 query and 2 key/value heads.
ULYSSES_CASES = {
    "sp2-fsdp2-long-prompts": ([LONG_PROMPTS, "actor_rollout_ref.actor.strategy=fsdp2"] + ulysses(2), 2),
    # verl multiplies the token budget by the group size: 2 × 40 tokens per micro-batch.
    "sp2-fsdp1-dynamic-bsz": (["actor_rollout_ref.actor.strategy=fsdp"] + ulysses(2) + dynamic_bsz(40), 2),
    # 2 key/value heads over 4 ranks: each repeated for the 2 ranks its query heads go to, as verl's Ulysses does.
    "sp4-fsdp2-kv-heads-repeated": ([LONG_PROMPTS, "actor_rollout_ref.actor.strategy=fsdp2"] + ulysses(4), 4),
    # (dp, sp) = (2, 2): FSDP across all 4 ranks, each sequence-parallel group its own batch.
    "dp2-sp2-fsdp1": (["actor_rollout_ref.actor.strategy=fsdp"] + ulysses(2), 4),
}


@pytest.mark.parametrize("case", list(ULYSSES_CASES))
def test_ulysses_actor_as_verl_builds_it_equals_stock_ulysses(tmp_path, verl_checkpoints, case):
    """Ulysses sequence parallelism, stock (verl's own all-to-all around flash-attention: on CPU ranks an exact
    varlen SDPA, ``verl_cpu``) against ours (each rank's slice of the packed stream, attention exchanged with
    verl's helpers, log-probs gathered as verl gathers them), with gradient checkpointing as verl's default: old
    log-probs and entropies, the gradient norm and the parameters after the update equal, and every micro-batch
    packed. The slices held what the case is for: a prompt across a slice boundary, verl-style tail padding,
    one-token responses, a rank without predictor rows."""
    overrides, ranks = ULYSSES_CASES[case]
    size = int(next(o for o in overrides if "ulysses" in o).split("=")[1])
    stock = actor_run(tmp_path, verl_checkpoints, "stock", FP32 + overrides, ranks=ranks)
    ours = actor_run(tmp_path, verl_checkpoints, "ours", FP32 + overrides, ranks=ranks)
    assert stock["sequence_parallel"] == ours["sequence_parallel"] == size and len(ours["ranks"]) == ranks
    for s, o in zip(stock["ranks"], ours["ranks"]):
        for key in ("logp", "entropy"):
            assert max(abs(a - b) for a, b in zip(s[key], o[key])) <= 1e-5, key
    # A group's ranks hold one batch; the groups theirs.
    groups = [ours["ranks"][g: g + size] for g in range(0, ranks, size)]
    assert all(r["logp"] == group[0]["logp"] for group in groups for r in group)
    assert len(groups) == 1 or groups[0][0]["logp"] != groups[1][0]["logp"]
    norms = list(zip(stock["metrics"]["grad_norm"], ours["metrics"]["grad_norm"], strict=True))  # per optimizer step
    assert norms and all(abs(g_ours - g_stock) <= 1e-4 * g_stock for g_stock, g_ours in norms)
    assert ((ours["params"] - stock["params"]).norm() / stock["params"].norm()).item() <= 1e-5
    saved = ours["metrics"]["shared_prefix/tokens_saved_frac"]
    assert saved and all(v > 0 for v in saved) and not ours["fallbacks"]
    slices = [f for r in ours["ranks"] for f in r["slices"]]
    assert slices and not any(r["slices"] for r in stock["ranks"])
    assert any(f["pad"] > 0 for f in slices) and any(f["shortest_response"] == 1 for f in slices)
    if LONG_PROMPTS in overrides:
        assert all(f["prompt_crosses"] for f in slices)
    if size == 4:
        assert any(f["rows"] == 0 for f in slices)  # the first slice holds prompt tokens only


@pytest.mark.cuda
@pytest.mark.parametrize("offload", ["fsdp1-params-optimizer", "fsdp2-policy"])
def test_actor_with_offload_equals_stock_on_gpu(tmp_path, verl_checkpoints, offload):
    """Parameter and optimizer offload (FSDP1's ``param_offload``/``optimizer_offload``, FSDP2's
    ``offload_policy``): the engine moves the weights between the GPU and pinned host memory around each stage,
    which needs a GPU. One rank, NCCL: ours packs and equals the stock actor."""
    overrides = (["actor_rollout_ref.actor.strategy=fsdp", "actor_rollout_ref.actor.fsdp_config.param_offload=True",
                  "actor_rollout_ref.actor.fsdp_config.optimizer_offload=True"] if offload.startswith("fsdp1")
                 else ["actor_rollout_ref.actor.strategy=fsdp2", "actor_rollout_ref.actor.fsdp_config.offload_policy=True"])
    from pathlib import Path

    from helpers import torchrun

    runs = {}
    for mode in ("stock", "ours"):
        out = tmp_path / f"{mode}.pt"
        torchrun(Path(__file__).with_name("verl_dist_worker.py"), mode, verl_checkpoints / "untied", out,
                 *FP32, *overrides, ranks=1)
        runs[mode] = torch.load(out, weights_only=False)
    stock, ours = runs["stock"], runs["ours"]
    for key in ("logp", "entropy"):
        assert max(abs(a - b) for a, b in zip(stock["ranks"][0][key], ours["ranks"][0][key])) <= 1e-5, key
    assert ((ours["params"] - stock["params"]).norm() / stock["params"].norm()).item() <= 1e-5
    assert all(v > 0 for v in ours["metrics"]["shared_prefix/tokens_saved_frac"]) and not ours["fallbacks"]


def test_verls_model_build_with_trl_installed():
    """verl's ``apply_monkey_patch`` imports TRL's ``AutoModelForCausalLMWithValueHead`` whenever TRL is importable;
    TRL 1.16 has none, so verl's own model build raised ImportError with both installed. With the plugin loaded,
    verl's check asks for the class, and the patch runs on a model as the engine builds it."""
    pytest.importorskip("trl")
    import trl
    from verl.models.transformers import monkey_patch

    assert not hasattr(trl, "AutoModelForCausalLMWithValueHead")  # the TRL this guards
    assert getattr(monkey_patch.is_trl_available, "_shared_prefix", False)
    assert not monkey_patch.is_trl_available()
    model = make_engine().module
    monkey_patch.apply_monkey_patch(model=model, use_remove_padding=True, ulysses_sp_size=1)
