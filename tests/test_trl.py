"""TRL: the shared-prefix GRPO trainer computes the same log-probs, entropies, gradients and training as stock."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch

trl = pytest.importorskip("trl")
datasets = pytest.importorskip("datasets")
from transformers import Qwen2Config, Qwen2ForCausalLM  # noqa: E402

import shared_prefix as sp  # noqa: E402
from shared_prefix.trl import METRIC, TREE_METRIC, SharedPrefixGRPOTrainer, patch_trainer  # noqa: E402
from trl_setup import WORDS, config, dataset, model, reward_len, tokenizer  # noqa: E402


def trainer(cls, tmp_path, bf16=False, moe=False, **kw):
    # A local checkpoint (no Hub): with beta > 0 TRL builds the reference model from the model's path.
    path = tmp_path / "model"
    if not path.exists():
        model(moe).save_pretrained(path)
    return cls(model=str(path), reward_funcs=reward_len, args=config(tmp_path, bf16=bf16), train_dataset=dataset(),
               processing_class=tokenizer(), **kw)


def trl_inputs(prompts, completions, lp, lc):
    """Rows as TRL builds them: left-padded prompts, then right-padded completions, one ``[B, lp + lc]`` tensor."""
    ids = torch.zeros(len(prompts), lp + lc, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for r, (p, c) in enumerate(zip(prompts, completions)):
        ids[r, lp - len(p) : lp] = p
        ids[r, lp : lp + len(c)] = c
        mask[r, lp - len(p) : lp + len(c)] = 1
    return ids, mask, lc


def batch(left_pad=True):
    """TRL-shaped inputs: left-padded prompts, right-padded completions (one truncated, one empty), groups shuffled."""
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(2, 60, (n,), generator=g) for n in (5, 3, 7)]
    rows = [(0, 4), (1, 6), (0, 6), (2, 2), (1, 0), (0, 1), (2, 6), (1, 3)]
    completions = [torch.randint(2, 60, (c,), generator=g) for _, c in rows]
    return trl_inputs([prompts[pi] for pi, _ in rows], completions, 7, 6)


def system_prompt_batch():
    """TRL-shaped inputs whose prompts open with one shared system prompt, and whose completions of a prompt share
    their first tokens (a rollout branching), one completion empty."""
    g = torch.Generator().manual_seed(4)
    system = torch.randint(2, 60, (9,), generator=g)
    prompts = [torch.cat([system, torch.randint(2, 60, (n,), generator=g)]) for n in (2, 4)]
    trunks = [torch.randint(2, 60, (3,), generator=g) for _ in prompts]
    rows = [(0, 3), (1, 6), (0, 6), (1, 0), (0, 5), (1, 4)]
    completions = [torch.cat([trunks[pi], torch.randint(2, 60, (3,), generator=g)])[:c] for pi, c in rows]
    return trl_inputs([prompts[pi] for pi, _ in rows], completions, 13, 6)


@pytest.mark.parametrize("shared", ["prompts", "system_prompt"])
def test_logps_entropies_and_grads_equal_stock(tmp_path, shared):
    stock = trainer(trl.GRPOTrainer, tmp_path / "a")
    ours = trainer(SharedPrefixGRPOTrainer, tmp_path / "b")
    ids, mask, lc = batch() if shared == "prompts" else system_prompt_batch()
    before = sp.set_prefix_tree(min_node_tokens=2)  # the batch's shared runs are short
    try:
        results = []
        for t in (stock, ours):
            m = t.model
            m.train()  # as inside TRL's training step (no dropout in this config)
            m.zero_grad(set_to_none=True)
            logps, ent, _ = t._get_per_token_logps_and_entropies(m, ids, mask, lc, compute_entropy=True)
            w = torch.randn(logps.shape, generator=torch.Generator().manual_seed(2))
            ((logps * w).sum() + (ent * w).sum()).backward()
            results.append((logps.detach(), ent.detach(), {n: p.grad.clone() for n, p in m.named_parameters()}))
    finally:
        sp.set_prefix_tree(**before)
    (lp_s, ent_s, g_s), (lp_o, ent_o, g_o) = results
    cmask = mask[:, -lc:].bool()
    assert (lp_o - lp_s).abs().max().item() <= 1e-6
    assert (ent_o - ent_s).abs().max().item() <= 1e-6
    assert torch.all(lp_o[~cmask] == 0) and torch.all(ent_o[~cmask] == 0)
    for n in g_s:
        assert ((g_o[n] - g_s[n]).norm() / g_s[n].norm().clamp_min(1e-12)).item() <= 1e-5, n
    assert ours._metrics["train"][METRIC][-1] > 0
    # The tree saves beyond whole prompts only where the batch shares more.
    assert (ours._metrics["train"][TREE_METRIC][-1] > 0) == (shared == "system_prompt")


def test_old_and_reference_logps_plan_once(tmp_path, monkeypatch):
    """TRL computes the old and the reference log-probs of a batch on the same tensors: their micro-batches are
    planned once and the plans reused (same values). A new tensor, an in-place change or another micro-batch size
    plans afresh."""
    from shared_prefix.hf import pipeline

    planned = []
    real = pipeline.make_plan
    monkeypatch.setattr(pipeline, "make_plan", lambda *a, **kw: planned.append(1) or real(*a, **kw))
    ours = trainer(SharedPrefixGRPOTrainer, tmp_path)
    ids, mask, lc = batch()
    with torch.no_grad():
        calls = lambda i, m, bs=4: ours._get_per_token_logps_and_entropies(ours.model, i, m, lc, bs)[0]  # noqa: E731
        first = calls(ids, mask)
        assert len(planned) == 2  # two micro-batches of 4 rows
        assert torch.equal(calls(ids, mask), first) and len(planned) == 2  # reused
        ids[1, -1] = 3 - ids[1, -1] % 2  # in place: a completion token changes
        changed = calls(ids, mask)
        assert len(planned) == 4 and not torch.equal(changed, first)
        assert torch.equal(calls(ids.clone(), mask), changed) and len(planned) == 6  # another tensor
        calls(ids, mask, bs=8)
        assert len(planned) == 7
    with torch.inference_mode():  # inference tensors keep no version counter: planned afresh, never reused
        frozen_ids, frozen_mask = ids.clone(), mask.clone()
        assert torch.equal(calls(frozen_ids, frozen_mask), changed) and len(planned) == 9
        calls(frozen_ids, frozen_mask)
        assert len(planned) == 11


def test_bf16_mixed_precision_as_close_as_stock(tmp_path):
    """`bf16=True` with fp32 weights (accelerate's autocast; the model hands attention fp32 q/k beside a bf16 v):
    ours runs and is as close to the fp32 computation as the stock trainer under the same autocast, in log-probs,
    entropies and gradients."""
    ids, mask, lc = batch()
    w = torch.randn(ids.shape[0], lc, generator=torch.Generator().manual_seed(2))
    results = {}
    for name, cls, bf16 in (("ref", trl.GRPOTrainer, False), ("stock", trl.GRPOTrainer, True),
                            ("ours", SharedPrefixGRPOTrainer, True)):
        t = trainer(cls, tmp_path / name, bf16=bf16)
        m = t.model
        assert next(m.parameters()).dtype == torch.float32
        m.train()
        m.zero_grad(set_to_none=True)
        logps, ent, _ = t._get_per_token_logps_and_entropies(m, ids, mask, lc, compute_entropy=True)
        ((logps.float() * w).sum() + (ent.float() * w).sum()).backward()
        grads = torch.cat([p.grad.reshape(-1) for p in m.parameters()])
        results[name] = (logps.detach().float(), ent.detach().float(), grads)
    ref = results["ref"]

    def err(r):
        return ((r[0] - ref[0]).abs().max().item(), (r[1] - ref[1]).abs().max().item(),
                ((r[2] - ref[2]).norm() / ref[2].norm()).item())

    mine, theirs = err(results["ours"]), err(results["stock"])
    assert all(m <= 2 * s + 1e-4 for m, s in zip(mine, theirs)), (mine, theirs)
    assert theirs[0] > 1e-5, theirs  # autocast was in effect


def test_lora_adapters_equal_stock(tmp_path):
    """GRPO with a PEFT LoRA config (TRL wraps the model in a PeftModel; the reference log-probs run with the
    adapters disabled): ours runs on the wrapped model, with the stock log-probs and LoRA gradients."""
    from peft import LoraConfig

    ids, mask, lc = batch()
    results = []
    for cls, sub in ((trl.GRPOTrainer, "stock"), (SharedPrefixGRPOTrainer, "ours")):
        lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "o_proj", "gate_proj"],
                          lora_dropout=0.0, init_lora_weights=False)
        torch.manual_seed(0)  # the same random adapter weights for both
        t = trainer(cls, tmp_path / sub, peft_config=lora)
        m = t.model
        m.train()
        m.zero_grad(set_to_none=True)
        logps, ent, _ = t._get_per_token_logps_and_entropies(m, ids, mask, lc, compute_entropy=True)
        w = torch.randn(logps.shape, generator=torch.Generator().manual_seed(2))
        ((logps * w).sum() + (ent * w).sum()).backward()
        grads = {n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None}
        with m.disable_adapter():
            ref_logps = t._get_per_token_logps_and_entropies(m, ids, mask, lc)[0]
        results.append((logps.detach(), ref_logps, grads, t))
    (lp_s, ref_s, g_s, _), (lp_o, ref_o, g_o, ours) = results
    assert (lp_o - lp_s).abs().max().item() <= 1e-6
    assert (ref_o - ref_s).abs().max().item() <= 1e-6
    assert (ref_o - lp_o).abs().max().item() > 1e-3  # the adapters change the policy: both paths were exercised
    assert g_s.keys() == g_o.keys() and all("lora" in n for n in g_o)
    for n in g_s:
        assert ((g_o[n] - g_s[n]).norm() / g_s[n].norm().clamp_min(1e-12)).item() <= 1e-5, n
    assert len(ours._metrics["train"][METRIC]) == 2  # ours ran both times (no fallback to stock)


def _unsplittable_model(kind):
    """A model the plan cannot split: StableLM's decoder layers drop keyword arguments before attention (a property
    of the class); a Qwen2 with a 4-token sliding window on every layer, for a plan made without its key tables (a
    property of each long micro-batch)."""
    import transformers

    common = dict(vocab_size=len(WORDS), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128, pad_token_id=0,
                  eos_token_id=1, bos_token_id=1)
    torch.manual_seed(0)
    if kind == "stablelm":
        return transformers.StableLmForCausalLM(transformers.StableLmConfig(**common))
    return Qwen2ForCausalLM(Qwen2Config(use_sliding_window=True, sliding_window=4, max_window_layers=0, **common))


@pytest.mark.parametrize("kind", ["stablelm", "window"])
def test_models_the_plan_cannot_split_fall_back_to_stock(tmp_path, caplog, monkeypatch, kind):
    """Such a model trains exactly as with the stock trainer: the stock log-probs are used (logged once with the
    reason); a model class found unsplittable on its forward is not tried again."""
    from shared_prefix.hf import pipeline

    if kind == "window":  # plans without the window's key tables: refused per micro-batch
        monkeypatch.setattr(pipeline, "model_windows", lambda model: [])
    path = tmp_path / "model"
    _unsplittable_model(kind).save_pretrained(path)
    ids, mask, lc = batch()
    out = []
    for cls, sub in ((trl.GRPOTrainer, "stock"), (SharedPrefixGRPOTrainer, "ours")):
        t = cls(model=str(path), reward_funcs=reward_len, args=config(tmp_path / sub), train_dataset=dataset(),
                processing_class=tokenizer())
        with caplog.at_level(logging.WARNING, logger="shared_prefix"):
            for _ in range(2):
                logps, ent, _ = t._get_per_token_logps_and_entropies(t.model, ids, mask, lc, compute_entropy=True)
        out.append((logps, ent, t))
    (lp_s, ent_s, _), (lp_o, ent_o, ours) = out
    assert (lp_o - lp_s).abs().max().item() <= 1e-6 and (ent_o - ent_s).abs().max().item() <= 1e-6
    reason = "0 attention call" if kind == "stablelm" else "sliding_window=4"
    assert caplog.text.count(reason) == 1, caplog.text
    assert bool(ours.shared_prefix_fallbacks.refused) == (kind == "stablelm")
    # Both calls show the fallback as nothing saved: the second (StableLM: refused before any micro-batch) too.
    assert ours._metrics["eval"][METRIC] == [0.0, 0.0]  # the model is in eval mode here


def test_sliding_window_model_runs_ours(tmp_path, caplog):
    """A Qwen2 with a 4-token sliding window on every layer (shorter than every row): ours runs (no fallback) and
    its log-probs, entropies and gradients equal the stock trainer's."""
    path = tmp_path / "model"
    _unsplittable_model("window").save_pretrained(path)
    ids, mask, lc = batch()
    out = []
    for cls, sub in ((trl.GRPOTrainer, "stock"), (SharedPrefixGRPOTrainer, "ours")):
        t = cls(model=str(path), reward_funcs=reward_len, args=config(tmp_path / sub), train_dataset=dataset(),
                processing_class=tokenizer())
        t.model.train()
        t.model.zero_grad(set_to_none=True)
        with caplog.at_level(logging.WARNING, logger="shared_prefix"):
            logps, ent, _ = t._get_per_token_logps_and_entropies(t.model, ids, mask, lc, compute_entropy=True)
        w = torch.randn(logps.shape, generator=torch.Generator().manual_seed(2))
        ((logps * w).sum() + (ent * w).sum()).backward()
        out.append((logps, ent, {n: p.grad.clone() for n, p in t.model.named_parameters()}, t))
    (lp_s, ent_s, g_s, _), (lp_o, ent_o, g_o, ours) = out
    assert "shared_prefix" not in caplog.text  # no fallback logged
    assert len(ours._metrics["train"][METRIC]) == 1  # ours ran
    assert (lp_o - lp_s).abs().max().item() <= 1e-6 and (ent_o - ent_s).abs().max().item() <= 1e-6
    for n in g_s:
        assert ((g_o[n] - g_s[n]).norm() / g_s[n].norm().clamp_min(1e-12)).item() <= 1e-5, n


