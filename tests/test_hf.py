"""completion_logprobs against each row run alone through the stock model (fp64), for five model families."""

from __future__ import annotations

import logging

import pytest
import torch
import transformers

import shared_prefix as sp
from helpers import FAMILIES, VOCAB, assert_matches_stock, make_batch, param_grads, stock_logprobs, tiny_model

def check_family(family, grad_ckpt, temperature=0.7, attn="sdpa", **model_kw):
    """``grad_ckpt``: False, True (non-reentrant checkpointing of every layer), or a function that turns
    checkpointing on for the model it is given."""
    model = tiny_model(family, attn=attn, **model_kw)
    if grad_ckpt:
        (sp.hf.enable_checkpointing if grad_ckpt is True else grad_ckpt)(model)
        model.train()
    rows, pid, pmask, cid, cmask = make_batch()
    w = torch.randn(cid.shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64)

    ref_lp, ref_ent = stock_logprobs(model, rows, cid.shape[1], temperature)
    ref_grads = param_grads(model, (ref_lp * w).sum() + 0.1 * (ref_ent * w).sum())

    lp, ent = sp.completion_logprobs(model, pid, pmask, cid, cmask, temperature=temperature, return_entropy=True)
    assert lp.dtype == torch.float64 and lp.shape == cid.shape
    assert model.config._attn_implementation == attn, "the model's implementation is restored"
    assert (lp - ref_lp).abs().max().item() <= 1e-9
    assert (ent - ref_ent).abs().max().item() <= 1e-9
    assert torch.all(lp[~cmask] == 0) and torch.all(ent[~cmask] == 0)
    grads = param_grads(model, (lp * w).sum() + 0.1 * (ent * w).sum())
    assert grads.keys() == ref_grads.keys()
    worst = max(((grads[n] - ref_grads[n]).norm() / ref_grads[n].norm()).item() for n in grads)
    assert worst <= 1e-6, worst


@pytest.mark.parametrize("family", sorted(FAMILIES))
@pytest.mark.parametrize("grad_ckpt", [False, True], ids=["no-ckpt", "ckpt"])
def test_family_matches_stock(family, grad_ckpt):
    check_family(family, grad_ckpt)


def test_reentrant_checkpointing():
    """Reentrant checkpointing recomputes through autograd.Function with the plan among the saved kwargs."""
    check_family("llama", lambda model: sp.hf.enable_checkpointing(model, use_reentrant=True))


@pytest.mark.skipif(not hasattr(transformers.PreTrainedModel, "activation_checkpointing_enable"),
                    reason="this transformers has no activation_checkpointing_enable (its options came after 5.10)")
@pytest.mark.parametrize("options", [dict(every_n_layers=2), dict(offload=True)], ids=["every-2nd-layer", "offload"])
def test_activation_checkpointing_options(options):
    """Newer transformers checkpoint every n-th layer only, or hold the saved activations in (pinned) host memory
    through saved-tensor hooks: the plan must reach the layers' recompute either way."""
    check_family("qwen2", lambda model: model.activation_checkpointing_enable(**options), num_hidden_layers=3)


def _torch_checkpoint_wrapper(model):
    # As FSDP's and accelerate's activation checkpointing apply it: each decoder layer wrapped, transformers' own
    # flag left off.
    import functools

    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import (
        CheckpointImpl, apply_activation_checkpointing, checkpoint_wrapper)

    apply_activation_checkpointing(
        model, checkpoint_wrapper_fn=functools.partial(checkpoint_wrapper, checkpoint_impl=CheckpointImpl.NO_REENTRANT),
        check_fn=lambda m: m in set(model.model.layers))


def _torch_composable_checkpoint(model):
    from torch.distributed._composable import checkpoint

    for layer in model.model.layers:
        checkpoint(layer)


@pytest.mark.parametrize("enable", [sp.hf.enable_checkpointing, _torch_checkpoint_wrapper, _torch_composable_checkpoint],
                         ids=["transformers", "checkpoint_wrapper", "composable"])
