"""Host cost of one attention forward+backward: ATen ops dispatched and microseconds, at tiny sizes where kernel
time is negligible and what remains is the host's work to issue the calls (what a host-bound GPU step feels), for
ours against one SDPA causal call over the same packed tokens. Any CPU machine can run it."""

from __future__ import annotations

import statistics
import time

import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile

import shared_prefix as sp
from shared_prefix.bench.measure import synchronize
from shared_prefix.bench.variants import make_batch

# Tiny lengths: the config's structure (G, B, system prompt, branches) at these prompt and completion lengths, every
# shared run a node of the prefix tree.
TINY_PROMPT, TINY_COMPLETION = 4, 2
REPEATS = 200


def _is_kernel(e) -> bool:
    # An attention kernel's ATen entry (CPU flash, FA2, cuDNN, memory-efficient), not SDPA's dispatching wrapper.
    return e.name.startswith("aten::_") and "attention" in e.name


def dispatched_ops(fn) -> tuple[int, int]:
    """ATen ops ``fn`` dispatches from outside ATen (ops they call internally not counted), autograd's included;
    views (narrow, transpose, reshape) count too: each is a dispatch the host pays for. And of those, the attention
    kernel calls (forward and backward; the outermost where one kernel's entry calls another's)."""
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    ops = kernels = 0
    for e in prof.events():
        parent = e.cpu_parent
        if e.name.startswith("aten::") and not (parent is not None and parent.name.startswith("aten::")):
            ops += 1
        if _is_kernel(e):
            while parent is not None and not _is_kernel(parent):
                parent = parent.cpu_parent
            kernels += parent is None
    return ops, kernels


def host_seconds(fns: dict, device: torch.device) -> dict:
    """Median wall time of each of ``fns`` (synchronized), after warm-up, their calls interleaved so that a slow
    stretch of the machine weighs on all of them alike."""
    for fn in fns.values():
        for _ in range(3):
            fn()
    synchronize(device)
    times = {name: [] for name in fns}
    for _ in range(REPEATS):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            synchronize(device)
            times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(t) for name, t in times.items()}


def host_cost(model, cfg, device: torch.device, system: int = 0, branches: int = 0) -> dict:
    """Ops, attention kernel calls and µs per attention forward+backward: ours on the config's structure at tiny
    lengths, and one SDPA causal call over as many tokens, with the model's heads, head dim and dtype."""
    _, _, g, b = cfg
    c = model.config
    hq, hkv = c.num_attention_heads, c.num_key_value_heads
    d = getattr(c, "head_dim", None) or c.hidden_size // hq
    dtype = next(model.parameters()).dtype
    p = TINY_PROMPT + (TINY_PROMPT if system else 0)
    batch = make_batch(p, TINY_COMPLETION, g, b, c.vocab_size, device, system=TINY_PROMPT if system else 0,
                       branches=branches)
    plan = sp.plan(*batch, group_sizes=g, min_node_tokens=1)
    t = plan.num_tokens
    gen = torch.Generator(device=device).manual_seed(0)
    q, k, v = (torch.randn(t, h, d, generator=gen, device=device, dtype=dtype, requires_grad=True)
               for h in (hq, hkv, hkv))
    dout = torch.randn(t, hq, d, generator=gen, device=device, dtype=dtype)

    def ours():
        torch.autograd.backward(sp.attention(q, k, v, plan), dout)

    qs, ks, vs = (x.detach().transpose(0, 1).unsqueeze(0).requires_grad_() for x in (q, k, v))
    dsdpa = dout.transpose(0, 1).unsqueeze(0)

    def sdpa():
        out = F.scaled_dot_product_attention(qs, ks, vs, is_causal=True, enable_gqa=hq != hkv)
        torch.autograd.backward(out, dsdpa)

    result = dict(tokens=t, levels=plan.levels)
    fns = {"ours": ours, "sdpa": sdpa}
    for name, fn in fns.items():
        result[f"{name}_ops"], result[f"{name}_kernels"] = dispatched_ops(fn)
    for name, seconds in host_seconds(fns, device).items():
        result[f"{name}_us"] = seconds * 1e6
    result["us_ratio"] = result["ours_us"] / result["sdpa_us"]
    return result