def test_attention_dropout_as_the_modules_apply_it(tmp_path, caplog):
    """GPT-2's config keeps attn_pdrop=0.1 while TRL's disable_dropout zeroes the modules' dropout, which is what
    attention receives: ours runs (no refusal by the config's rate) and equals stock. With dropout left on in train
    mode, each call falls back to the stock method instead of raising."""
    import transformers

    cfg = transformers.GPT2Config(vocab_size=len(WORDS), n_embd=32, n_layer=2, n_head=4, n_positions=128,
                                  pad_token_id=0, eos_token_id=1, bos_token_id=1)
    torch.manual_seed(0)
    path = tmp_path / "model"
    transformers.GPT2LMHeadModel(cfg).save_pretrained(path)
    # Prompts of one length: TRL's own training forward gives left-padded rows positions shifted by their padding,
    # which only matters for absolute position embeddings like GPT-2's (ours uses each row's own positions).
    ids, mask, lc = batch()
    full = mask[:, :-lc].all(1)
    ids, mask = ids[full], mask[full]
    assert len(ids) >= 2
    out = {}
    for name, cls, disable in (("stock", trl.GRPOTrainer, True), ("ours", SharedPrefixGRPOTrainer, True),
                               ("ours_dropout", SharedPrefixGRPOTrainer, False)):
        t = cls(model=str(path), reward_funcs=reward_len, args=config(tmp_path / name, disable_dropout=disable),
                train_dataset=dataset(), processing_class=tokenizer())
        t.model.train()
        with caplog.at_level(logging.WARNING, logger="shared_prefix"):
            out[name] = (t._get_per_token_logps_and_entropies(t.model, ids, mask, lc)[0], t)
    assert (out["ours"][0] - out["stock"][0]).abs().max().item() <= 1e-6
    assert len(out["ours"][1]._metrics["train"][METRIC]) == 1  # ours ran
    assert "attention dropout (0.1)" in caplog.text and not out["ours_dropout"][1]._metrics["train"][METRIC][-1]
    # Dropout is the mode's, not the model's: the same trainer in eval mode (a reference pass) runs ours.
    dropout_trainer = out["ours_dropout"][1]
    assert not dropout_trainer.shared_prefix_fallbacks.refused
    dropout_trainer.model.eval()
    with torch.no_grad():
        lp = dropout_trainer._get_per_token_logps_and_entropies(dropout_trainer.model, ids, mask, lc)[0]
    assert dropout_trainer._metrics["eval"][METRIC][-1] > 0 and (lp - out["stock"][0]).abs().max().item() <= 1e-6