def test_eager_model_with_checkpointing(caplog, enable):
    """An eager model cannot take a plan during the checkpoint recompute; it is left on shared_prefix (= sdpa),
    whoever checkpoints its layers."""
    with caplog.at_level(logging.WARNING, logger="shared_prefix"):
        model = tiny_model("qwen2", attn="eager")
        model.train()
        rows, pid, pmask, cid, cmask = make_batch(seed=4)
        # Reference through sdpa (eager's softmax runs in fp32, too coarse for an fp64 comparison), before
        # checkpointing (the stock rows' forward keeps a KV cache, which torch's checkpointing would recompute into).
        model.set_attn_implementation("sdpa")
        ref_lp, _ = stock_logprobs(model, rows, cid.shape[1], 1.0)
        ref_grads = param_grads(model, ref_lp.sum())
        model.set_attn_implementation("eager")
        enable(model)
        lp = sp.completion_logprobs(model, pid, pmask, cid, cmask)
        grads = {n.replace("._checkpoint_wrapped_module", ""): g for n, g in param_grads(model, lp.sum()).items()}
    assert "leaving the model on 'shared_prefix'" in caplog.text
    assert (lp - ref_lp).abs().max().item() <= 1e-9
    assert max(((grads[n] - ref_grads[n]).norm() / ref_grads[n].norm()).item() for n in grads) <= 1e-6


def test_fp32_model_and_grouping_options():
    model = tiny_model("llama", dtype=torch.float32)
    rows, pid, pmask, cid, cmask = make_batch(seed=1, left_pad_prompt=False, groups=((6, (3, 4)), (6, (2, 2))))
    ref_lp, _ = stock_logprobs(model, rows, cid.shape[1], 1.0)
    by_prompt = sp.completion_logprobs(model, pid, pmask, cid, cmask)
    assert by_prompt.dtype == torch.float32
    assert (by_prompt.double() - ref_lp).abs().max().item() < 1e-5
    # Same prompt twice but declared as groups of one: identical values, no sharing.
    ones = sp.completion_logprobs(model, pid, pmask, cid, cmask, group_sizes=[1] * len(rows))
    assert (ones - by_prompt).abs().max().item() < 1e-5
    ids = sp.completion_logprobs(model, pid, pmask, cid, cmask, group_ids=[str(pid[i].tolist()) for i in range(len(rows))])
    assert (ids - by_prompt).abs().max().item() < 1e-5


def test_wrong_mask_fails_the_model_comparison():
    """Negative control: the packed stream through plain causal sdpa (completions see each other) is wrong."""
    model = tiny_model("qwen2")
    rows, pid, pmask, cid, cmask = make_batch()
    ref_lp, _ = stock_logprobs(model, rows, cid.shape[1], 1.0)
    p = sp.plan(pid, pmask, cid, cmask)
    hidden = model.model(input_ids=p.input_ids, position_ids=p.position_ids).last_hidden_state
    logits = model.lm_head(p.predictor_rows(hidden)).double()
    wrong = p.unpack_completions(torch.log_softmax(logits, -1).gather(-1, p.completion_targets()[:, None])[:, 0])
    assert (wrong - ref_lp).abs().max().item() > 1e-3


def test_generation_matches_sdpa():
    model = tiny_model("qwen2", dtype=torch.float32)
    sp.register()
    sp.register()  # idempotent
    rows, pid, pmask, _, _ = make_batch(seed=2)
    gen = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
    model.set_attn_implementation("sdpa")
    want = model.generate(input_ids=pid, attention_mask=pmask, **gen)
    model.set_attn_implementation("shared_prefix")
    got = model.generate(input_ids=pid, attention_mask=pmask, **gen)
    assert torch.equal(got, want)
    # And a plain forward with padding matches sdpa's logits.
    out = model(input_ids=pid, attention_mask=pmask).logits
    model.set_attn_implementation("sdpa")
    ref = model(input_ids=pid, attention_mask=pmask).logits
    assert torch.allclose(out, ref, atol=1e-6)


