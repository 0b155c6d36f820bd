"""completion_logprobs against each row run alone through the stock model (fp64), over many more decoder families
than test_hf's five: dense, MoE (experts run eagerly: the grouped-matmul kernels take no fp64), absolute and
rotary positions, MLA, QK norms, biases, sliding windows shorter than every row, GPT-OSS's attention sinks. One forward and backward each, no checkpointing (test_hf covers that).
A family that this transformers lacks is skipped; `make test` runs this file over two transformers versions."""

from __future__ import annotations

import pytest
import torch
import transformers

import shared_prefix as sp
from helpers import VOCAB, assert_matches_stock

COMMON = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, head_dim=8, max_position_embeddings=256, attention_dropout=0.0, pad_token_id=0)
MOE = dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=24)
WINDOW = dict(sliding_window=3)  # shorter than every row: sliding layers use their own key runs
# config class -> its own arguments. Dropouts that act on hidden states (not attention) are zeroed: they are random
# in train mode in the stock model too, so no comparison would hold.
FAMILIES = {
    "ApertusConfig": {},
    "ArceeConfig": {},
    "BitNetConfig": {},
    "DeepseekV2Config": dict(q_lora_rank=None, kv_lora_rank=8, qk_rope_head_dim=4, qk_nope_head_dim=4, v_head_dim=8,
                             n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=24,
                             first_k_dense_replace=1),
    "Dots1Config": dict(n_routed_experts=4, n_shared_experts=1, num_experts_per_tok=2, moe_intermediate_size=24,
                        first_k_dense_replace=1),
    "Ernie4_5Config": {},
    "Exaone4Config": WINDOW,
    "GPT2Config": dict(n_embd=32, n_layer=2, n_head=4, n_positions=256, resid_pdrop=0.0, embd_pdrop=0.0,
                       attn_pdrop=0.0),
    "GPTNeoXConfig": dict(hidden_dropout=0.0),
    "Gemma3TextConfig": dict(WINDOW, query_pre_attn_scalar=8),
    "GlmConfig": {},
    "Glm4Config": {},
    "GptOssConfig": dict(WINDOW, num_local_experts=4, num_experts_per_tok=2),  # sinks; eager-only in transformers
    "GraniteConfig": {},
    "HeliumConfig": {},
    "HunYuanDenseV1Config": {},
    "JetMoeConfig": {},
    "Ministral3Config": {},
    "MixtralConfig": dict(num_local_experts=4, num_experts_per_tok=2),
    "Olmo2Config": {},
    "Olmo3Config": WINDOW,
    "OlmoeConfig": dict(num_experts=4, num_experts_per_tok=2),
    "PhiConfig": dict(resid_pdrop=0.0, embd_pdrop=0.0),
    "Phi3Config": {},
    "Qwen2MoeConfig": dict(MOE, shared_expert_intermediate_size=24),
    "Qwen3MoeConfig": MOE,
    "SeedOssConfig": dict(residual_dropout=0.0),
    "SmolLM3Config": {},
    "Starcoder2Config": dict(residual_dropout=0.0, embedding_dropout=0.0),
}


def build(cls_name: str, extra: dict, attn: str = "sdpa"):
    cfg_cls = getattr(transformers, cls_name, None)
    if cfg_cls is None:
        pytest.skip(f"transformers {transformers.__version__} has no {cls_name}")
    cfg = cfg_cls(**{**COMMON, **extra})
    cfg._attn_implementation = attn
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(cfg, experts_implementation="eager").double()
    return model.train()  # the trainer's mode: every dropout left is 0


# Families transformers runs on eager attention only (no sdpa): the stock reference is eager, in fp64 here.
EAGER = {"GptOssConfig"}