def test_rloo_logps_equal_stock(tmp_path):
    from shared_prefix.trl import SharedPrefixRLOOTrainer

    path = tmp_path / "model"
    model().save_pretrained(path)
    conf = dict(per_device_train_batch_size=8, num_generations=4, max_completion_length=6, max_steps=1,
                report_to="none", use_cpu=True, bf16=False, temperature=0.7, save_strategy="no")
    out = []
    for cls, sub in ((trl.RLOOTrainer, "a"), (SharedPrefixRLOOTrainer, "b")):
        t = cls(model=str(path), reward_funcs=reward_len, args=trl.RLOOConfig(output_dir=str(tmp_path / sub), **conf),
                train_dataset=dataset(), processing_class=tokenizer())
        ids, mask, lc = batch()
        out.append(t._get_per_token_logps_and_entropies(t.model, ids, mask, lc, compute_entropy=True))
    assert (out[0][0] - out[1][0]).abs().max().item() <= 1e-6
    assert (out[0][1] - out[1][1]).abs().max().item() <= 1e-6


def test_moe_aux_loss_and_grads_equal_stock(tmp_path):
    """A MoE model's load-balancing loss over a batch with a shared system prompt and branching completions: ours
    weights each packed token by the rows it stands for, which gives the stock value and gradients."""
    stock = trainer(trl.GRPOTrainer, tmp_path / "a", moe=True)
    ours = trainer(SharedPrefixGRPOTrainer, tmp_path / "b", moe=True)
    assert stock.aux_loss_enabled and ours.aux_loss_enabled
    ids, mask, lc = system_prompt_batch()
    before = sp.set_prefix_tree(min_node_tokens=2)
    try:
        results = []
        for t in (stock, ours):
            m = t.model
            m.train()
            m.zero_grad(set_to_none=True)
            logps, _, aux = t._get_per_token_logps_and_entropies(m, ids, mask, lc, batch_size=3,
                                                                 compute_aux_loss=True)
            w = torch.randn(logps.shape, generator=torch.Generator().manual_seed(2))
            ((logps * w).sum() + 5.0 * aux).backward()
            results.append((logps.detach(), aux.detach(), {n: p.grad.clone() for n, p in m.named_parameters()}))
    finally:
        sp.set_prefix_tree(**before)
    (lp_s, aux_s, g_s), (lp_o, aux_o, g_o) = results
    assert ours._metrics["train"][METRIC][-1] > 0  # ours ran
    assert (lp_o - lp_s).abs().max().item() <= 1e-6
    assert abs(aux_o.item() - aux_s.item()) <= 1e-6 * abs(aux_s.item())
    router = [n for n in g_s if "mlp.gate" in n]
    assert router and all(g_s[n].norm() > 0 for n in router)
    for n in g_s:
        assert ((g_o[n] - g_s[n]).norm() / g_s[n].norm().clamp_min(1e-12)).item() <= 1e-5, n