def test_direct_model_call_with_plan():
    """The documented low-level use: call the model on the packed stream with shared_prefix_plan=plan."""
    sp.register()
    model = tiny_model("mistral", attn="shared_prefix")
    rows, pid, pmask, cid, cmask = make_batch(seed=5)
    p = sp.plan(pid, pmask, cid, cmask)
    logits = model(input_ids=p.input_ids, position_ids=p.position_ids, shared_prefix_plan=p).logits
    per_token = p.predictors(logits)  # [B, Lc, V]
    ref_lp, _ = stock_logprobs(model, rows, cid.shape[1], 1.0)
    lp = torch.log_softmax(per_token, -1).gather(-1, cid[..., None])[..., 0] * cmask
    assert (lp - ref_lp).abs().max().item() <= 1e-9


def test_readme_lower_level_api_in_a_fresh_process():
    """The README's lower-level example, in a process where nothing has registered the attention implementation yet:
    PackedForward on a model with a sliding window (and again on its plan), then the unchecked direct call on a
    plan; all equal completion_logprobs."""
    import subprocess
    import sys

    script = """
import torch, transformers, shared_prefix as sp
cfg = transformers.MistralConfig(vocab_size=61, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                 num_attention_heads=4, num_key_value_heads=2, head_dim=8, sliding_window=4)
cfg._attn_implementation = "sdpa"
torch.manual_seed(0)
model = transformers.MistralForCausalLM(cfg).double()
pid = torch.randint(1, 61, (1, 6)).expand(4, 6)
pmask, cid = torch.ones_like(pid), torch.randint(1, 61, (4, 5))
cmask = torch.ones_like(cid)
forward = sp.hf.PackedForward.prepare(model, pid, pmask, cid, cmask)
logp, _ = forward.run(temperature=1.0)
again = sp.hf.PackedForward.prepare(model, pid, pmask, cid, cmask, plan=forward.plan)
assert torch.equal(again.outputs(model(**again.inputs(1.0)))[0], logp)
plan = sp.plan(pid, pmask, cid, cmask, windows=sp.hf.model_windows(model))
sp.register()
model.set_attn_implementation("shared_prefix")
out = model(input_ids=plan.input_ids, position_ids=plan.position_ids, shared_prefix_plan=plan)
direct = torch.log_softmax(plan.predictors(out.logits), -1).gather(-1, cid[..., None])[..., 0]
want = sp.completion_logprobs(model, pid, pmask, cid, cmask)
assert (logp - want).abs().max() <= 1e-12 and (direct - want).abs().max() <= 1e-9
print("ok")
"""
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr[-2000:]


def test_one_plan_serves_several_forwards():
    """One plan for a micro-batch's policy, old and reference log-probs: each PackedForward counts its own layers,
    and each forward's numbers equal completion_logprobs' (which plans afresh)."""
    from shared_prefix.hf import PackedForward

    model = tiny_model("qwen2")
    rows, pid, pmask, cid, cmask = make_batch(seed=3)
    p = sp.plan(pid, pmask, cid, cmask)
    want = sp.completion_logprobs(model, pid, pmask, cid, cmask, temperature=0.8)
    for _ in range(3):
        forward = PackedForward(model, p)
        got, entropy = forward.run(temperature=0.8)
        assert forward.attention_calls == model.config.num_hidden_layers and entropy is None
        assert torch.equal(got, want)
    with pytest.raises(ValueError, match="plan: not a plan made for this model's sliding windows"):
        PackedForward.prepare(tiny_model("mistral", sliding_window=4), pid, pmask, cid, cmask, plan=p)
    with pytest.raises(ValueError, match="plan: made for prompts and completions of shapes"):
        PackedForward.prepare(model, pid[:, 1:], pmask[:, 1:], cid, cmask, plan=p)
    stale = PackedForward(model, p)
    stale.count_layer()  # one layer too many: the forward is refused, not trusted
    with pytest.raises(sp.UnsupportedModelError, match="3 attention call"):
        stale.run(temperature=1.0)