@pytest.mark.parametrize("cls_name", sorted(FAMILIES))
def test_family_matches_stock(cls_name):
    model = build(cls_name, FAMILIES[cls_name], attn="eager" if cls_name in EAGER else "sdpa")
    # fp64 rounding of two summation orders; MoE routers and deep norms amplify it to ~1e-9 at most (a wrong mask
    # or position is off by 1e-2 or more).
    assert_matches_stock(model, logp_tol=1e-8)


@pytest.mark.parametrize("cls_name", sorted(FAMILIES))
def test_family_matches_stock_over_a_prefix_tree(cls_name):
    """A batch sharing a system prompt and branching completions, planned as a tree of several levels."""
    from helpers import as_batch, tree_rows

    model = build(cls_name, FAMILIES[cls_name], attn="eager" if cls_name in EAGER else "sdpa")
    rows = tree_rows(5, 3, vocab=COMMON["vocab_size"])
    batch = (rows, *as_batch(rows))
    assert sp.plan(*batch[1:], max_depth=3, min_node_tokens=1).levels > 2
    assert_matches_stock(model, logp_tol=1e-8, batch=batch, max_depth=3, min_node_tokens=1)


def _longrope(limit: int):
    # Phi-3's long-context RoPE: short factors up to `limit` (original_max_position_embeddings) tokens per forward,
    # long ones beyond; head_dim 8 has 4 frequencies.
    rope = dict(rope_type="longrope", rope_theta=1e4, short_factor=[1.0, 1.5, 2.0, 2.5],
                long_factor=[3.0, 4.0, 5.0, 6.0], original_max_position_embeddings=limit)
    return build("Phi3Config", dict(rope_parameters=rope, original_max_position_embeddings=limit))


@pytest.mark.parametrize("limit", [4, 32])
def test_longrope_with_every_row_on_one_side(limit):
    """test_hf's batch has rows of 6 to 23 tokens: all above 4 (long factors) or all within 32 (short factors),
    as each row alone picks them."""
    assert_matches_stock(_longrope(limit), logp_tol=1e-8)


def test_longrope_refuses_rows_on_both_sides():
    """With original_max_position_embeddings=16 the stock rows of 6-23 tokens pick different factors, one packed
    forward only one set: refused, so TRL and verl fall back to their stock method. Against a stock forward of a
    given length (TRL's padded width), only a length on the other side of the limit from the longest row is."""
    from helpers import make_batch

    model = _longrope(16)
    _, pid, pmask, cid, cmask = make_batch()
    with pytest.raises(sp.hf.UnsupportedModelError, match="longrope .* 6-23 tokens .*=16"):
        sp.completion_logprobs(model, pid, pmask, cid, cmask)
    p = sp.plan(pid, pmask, cid, cmask)
    assert (p.min_seqlen, p.max_seqlen) == (6, 23)
    assert sp.hf.unsupported_for(model, p, stock_seq_len=30) is None  # long factors, as the longest row
    assert "longrope" in sp.hf.unsupported_for(model, p, stock_seq_len=12)
    assert "longrope" in sp.hf.unsupported_for(_longrope(24), p, stock_seq_len=30)  # rows short, stock long
    assert sp.hf.unsupported_for(_longrope(24), p, stock_seq_len=23) is None


def test_dynamic_rope_within_and_beyond_max_positions():
    """Dynamic NTK scaling leaves the frequencies alone within max_position_embeddings (exact there) and rescales
    them by the forward's length beyond it (refused)."""
    from helpers import make_batch

    rope = dict(rope_type="dynamic", rope_theta=1e4, factor=2.0)
    assert_matches_stock(build("Qwen2Config", dict(rope_parameters=rope)), logp_tol=1e-8)
    model = build("Qwen2Config", dict(rope_parameters=rope, max_position_embeddings=20))
    _, pid, pmask, cid, cmask = make_batch()
    with pytest.raises(sp.hf.UnsupportedModelError, match="dynamic RoPE .*=20 \\(23 tokens"):
        sp.completion_logprobs(model, pid, pmask, cid, cmask)