def test_moe_aux_loss_without_the_stock_call_pattern_falls_back(tmp_path, monkeypatch, caplog):
    """A MoE model whose forward does not compute the loss as transformers' MoE causal LMs do goes to stock."""
    import shared_prefix.trl as sp_trl

    ours = trainer(SharedPrefixGRPOTrainer, tmp_path, moe=True)
    monkeypatch.setattr(sp_trl, "load_balancing_loss", lambda model: None)
    ids, mask, lc = batch()
    with caplog.at_level(logging.WARNING, logger="shared_prefix"):
        _, _, aux = ours._get_per_token_logps_and_entropies(ours.model, ids, mask, lc, compute_aux_loss=True)
    assert aux is not None and "auxiliary (MoE) loss that shared_prefix cannot weight" in caplog.text
    assert METRIC not in ours._metrics["train"]


@pytest.mark.parametrize("moe", [False, True], ids=["dense", "moe"])
def test_three_step_training_equals_stock(tmp_path, moe):
    runs = []
    for cls, sub in ((trl.GRPOTrainer, "stock"), (SharedPrefixGRPOTrainer, "ours")):
        t = trainer(cls, tmp_path / sub, moe=moe)
        t.train()
        params = torch.cat([p.detach().reshape(-1) for p in t.model.parameters()])
        losses = [h["loss"] for h in t.state.log_history if "loss" in h]
        runs.append((params, losses, t.state.log_history))
    (p_s, l_s, _), (p_o, l_o, hist) = runs
    assert len(l_s) == len(l_o) == 3
    assert ((p_o - p_s).norm() / p_s.norm()).item() <= 1e-5
    for a, b in zip(l_o, l_s):
        assert abs(a - b) <= 1e-5 * max(1.0, abs(b))
    saved = [h[METRIC] for h in hist if METRIC in h]
    assert saved and all(s > 0 for s in saved)