@pytest.mark.parametrize("family,extra", [
    ("mistral", {"sliding_window": 4}),  # every layer
    ("qwen2", {"use_sliding_window": True, "sliding_window": 3, "max_window_layers": 1}),  # layer 1 only
    ("mistral", {"sliding_window": 2}),  # the previous token only (window 1 is covered at attention level: q/k get
    # no gradient there, which a relative comparison of rounding noise cannot judge)
])
@pytest.mark.parametrize("grad_ckpt", [False, True], ids=["no-ckpt", "ckpt"])
def test_sliding_window_layers_match_stock(family, extra, grad_ckpt):
    """Windows shorter than the prompts and the completions: each completion's keys are its prompt's tail and
    itself (exact, fp64, values, entropies and gradients)."""
    check_family(family, grad_ckpt, **extra)


def test_sliding_window_layers_of_gemma3():
    """Gemma 3's pattern: sliding layers (window 3) between full ones, QK norms, tied embeddings."""
    cfg = transformers.Gemma3TextConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=2, head_dim=8, max_position_embeddings=256, sliding_window=3, query_pre_attn_scalar=8,
        layer_types=["sliding_attention", "full_attention", "sliding_attention"], pad_token_id=0)
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(0)
    model = transformers.Gemma3ForCausalLM(cfg).double()
    assert sp.hf.model_windows(model) == [3]
    assert_matches_stock(model)


