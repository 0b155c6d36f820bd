"""Where a step's GPU time goes: torch.profiler on one warm step of `shared_prefix`, of `shared_prefix_split` (the
prefixes' and completions' causal attention forced apart, DESIGN's three calls) and of `packed_causal`.

Usage (GPU machine): python3 scripts/gpu_profile.py OUT_DIR [PxSxGxB ...]. Appends to OUT_DIR/profiles.txt (one
file, since a device call returns few files): per config and variant, first the host-vs-wall timing of 5 steps
without the profiler (host = until backward() returns, before the final sync), then the top kernels of one profiled
step. Host time can equal wall time (backward ends waiting for the GPU), so what tells a host-bound step is the
profile's "Self CUDA time total" (the kernels' sum) against wall.
"""

import statistics
import sys
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

import shared_prefix as sp
from shared_prefix._kernels import self_calls
from shared_prefix.bench.measure import synchronize
from shared_prefix.bench.baselines import packed_causal_logprobs
from shared_prefix.bench.cli import parse_config
from shared_prefix.bench.variants import build_model, make_batch


def main() -> None:
    out = Path(sys.argv[1])
    out.mkdir(parents=True, exist_ok=True)
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")  # cpu: only to check the script runs
    model = build_model("qwen2.5-0.5b", torch.bfloat16, dev, grad_ckpt=True)
    for config in sys.argv[2:] or ["4096x512x8x1"]:
        profile_config(model, config, out)


def profile_config(model, config: str, out: Path) -> None:
    p, s, g, b = parse_config(config)
    pid, pmask, cid, cmask = make_batch(p, s, g, b, model.config.vocab_size, model.device)
    ours = lambda: sp.completion_logprobs(model, pid, pmask, cid, cmask, group_sizes=g)  # noqa: E731
    variants = {"shared_prefix": ours, "shared_prefix_split": ours,
                "packed_causal": lambda: packed_causal_logprobs(model, pid, cid, g)}
    for name, fn in variants.items():
        def step():
            model.zero_grad(set_to_none=True)
            with self_calls("split" if name == "shared_prefix_split" else "auto"):
                fn().sum().backward()

        for _ in range(2):
            step()
        synchronize(model.device)
        host, wall = [], []
        for _ in range(5):
            t0 = time.perf_counter()
            step()
            host.append(time.perf_counter() - t0)
            synchronize(model.device)
            wall.append(time.perf_counter() - t0)
        timing = (f"{config} {name}: host {statistics.median(host) * 1e3:.1f} ms, "
                  f"wall {statistics.median(wall) * 1e3:.1f} ms (median of 5, no profiler)")
        cuda = model.device.type == "cuda"
        with profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])) as prof:
            step()
            synchronize(model.device)
        sort = "cuda_time_total" if cuda else "cpu_time_total"
        table = prof.key_averages().table(sort_by=sort, row_limit=30, max_name_column_width=70)
        with open(out / "profiles.txt", "a") as f:
            f.write(f"## {timing}\n{table}\n\n")
        print(timing)
        print("\n".join(table.splitlines()[:14]))
    model.zero_grad(set_to_none=True)
    if cuda:
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