def test_group_shuffle_keeps_groups_together(tmp_path):
    t = trainer(SharedPrefixGRPOTrainer, tmp_path, shared_prefix_group_shuffle=True)
    assert t.shared_prefix_group_shuffle
    from shared_prefix.trl import _group_shuffle

    prompt_ids = torch.tensor([[1, 2]] * 3 + [[3, 4]] * 2 + [[5, 6]] * 4)
    out = _group_shuffle({"prompt_ids": prompt_ids, "tag": list(range(9)), "scalar": torch.tensor(1.0)})
    firsts = out["prompt_ids"][:, 0].tolist()
    runs = [firsts[0]] + [b for a, b in zip(firsts, firsts[1:]) if a != b]
    assert sorted(runs) == [1, 3, 5]  # each group is one contiguous run
    assert sorted(out["tag"]) == list(range(9)) and out["scalar"].item() == 1.0
    t.train()  # a short run with the option on
    assert any(METRIC in h for h in t.state.log_history)


def test_row_without_prompt_tokens_falls_back_to_stock(tmp_path, caplog):
    """An empty prompt (a tokenizer that adds no BOS): the micro-batch has no prefix to share for that row, so the
    stock method computes it (the planner refuses such rows) and training goes on."""
    stock = trainer(trl.GRPOTrainer, tmp_path / "a")
    ours = trainer(SharedPrefixGRPOTrainer, tmp_path / "b")
    ids, mask, lc = batch()
    mask[5, : ids.shape[1] - lc] = 0  # row 5 (a 1-token completion): no prompt token left
    ids[5, : ids.shape[1] - lc] = 0
    with torch.no_grad(), caplog.at_level(logging.WARNING, logger="shared_prefix"):
        lp_s = stock._get_per_token_logps_and_entropies(stock.model, ids, mask, lc)[0]
        lp_o = ours._get_per_token_logps_and_entropies(ours.model, ids, mask, lc, batch_size=4)[0]
    assert "a row without prompt tokens" in caplog.text
    assert (lp_o - lp_s).abs().max().item() <= 1e-6