class TestUnsupported:
    def test_sliding_window_without_key_tables(self):
        """A plan made without the model's window: the layers refuse it rather than attend past the window."""
        model = tiny_model("mistral", sliding_window=4)
        _, pid, pmask, cid, cmask = make_batch()
        p = sp.plan(pid, pmask, cid, cmask)
        sp.register()
        model.set_attn_implementation("shared_prefix")
        with pytest.raises(NotImplementedError, match="sliding_window=4 .* made without it"):
            model(input_ids=p.input_ids, position_ids=p.position_ids, shared_prefix_plan=p)
        assert sp.hf.unsupported_for(model, p) is not None
        assert sp.hf.unsupported_for(model, sp.plan(pid, pmask, cid, cmask, windows=[4])) is None

    def test_torch_without_local_flash_attention(self, monkeypatch):
        """A torch built with FLASHATTENTION_DISABLE_LOCAL raises this before launching FA2 with a window: a windowed
        model is then refused (TRL and verl run the stock method) instead of failing the step."""
        from shared_prefix.hf import registry

        real = registry.attention

        def no_local(*args, window=None, **kw):
            if window is not None and window < args[3].max_seqlen:  # FA2 is reached for windows that cut
                raise RuntimeError("This flash attention build does not support local attention.")
            return real(*args, **kw)

        monkeypatch.setattr(registry, "attention", no_local)
        _, pid, pmask, cid, cmask = make_batch()
        with pytest.raises(sp.UnsupportedModelError, match="has no sliding windows"):
            sp.completion_logprobs(tiny_model("mistral", sliding_window=4), pid, pmask, cid, cmask)
        sp.completion_logprobs(tiny_model("mistral"), pid, pmask, cid, cmask)  # no window: unaffected

    def test_window_applied_by_the_mask_alone(self):
        """PhiMoE applies its config's window through the mask only: its layers neither pass a window nor hold
        one, so the plan cannot know which layers it cuts. Refused (it ran full attention, 0.18 off, before)."""
        cfg = transformers.PhimoeConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, num_local_experts=4,
                                        num_experts_per_tok=2, sliding_window=3, pad_token_id=0)
        cfg._attn_implementation = "sdpa"
        model = transformers.AutoModelForCausalLM.from_config(cfg, experts_implementation="eager").double()
        _, pid, pmask, cid, cmask = make_batch()
        with pytest.raises(sp.UnsupportedModelError, match="does not say whether it applies it"):
            sp.completion_logprobs(model, pid, pmask, cid, cmask)

    def test_attention_dropout_in_train_mode(self):
        model = tiny_model("llama", attention_dropout=0.1)
        model.train()
        _, pid, pmask, cid, cmask = make_batch()
        with pytest.raises(NotImplementedError, match="dropout"):
            sp.completion_logprobs(model, pid, pmask, cid, cmask)
        model.eval()  # dropout is inactive in eval mode: allowed
        sp.completion_logprobs(model, pid, pmask, cid, cmask)

    def test_logit_softcapping(self):
        model = tiny_model("llama")
        model.config.final_logit_softcapping = 30.0
        _, pid, pmask, cid, cmask = make_batch()
        with pytest.raises(NotImplementedError, match="softcapping"):
            sp.completion_logprobs(model, pid, pmask, cid, cmask)

    def test_logit_scaling_models(self):
        cfg = transformers.GraniteConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                                         num_attention_heads=4, num_key_value_heads=2, logits_scaling=4.0)
        model = transformers.GraniteForCausalLM(cfg)
        _, pid, pmask, cid, cmask = make_batch()
        with pytest.raises(NotImplementedError, match="logits_scaling=4.0"):
            sp.completion_logprobs(model, pid, pmask, cid, cmask)

    def test_bad_temperature_and_model(self):
        model = tiny_model("llama")
        _, pid, pmask, cid, cmask = make_batch()
        for bad in (0, -1.0, float("inf"), float("nan"), True):
            with pytest.raises(ValueError, match="temperature"):
                sp.completion_logprobs(model, pid, pmask, cid, cmask, temperature=bad)
        oov = cid.clone()
        r, j = cmask.nonzero()[0].tolist()
        oov[r, j] = VOCAB  # a valid completion token outside the vocabulary
        with pytest.raises(ValueError, match="prompt_ids, completion_ids: token ids must lie in"):
            sp.completion_logprobs(model, pid, pmask, oov, cmask)
        with pytest.raises(TypeError, match="model:"):
            sp.completion_logprobs(object(), pid, pmask, cid, cmask)
        with pytest.raises(TypeError, match="prompt_ids: the model's embeddings take int64 or int32 token ids"):
            sp.completion_logprobs(model, pid.to(torch.uint8), pmask, cid, cmask)
        with pytest.raises(TypeError, match="completion_ids: .* got torch.int16"):
            sp.completion_logprobs(model, pid, pmask, cid.to(torch.int16), cmask)
        chunked = tiny_model("llama")
        chunked.config.attention_chunk_size = 2  # a refusal of the micro-batch: bad input is still named first
        with pytest.raises(TypeError, match="prompt_ids: the model's embeddings take int64 or int32 token ids"):
            sp.completion_logprobs(chunked, pid.to(torch.uint8), pmask, cid, cmask)
        with pytest.raises(sp.UnsupportedModelError, match="chunked attention"):
            sp.completion_logprobs(chunked, pid, pmask, cid, cmask)
        lp32 = sp.completion_logprobs(model, pid.int(), pmask, cid.int(), cmask)  # int32 ids work as int64 ones
        assert torch.equal(lp32, sp.completion_logprobs(model, pid, pmask, cid, cmask))


