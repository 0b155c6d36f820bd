"""The tiny TRL set-up shared by the TRL tests and their multi-rank worker: a word-level tokenizer, a 2-layer Qwen2
(or Qwen3-MoE), a prompt dataset, a length reward and the GRPO config every run starts from."""

from __future__ import annotations

import torch

WORDS = ["<pad>", "<eos>"] + [f"w{i}" for i in range(60)]


def tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>")


def model(moe=False):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    shape = dict(vocab_size=len(WORDS), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                 pad_token_id=0, eos_token_id=1, bos_token_id=1)
    torch.manual_seed(0)
    if moe:  # returns router logits for an auxiliary load-balancing loss (coefficient raised so that it shows)
        from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

        cfg = Qwen3MoeConfig(**shape, head_dim=8, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=24,
                             router_aux_loss_coef=0.5)
        return Qwen3MoeForCausalLM(cfg)
    return Qwen2ForCausalLM(Qwen2Config(**shape))


def dataset():
    import datasets

    prompts = ["w3 w4 w5", "w7 w8", "w9 w10 w11 w12 w13", "w2"]
    return datasets.Dataset.from_dict({"prompt": prompts * 4})


def reward_len(completions, **kwargs):
    return [float(len(c.split())) for c in completions]


def config(tmp_path, cls=None, **kw):
    """A GRPO (or ``cls``, e.g. RLOO) config: SGD at a large step so that training moves, on CPU."""
    import trl

    args = dict(output_dir=str(tmp_path), per_device_train_batch_size=8, num_generations=4, max_completion_length=6,
                max_steps=3, learning_rate=0.5, optim="sgd", bf16=False, report_to="none", logging_steps=1, seed=0,
                use_cpu=True, temperature=0.9, beta=0.1, num_iterations=2, save_strategy="no",
                dataloader_num_workers=0)
    args.update(kw)
    return (cls or trl.GRPOConfig)(**args)