def test_patch_trainer_and_fallback(tmp_path, caplog):
    t = patch_trainer(trainer(trl.GRPOTrainer, tmp_path))
    assert isinstance(t, trl.GRPOTrainer) and hasattr(t, "_shared_prefix_setup")
    ids, mask, lc = batch()
    ours = t._get_per_token_logps_and_entropies(t.model, ids, mask, lc)[0]
    t.model.config.final_logit_softcapping = 30.0  # something we do not support: the stock method runs instead
    with caplog.at_level(logging.WARNING, logger="shared_prefix"):
        stock_path = t._get_per_token_logps_and_entropies(t.model, ids, mask, lc)[0]
        t._get_per_token_logps_and_entropies(t.model, ids, mask, lc)
    assert caplog.text.count("final_logit_softcapping=30.0") == 1  # logged once
    # TRL's head read the (unset) softcap at construction, so the stock numbers equal ours here.
    assert (stock_path - ours).abs().max().item() <= 1e-6
    cls = patch_trainer(trl.GRPOTrainer)
    assert issubclass(cls, trl.GRPOTrainer) and cls.__name__ == "SharedPrefixGRPOTrainer"


# The engines as TRL's users launch them, on 2 CPU ranks: each plain and with LoRA and gradient checkpointing; RLOO
# under ZeRO-3 and FSDP1; a tied head (as Qwen2.5-0.5B's) under ZeRO-3 and FSDP2. What each leaves of the weights.
VARIANT = ("--lora", "--ckpt")
DIST_CASES = [(trainer_, engine, extra, tied) for engine in ("ddp", "zero2", "zero3", "fsdp1", "fsdp2")
              for trainer_, extra, tied in (("grpo", (), False), ("grpo", VARIANT, False))]
DIST_CASES += [("rloo", "zero3", (), False), ("rloo", "fsdp1", (), False), ("grpo", "zero3", (), True),
               ("grpo", "fsdp2", (), True)]
SHARDING = {"ddp": "whole", "zero2": "whole", "zero3": "zero3", "fsdp1": "fsdp1", "fsdp2": "fsdp2"}


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """The tiny model saved with an untied and with a tied head."""
    root = tmp_path_factory.mktemp("checkpoints")
    model().save_pretrained(root / "untied")
    tied = model()
    tied.config.tie_word_embeddings = True
    torch.manual_seed(0)
    Qwen2ForCausalLM(tied.config).save_pretrained(root / "tied")
    return root


