"""GRPO with TRL, stock vs shared-prefix, offline: `python examples/trl_grpo.py [--steps N]`.

Builds a small Qwen2-shaped model and a word-level tokenizer locally (no downloads), trains N steps with
`trl.GRPOTrainer` and N steps with `shared_prefix.trl.SharedPrefixGRPOTrainer` from the same checkpoint and seed, then
prints the step times, the fraction of tokens the shared-prefix forward saved, and the final parameter difference.
"""

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import datasets
import torch
import trl
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM, TrainerCallback

from shared_prefix.trl import METRIC, SharedPrefixGRPOTrainer

WORDS = ["<pad>", "<eos>"] + [f"w{i}" for i in range(500)]


class StepTimer(TrainerCallback):
    def __init__(self):
        self.times, self._t0 = [], 0.0

    def on_step_begin(self, args, state, control, **kwargs):
        self._t0 = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        self.times.append(time.perf_counter() - self._t0)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--prompt-words", type=int, default=256, help="prompt length in tokens")
    ap.add_argument("--group", type=int, default=8, help="completions per prompt (num_generations)")
    args = ap.parse_args()

    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>")
    g = torch.Generator().manual_seed(0)
    prompts = [" ".join(f"w{int(i)}" for i in torch.randint(2, 500, (args.prompt_words,), generator=g))
               for _ in range(8)]
    data = datasets.Dataset.from_dict({"prompt": prompts})

    def reward(completions, **kwargs):  # a toy reward: prefer completions that mention small word ids
        return [float(sum(int(w[1:]) < 50 for w in c.split() if w.startswith("w"))) for c in completions]

    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        cfg = Qwen2Config(vocab_size=len(WORDS), hidden_size=128, intermediate_size=352, num_hidden_layers=4,
                          num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
                          pad_token_id=0, eos_token_id=1, bos_token_id=1)
        torch.manual_seed(0)
        Qwen2ForCausalLM(cfg).save_pretrained(Path(tmp) / "model")
        for name, cls in (("stock GRPOTrainer", trl.GRPOTrainer), ("SharedPrefixGRPOTrainer", SharedPrefixGRPOTrainer)):
            conf = trl.GRPOConfig(output_dir=str(Path(tmp) / name.split()[0]), per_device_train_batch_size=args.group,
                                  num_generations=args.group, max_completion_length=32, max_steps=args.steps,
                                  learning_rate=1e-2, optim="sgd", bf16=False, use_cpu=True, report_to="none",
                                  logging_steps=1, seed=0, save_strategy="no", beta=0.0)
            timer = StepTimer()
            t = cls(model=str(Path(tmp) / "model"), reward_funcs=reward, args=conf, train_dataset=data,
                    processing_class=tokenizer, callbacks=[timer])
            t.train()
            params = torch.cat([p.detach().reshape(-1) for p in t.model.parameters()])
            saved = [h[METRIC] for h in t.state.log_history if METRIC in h]
            results[name] = (timer.times, params, saved)
            print(f"{name:26s} step times {[f'{x:.2f}' for x in timer.times]} s"
                  + (f", tokens saved {statistics.mean(saved):.0%}" if saved else ""))
    (_, p_stock, _), (_, p_ours, _) = results.values()
    print(f"final parameter difference (rel L2): {((p_ours - p_stock).norm() / p_stock.norm()).item():.2e}")
    print("(step time includes generation, which is unchanged; the log-prob forward/backward is what gets cheaper)")


if __name__ == "__main__":
    main()