@pytest.mark.parametrize("tie", [False, True])
def test_completion_logprobs_under_fsdp2(tie):
    """A model under FSDP2 with reshard_after_forward (one CPU rank): completion_logprobs goes through the root's
    forward and unshards the head through its unit; values and gradients equal the stock per-row model's."""
    import copy

    from helpers import fully_shard_causal_lm

    ref_model = tiny_model("qwen2", tie_word_embeddings=tie)
    assert (ref_model.get_output_embeddings().weight is ref_model.get_input_embeddings().weight) == tie
    model = copy.deepcopy(ref_model)
    fully_shard_causal_lm(model, head_unit=not tie)  # a tied head lives in the root's unit
    rows, pid, pmask, cid, cmask = make_batch(seed=3)
    ref, ref_ent = stock_logprobs(ref_model, rows, cid.shape[1], 0.8)
    ref_grads = param_grads(ref_model, ref.sum() + ref_ent.sum())
    lp, ent = sp.completion_logprobs(model, pid, pmask, cid, cmask, temperature=0.8, return_entropy=True, chunk_size=7)
    assert (lp - ref).abs().max().item() <= 1e-9 and (ent - ref_ent).abs().max().item() <= 1e-9
    grads = {n: g.full_tensor() for n, g in param_grads(model, lp.sum() + ent.sum()).items()}
    assert set(grads) == set(ref_grads)
    assert max(((grads[n] - ref_grads[n]).norm() / ref_grads[n].norm()).item() for n in grads) <= 1e-6


@pytest.mark.parametrize("tie", [False, True])
def test_fsdp2_frozen_head(tie):
    """A frozen head under FSDP2 (LoRA trains adapters only): the backward to the hidden states still reads its
    weight, so the unit stays unsharded until FSDP's post-backward (resharding it early freed the weight's storage:
    a RuntimeError in backward)."""
    import copy

    from helpers import fully_shard_causal_lm

    ref_model = tiny_model("qwen2", tie_word_embeddings=tie)
    ref_model.get_output_embeddings().weight.requires_grad_(False)
    model = copy.deepcopy(ref_model)
    fully_shard_causal_lm(model, head_unit=not tie)
    _, pid, pmask, cid, cmask = make_batch(seed=3)
    ref = sp.completion_logprobs(ref_model, pid, pmask, cid, cmask)
    ref_grads = param_grads(ref_model, ref.sum())
    lp = sp.completion_logprobs(model, pid, pmask, cid, cmask)
    grads = {n: g.full_tensor() for n, g in param_grads(model, lp.sum()).items()}
    assert (lp - ref).abs().max().item() <= 1e-9 and set(grads) == set(ref_grads)
    assert max(((grads[n] - ref_grads[n]).norm() / ref_grads[n].norm()).item() for n in grads) <= 1e-6


@pytest.mark.parametrize("tie", [False, True])
def test_fsdp2_no_grad_call_leaves_the_head_sharded(tie):
    """A no-grad call (a logged KL, old log-probs) between backward and the optimizer step: the head's unit is
    resharded after it, so the next forward gathers the stepped weights instead of reading the stale ones."""
    import copy

    from helpers import fully_shard_causal_lm

    ref_model = tiny_model("qwen2", tie_word_embeddings=tie)
    model = copy.deepcopy(ref_model)
    fully_shard_causal_lm(model, head_unit=not tie)
    _, pid, pmask, cid, cmask = make_batch(seed=4)
    for m in (ref_model, model):
        opt = torch.optim.SGD(m.parameters(), lr=1.0)
        sp.completion_logprobs(m, pid, pmask, cid, cmask).sum().backward()
        with torch.no_grad():
            sp.completion_logprobs(m, pid, pmask, cid, cmask)
        assert type(m.get_output_embeddings().weight).__name__ == ("DTensor" if m is model else "Parameter")
        opt.step()
    with torch.no_grad():
        after = sp.completion_logprobs(model, pid, pmask, cid, cmask)
        expected = sp.completion_logprobs(ref_model, pid, pmask, cid, cmask)
    assert (after - expected).abs().max().item() <= 1e-9