@pytest.mark.parametrize("trainer_name,engine,extra,tied", DIST_CASES,
                         ids=[f"{t}-{e}{'-lora-ckpt' if x else ''}{'-tied' if tied else ''}" for t, e, x, tied in DIST_CASES])
def test_two_rank_training_under_each_engine_equals_stock(tmp_path, checkpoints, trainer_name, engine, extra, tied):
    """2 optimizer steps on 2 CPU ranks (gloo), every group spanning both ranks, the engine built by accelerate from
    the trainer config (DDP; DeepSpeed ZeRO-2/ZeRO-3 through ``deepspeed=``; FSDP1/FSDP2 through ``fsdp=``): ours
    packs (tokens saved, no fallback) and trains exactly like the stock trainer, with the weights as the engine
    keeps them (ZeRO-3 partitioned, FSDP1 flat, FSDP2 DTensors)."""
    from helpers import torchrun

    worker = Path(__file__).with_name("trl_dist_worker.py")
    path = checkpoints / ("tied" if tied else "untied")
    results = {}
    for mode in ("stock", "ours"):
        out = tmp_path / f"{mode}.pt"
        torchrun(worker, trainer_name, mode, path, out, "--engine", engine, *extra)
        results[mode] = torch.load(out)
    stock, ours = results["stock"], results["ours"]
    assert stock["world"] == ours["world"] == 2
    assert stock["sharding"] == ours["sharding"] == SHARDING[engine]
    assert ((ours["params"] - stock["params"]).norm() / stock["params"].norm()).item() <= 1e-5
    assert len(ours["losses"]) == len(stock["losses"]) == 2
    for a, b in zip(ours["losses"], stock["losses"]):
        assert abs(a - b) <= 1e-5 * max(1.0, abs(b))
    assert ours["saved"] and all(s > 0 for s in ours["saved"]) and not ours["fallbacks"]


@pytest.mark.parametrize("head_unit", ["root", "own"])
def test_logps_and_grads_equal_stock_under_fsdp2(tmp_path, head_unit):
    """FSDP2 with reshard_after_forward (one CPU rank): after the forward the head is sharded again, in the root's
    unit or its own. Ours unshards that unit (not a rank-local gather) and equals TRL's stock path, values and
    gradients."""
    from helpers import fully_shard_causal_lm

    ids, mask, lc = batch()
    results = []
    for cls, sub in ((trl.GRPOTrainer, "a"), (SharedPrefixGRPOTrainer, "b")):
        t = trainer(cls, tmp_path / sub)
        m = t.model
        fully_shard_causal_lm(m, head_unit=head_unit == "own")
        m.train()
        m.zero_grad(set_to_none=True)
        logps, ent, _ = t._get_per_token_logps_and_entropies(m, ids, mask, lc, compute_entropy=True)
        w = torch.randn(logps.shape, generator=torch.Generator().manual_seed(2))
        ((logps * w).sum() + (ent * w).sum()).backward()
        results.append((logps.detach(), ent.detach(), {n: p.grad.full_tensor() for n, p in m.named_parameters()}))
        if cls is SharedPrefixGRPOTrainer:
            assert t._metrics["train"][METRIC][-1] > 0  # ours ran
            assert not t.shared_prefix_fallbacks.said
    (lp_s, ent_s, g_s), (lp_o, ent_o, g_o) = results
    assert (lp_o - lp_s).abs().max().item() <= 1e-6
    assert (ent_o - ent_s).abs().max().item() <= 1e-6
    for n in g_s:
        assert ((g_o[n] - g_s[n]).norm() / g_s[n].norm().clamp_min(1e-12)).item() <= 1e-5, n


