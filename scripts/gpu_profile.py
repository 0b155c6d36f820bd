"""Where a step's GPU time goes: torch.profiler on one warm step of `shared_prefix` and of `packed_causal`.

Usage (GPU machine): python3 scripts/gpu_profile.py OUT_DIR [PxSxGxB]. Writes profile_<variant>.txt (top kernels).
"""

import sys
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

import shared_prefix as sp
from shared_prefix.bench import build_model, make_batch, packed_causal_logprobs, parse_config


def main() -> None:
    out = Path(sys.argv[1])
    out.mkdir(parents=True, exist_ok=True)
    p, s, g, b = parse_config(sys.argv[2] if len(sys.argv) > 2 else "4096x512x8x1")
    dev = torch.device("cuda")
    model = build_model("qwen2.5-0.5b", torch.bfloat16, dev, grad_ckpt=True)
    pid, pmask, cid, cmask = make_batch(p, s, g, b, model.config.vocab_size, dev)
    variants = {
        "shared_prefix": lambda: sp.completion_logprobs(model, pid, pmask, cid, cmask, group_sizes=g),
        "packed_causal": lambda: packed_causal_logprobs(model, pid, cid, g),
    }
    for name, fn in variants.items():
        def step():
            model.zero_grad(set_to_none=True)
            fn().sum().backward()

        for _ in range(2):
            step()
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            step()
            torch.cuda.synchronize()
        table = prof.key_averages().table(sort_by="cuda_time_total", row_limit=30, max_name_column_width=70)
        (out / f"profile_{name}.txt").write_text(table)
        print(name)
        print("\n".join(table.splitlines()[:14]))


if __name__ == "__main__":
    main()
