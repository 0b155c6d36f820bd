"""One attention forward+backward at the host-cost proxy's tiny lengths (bench/host.py: P = 4, S = 2, the config's
G and B; 4 query and 2 KV heads, head dim 64, fp32; THREADS intra-op threads, default 2) through the public API only (`sp.plan`,
`sp.attention`), so that any build of the package runs it: ours and one SDPA causal call over the same tokens,
their calls interleaved, median µs of 400 calls each. Prints one JSON line per config."""
import json
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F

import shared_prefix as sp
from shared_prefix.bench.variants import make_batch

THREADS = int(os.environ.get("THREADS", "2"))
torch.set_num_threads(THREADS)
CONFIGS = [((512, 64, 8, 1), 0, 0), ((1024, 128, 8, 2), 0, 0), ((1152, 64, 4, 8), 1, 0), ((256, 256, 8, 4), 0, 2)]

for (p, s, g, b), system, branches in CONFIGS:
    prompt = 4 + (4 if system else 0)
    batch = make_batch(prompt, 2, g, b, 1000, torch.device("cpu"), system=4 if system else 0, branches=branches)
    plan = sp.plan(*batch, group_sizes=g, min_node_tokens=1)
    t = plan.num_tokens
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(t, h, 64, generator=gen, requires_grad=True) for h in (4, 2, 2))
    dout = torch.randn(t, 4, 64, generator=gen)
    qs, ks, vs = (x.detach().transpose(0, 1).unsqueeze(0).requires_grad_() for x in (q, k, v))
    ds = dout.transpose(0, 1).unsqueeze(0)
    fns = {"ours": lambda: torch.autograd.backward(sp.attention(q, k, v, plan), dout),
           "sdpa": lambda: torch.autograd.backward(
               F.scaled_dot_product_attention(qs, ks, vs, is_causal=True, enable_gqa=True), ds)}
    for fn in fns.values():
        for _ in range(20):
            fn()
    times = {name: [] for name in fns}
    for _ in range(400):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    us = {name: statistics.median(x) * 1e6 for name, x in times.items()}
    print(json.dumps(dict(build=sys.argv[1], threads=THREADS, config=f"{p}x{s}x{g}x{b}", system=system, branches=branches,
                          tokens=t, levels=plan.levels, ours_us=us["ours"], sdpa_us=us["sdpa"],
                          ratio=us["ours"] / us["sdpa"])), flush=True)