@pytest.mark.parametrize("head_unit", ["root", "own"])
def test_logps_and_grads_equal_stock_under_fsdp1_flat_parameters(tmp_path, head_unit):
    """FSDP1 with flat parameters (``use_orig_params=False``, verl's default; one CPU rank), the head in the root's
    unit or in one of its own (as a size-based wrap policy gives a large head): the head computes ours inside its
    unit's forward, values and gradients (of the flat parameters) equal TRL's stock path."""
    import functools

    from helpers import ensure_gloo
    from torch.distributed.fsdp import FullyShardedDataParallel
    from torch.distributed.fsdp.wrap import lambda_auto_wrap_policy

    ensure_gloo()
    ids, mask, lc = batch()
    results = []
    for cls, sub in ((trl.GRPOTrainer, "a"), (SharedPrefixGRPOTrainer, "b")):
        t = trainer(cls, tmp_path / sub)
        head = t.model.lm_head
        policy = functools.partial(lambda_auto_wrap_policy, lambda_fn=lambda m: head_unit == "own" and m is head)
        m = FullyShardedDataParallel(t.model, device_id=torch.device("cpu"), use_orig_params=False,
                                     auto_wrap_policy=policy)
        assert isinstance(t.model.lm_head, FullyShardedDataParallel) == (head_unit == "own")
        m.train()
        logps, ent, _ = t._get_per_token_logps_and_entropies(m, ids, mask, lc, compute_entropy=True)
        w = torch.randn(logps.shape, generator=torch.Generator().manual_seed(2))
        ((logps * w).sum() + (ent * w).sum()).backward()
        grads = {n: p.grad.clone() for n, p in m.named_parameters()}  # the flat parameter(s), same layout in both
        results.append((logps.detach(), ent.detach(), grads))
        if cls is SharedPrefixGRPOTrainer:
            assert t._metrics["train"][METRIC][-1] > 0 and not t.shared_prefix_fallbacks.said  # ours ran
    (lp_s, ent_s, g_s), (lp_o, ent_o, g_o) = results
    assert (lp_o - lp_s).abs().max().item() <= 1e-6 and (ent_o - ent_s).abs().max().item() <= 1e-6
    assert g_s and all(((g_o[n] - g_s[n]).norm() / g_s[n].norm()).item() <= 1e-5 for n in g_s)


@pytest.mark.parametrize("sizes", [dict(sp_size=2, sp_backend="deepspeed"), dict(cp_size=2)], ids=["sp", "cp"])
@pytest.mark.parametrize("kind", ["GRPOConfig", "RLOOConfig"])
def test_trl_refuses_sequence_parallelism_before_our_trainers_run(tmp_path, kind, sizes):
    """TRL 1.16's GRPO and RLOO configs refuse accelerate's sequence and context parallelism
    (``ParallelismConfig(sp_size|cp_size > 1)``): they build the model inputs after generation, which accelerate's
    input sharding cannot split. Our trainers take TRL's configs, so no TRL run has a sequence-parallel forward for
    the plan to go through (the README says so); this fails when a TRL release starts to allow one."""
    import trl
    from accelerate import ParallelismConfig

    with pytest.raises(ValueError, match="does not support sequence-dim parallelism"):
        config(tmp_path, getattr(trl, kind), parallelism_config=ParallelismConfig(**sizes))


def test_torch_compile_trains_with_sharing_equal_to_stock(tmp_path):
    """TRL's ``torch_compile=True`` (its default backend, inductor) compiles the model each trainer runs: ours
    shares prefixes on every batch with shared-prefix attention inside the compiled graphs, breaks them only where
    the stock trainer breaks too (TRL's own chunked log-prob head), and trains as it does."""
    from torch._dynamo.utils import counters

    runs = []
    for cls, sub in ((trl.GRPOTrainer, "stock"), (SharedPrefixGRPOTrainer, "ours")):
        torch._dynamo.reset()
        counters.clear()
        path = tmp_path / sub / "model"
        model().save_pretrained(path)
        t = cls(model=str(path), reward_funcs=reward_len, args=config(tmp_path / sub, torch_compile=True),
                train_dataset=dataset(), processing_class=tokenizer())
        t.train()
        assert counters["stats"]["unique_graphs"] >= 1  # the compiled model ran
        runs.append((torch.cat([p.detach().reshape(-1) for p in t.model.parameters()]),
                     [h["loss"] for h in t.state.log_history if "loss" in h], t.state.log_history,
                     dict(counters["graph_break"])))
    (p_s, l_s, _, breaks_s), (p_o, l_o, hist, breaks_o) = runs
    # Every break is one the stock trainer has too (TRL's head; ours traces it under more grad modes).
    first_lines = [{why.splitlines()[0] for why in breaks} for breaks in (breaks_o, breaks_s)]
    assert first_lines[0] <= first_lines[1], first_lines
    assert ((p_o - p_s).norm() / p_s.norm()).item() <= 1e-5
    assert len(l_o) == len(l_s) == 3 and all(abs(a - b) <= 1e-5 * max(1.0, abs(b)) for a, b in zip(l_o, l_s))
    saved = [h[METRIC] for h in hist if METRIC in h]
    assert len(saved) == 3 and all(s > 0 for s in saved)
