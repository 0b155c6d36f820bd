"""completion_logprobs against each row run alone through the stock model (fp64), over many more decoder families
than test_hf's five: dense, MoE (experts run eagerly: the grouped-matmul kernels take no fp64), absolute and
rotary positions, MLA, QK norms, biases, sliding windows shorter than every row, GPT-OSS's attention sinks. One forward and backward each, no checkpointing (test_hf covers that).
A family that this transformers lacks is skipped; `make test` runs this file over two transformers versions."""

from __future__ import annotations

import pytest
import torch
import transformers

import shared_prefix as sp
from test_hf import VOCAB, assert_matches_stock

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