@pytest.mark.parametrize("tie", [False, True])
def test_fsdp2_bf16_mixed_precision_as_close_as_stock(tie):
    """FSDP2 with a bf16 mixed-precision policy (verl's default): the head is unsharded in bf16 through its unit.
    Ours is as close to the fp64 rows as the stock rows through the same sharded model, in values and gradients."""
    import copy

    from helpers import fully_shard_causal_lm

    base = tiny_model("qwen2", dtype=torch.float32, tie_word_embeddings=tie)
    models = {}
    for name in ("stock", "ours"):
        models[name] = copy.deepcopy(base)
        fully_shard_causal_lm(models[name], head_unit=not tie, param_dtype=torch.bfloat16)
    ref_model = base.double()
    rows, pid, pmask, cid, cmask = make_batch(seed=3)
    ref, ref_ent = stock_logprobs(ref_model, rows, cid.shape[1], 0.8)
    ref_grads = param_grads(ref_model, ref.sum() + ref_ent.sum())
    stock, stock_ent = stock_logprobs(models["stock"], rows, cid.shape[1], 0.8)
    ours, ours_ent = sp.completion_logprobs(models["ours"], pid, pmask, cid, cmask, temperature=0.8,
                                            return_entropy=True, chunk_size=7)
    errs = {}
    for name, lp, ent in (("stock", stock, stock_ent), ("ours", ours, ours_ent)):
        grads = {n: g.full_tensor() for n, g in param_grads(models[name], lp.sum() + ent.sum()).items()}
        assert set(grads) == set(ref_grads) and all(g.dtype == torch.float32 for g in grads.values())
        grads = {n: g.double() for n, g in grads.items()}
        errs[name] = ((lp.double() - ref).abs().max().item(),
                      max(((grads[n] - ref_grads[n]).norm() / ref_grads[n].norm()).item() for n in grads))
    assert all(m <= 2 * t + 1e-4 for m, t in zip(errs["ours"], errs["stock"])), errs
    assert errs["stock"][0] > 1e-5, errs  # bf16 was in effect


@pytest.mark.parametrize("family", ["llama", "qwen2", "gemma"])
@pytest.mark.parametrize("grad_ckpt", [False, True], ids=["no-ckpt", "ckpt"])
def test_autocast_bf16_as_close_as_stock(family, grad_ckpt):
    """fp32 weights under bf16 autocast (TRL's `bf16=True`, verl's engine): the model hands our attention fp32 q/k
    beside a bf16 v, as it hands SDPA. Ours must run and be as close to the fp64 rows as the stock rows under the
    same autocast are, in values and gradients."""
    model = tiny_model(family, dtype=torch.float32)
    if grad_ckpt:
        sp.hf.enable_checkpointing(model)
        model.train()
    rows, pid, pmask, cid, cmask = make_batch()
    w = torch.randn(cid.shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64)

    def loss(lp, ent):
        return (lp.double() * w).sum() + 0.1 * (ent.double() * w).sum()

    model.double()
    ref_lp, ref_ent = stock_logprobs(model, rows, cid.shape[1], 0.7)
    ref = param_grads(model, loss(ref_lp, ref_ent))
    model.float()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        stock_lp, stock_ent = stock_logprobs(model, rows, cid.shape[1], 0.7)
        ours_lp, ours_ent = sp.completion_logprobs(model, pid, pmask, cid, cmask, temperature=0.7, return_entropy=True)
    stock = param_grads(model, loss(stock_lp, stock_ent))
    ours = param_grads(model, loss(ours_lp, ours_ent))

    def err(lp, ent, grads):
        g = max(((grads[n].double() - ref[n]).norm() / ref[n].norm()).item() for n in ref)
        return (lp.double() - ref_lp).abs().max().item(), (ent.double() - ref_ent).abs().max().item(), g

    mine, theirs = err(ours_lp, ours_ent, ours), err(stock_lp, stock_ent, stock)
    assert all(m <= 2 * t + 1e-4 for m, t in zip(mine, theirs)), (mine, theirs)
    assert 0 < theirs[0] < 0.05, theirs  # bf16 was in effect for both, and the comparison is meaningful


