"""Main job: ``python -m shared_prefix.demo``.

Builds a small Qwen2-shaped model locally (random weights, no downloads), makes prompts with G completions each, and
runs one GRPO-style log-prob forward+backward the stock way (every row ``[prompt, completion]``, TRL-style) and the
shared-prefix way. Prints tokens processed, agreement of log-probs and gradients, time, peak memory and speedup.
"""

from __future__ import annotations

import argparse
import os

import torch
from tqdm import tqdm

import shared_prefix as sp
from shared_prefix.bench.measure import UNTIMED_STEPS, measure_methods
from shared_prefix.hf import enable_checkpointing
from shared_prefix.bench.baselines import stock_logprobs


def build_model(hidden: int, layers: int, vocab: int, dtype: torch.dtype, device: torch.device):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    cfg = Qwen2Config(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=hidden * 11 // 4,
        num_hidden_layers=layers,
        num_attention_heads=max(1, hidden // 64),
        num_key_value_heads=max(1, hidden // 128),
        max_position_embeddings=32768,
        tie_word_embeddings=True,
    )
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(0)
    return Qwen2ForCausalLM(cfg).to(device=device, dtype=dtype)


def make_groups(n_prompts: int, group: int, prompt_len: int, completion_len: int, vocab: int, device, seed=0):
    """Left-padded prompts (ragged lengths), right-padded ragged completions, G rows per prompt, rows shuffled."""
    g = torch.Generator().manual_seed(seed)
    b = n_prompts * group
    p_lens = torch.randint(prompt_len * 3 // 4, prompt_len + 1, (n_prompts,), generator=g)
    c_lens = torch.randint(max(1, completion_len // 2), completion_len + 1, (b,), generator=g)
    prompts = torch.randint(1, vocab, (n_prompts, prompt_len), generator=g)
    order = torch.randperm(b, generator=g)
    rows = torch.arange(b) // group
    rows = rows[order]
    cols = torch.arange(prompt_len)
    prompt_mask = cols[None, :] >= (prompt_len - p_lens[rows])[:, None]
    prompt_ids = prompts[rows] * prompt_mask
    completion_mask = torch.arange(completion_len)[None, :] < c_lens[:, None]
    completion_ids = torch.randint(1, vocab, (b, completion_len), generator=g) * completion_mask
    to = dict(device=device)
    return prompt_ids.to(**to), prompt_mask.to(**to), completion_ids.to(**to), completion_mask.to(**to)


def run(args) -> list[dict]:
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    if device.type == "cpu":
        torch.set_num_threads(args.threads)
    model = build_model(args.hidden, args.layers, args.vocab, dtype, device)
    if args.grad_ckpt:
        enable_checkpointing(model)
        model.train()
    batch = make_groups(args.prompts, args.group, args.prompt_len, args.completion_len, args.vocab, device)
    pid, pmask, cid, cmask = batch
    advantages = torch.randn(pid.shape[0], generator=torch.Generator().manual_seed(1)).to(device)

    methods = {
        "stock (TRL-style rows)": lambda: stock_logprobs(model, pid, pmask, cid, cmask),
        "shared_prefix": lambda: sp.completion_logprobs(model, pid, pmask, cid, cmask),
    }
    plan = sp.plan(pid, pmask, cid, cmask)
    # What each forward processes: the stock batch is padded rows [prompt, completion]; ours is the packed stream.
    tokens = {"stock (TRL-style rows)": pid.numel() + cid.numel(), "shared_prefix": plan.num_tokens}

    with tqdm(total=len(methods) * (args.steps + UNTIMED_STEPS), desc="demo", unit="step", leave=False) as bar:
        measured = measure_methods(model, methods, advantages, cmask, device, args.steps, bar, keep_going=False)
    results = [{"method": name, "tokens": tokens[name], **stats} for name, stats in measured.items()]
    return results


def format_table(results: list[dict]) -> str:
    base = results[0]["median_s"]
    head = f"{'method':<24}{'tokens':>9}{'max|Δlogp|':>12}{'grad rel':>10}{'time':>10}{'peak mem':>11}{'speedup':>9}"
    lines = [head, "-" * len(head)]
    for r in results:
        lines.append(
            f"{r['method']:<24}{r['tokens']:>9,}{r['max_abs_logp_diff']:>12.1e}{r['grad_rel_l2']:>10.1e}"
            f"{r['median_s']:>9.3f}s{r['peak_mem_bytes'] / 2**20:>7.0f} MiB{base / r['median_s']:>8.2f}×"
        )
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m shared_prefix.demo", description=__doc__.split("\n\n")[1])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32", choices=["float32", "float64", "bfloat16"])
    ap.add_argument("--prompts", type=int, default=2, help="distinct prompts (groups)")
    ap.add_argument("--group", type=int, default=8, help="completions per prompt (G)")
    ap.add_argument("--prompt-len", type=int, default=512)
    ap.add_argument("--completion-len", type=int, default=64)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--vocab", type=int, default=8192)
    ap.add_argument("--steps", type=int, default=3, help="timed steps per method (median reported)")
    ap.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1))
    ap.add_argument("--grad-ckpt", action="store_true")
    args = ap.parse_args(argv)
    print(
        f"shared_prefix demo: Qwen2-shaped model (hidden {args.hidden}, {args.layers} layers, vocab {args.vocab}, "
        f"random weights), {args.dtype} on {args.device}"
        + (f", {args.threads} threads" if args.device == "cpu" else "")
    )
    print(
        f"{args.prompts} prompts x G={args.group} completions; prompts up to {args.prompt_len} tokens, "
        f"completions up to {args.completion_len}; one log-prob forward+backward per step"
    )
    results = run(args)
    print(format_table(results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