# Models on which the packed stream cannot be split by attention alone. Their decoder layers drop keyword arguments
# before attention (StableLM, Nemotron) or build attention outside transformers' AttentionInterface (Falcon): the
# plan never reaches a layer, which would run plain causal attention over the packed stream. Hybrid models mix
# tokens in recurrent/convolution layers along the stream (Qwen3.5's gated DeltaNet, LFM2's short convolutions).
REFUSED = {
    "stablelm": (transformers.StableLmConfig, transformers.StableLmForCausalLM, {}, "0 attention call"),
    "nemotron": (transformers.NemotronConfig, transformers.NemotronForCausalLM, {"head_dim": 8}, "0 attention call"),
    "falcon": (transformers.FalconConfig, transformers.FalconForCausalLM,
               {"new_decoder_architecture": True, "num_kv_heads": 2}, "0 attention call"),
    "qwen3_5": (transformers.Qwen3_5TextConfig, transformers.Qwen3_5ForCausalLM,
                {"head_dim": 8, "layer_types": ["linear_attention", "full_attention"], "linear_num_value_heads": 2,
                 "linear_num_key_heads": 2, "linear_key_head_dim": 8, "linear_value_head_dim": 8},
                "linear_attention layers"),
    "lfm2": (transformers.Lfm2Config, transformers.Lfm2ForCausalLM, {"layer_types": ["conv", "full_attention"]},
             "conv layers"),
}


def refused_model(name):
    cfg_cls, model_cls, kw, _ = REFUSED[name]
    cfg = cfg_cls(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, pad_token_id=0, **kw)
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(0)
    return model_cls(cfg).double()


@pytest.mark.parametrize("name", sorted(REFUSED))
def test_models_the_plan_cannot_split_are_refused(name):
    """Each of these gave wrong log-probs and gradients without an error before: now a named refusal."""
    model = refused_model(name)
    rows, pid, pmask, cid, cmask = make_batch()
    ref, _ = stock_logprobs(model, rows, cid.shape[1], 1.0)
    assert torch.isfinite(ref).all()  # the stock model runs these rows
    with pytest.raises(sp.UnsupportedModelError, match=REFUSED[name][3]):
        sp.completion_logprobs(model, pid, pmask, cid, cmask)


def test_value_head_dim_unlike_query_head_dim():
    """DeepSeek-V3's multi-head latent attention (v_head_dim 6, q/k head dim 12), MoE routing off: exact."""
    cfg = transformers.DeepseekV3Config(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=4, kv_lora_rank=16, q_lora_rank=16, qk_rope_head_dim=4, qk_nope_head_dim=8, v_head_dim=6,
        n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=16, first_k_dense_replace=2, n_group=1,
        topk_group=1, max_position_embeddings=256)
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(0)
    model = transformers.DeepseekV3ForCausalLM(cfg).double()
    assert_matches_stock(model)


@pytest.mark.parametrize("extra,match", [
    ({"attention_chunk_size": 8}, "chunked attention"),
    ({"attention_chunk_size": 8192, "floor_scale": 16}, "temperature tuning"),
])
def test_llama4_position_dependent_attention_is_refused(extra, match):
    """Llama 4 chunks attention by position and scales queries by their cache position (which in the packed
    stream is not the row's): beyond the first chunk / floor_scale the packed result would differ."""
    cfg = transformers.Llama4TextConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=48, intermediate_size_mlp=48, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=8, num_local_experts=2, moe_layers=[], **extra)
    cfg._attn_implementation = "sdpa"
    model = transformers.Llama4ForCausalLM(cfg).double()
    rows, pid, pmask, cid, cmask = make_batch()
    with pytest.raises(sp.UnsupportedModelError, match=match):
        sp.completion_logprobs(model, pid, pmask, cid, cmask)
