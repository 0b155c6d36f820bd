"""The kernel calls alone: the six CPU flash calls a one-level plan makes at the host-cost proxy's shapes for
512x64x8x1 (one prompt of 4 tokens, 8 completions of 2; 4 query and 2 KV heads, head dim 64, fp32), each run alone
on ready inputs, against SDPA's whole forward+backward over the same 20 tokens. Median µs of 400 calls each, the
two interleaved, 3 rounds."""
import statistics
import time

import torch
import torch.nn.functional as F

torch.set_num_threads(2)
fwd = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
bwd = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward


def median_us(fns, n=400):
    for fn in fns:
        for _ in range(20):
            fn()
    times = [[] for _ in fns]
    for _ in range(n):
        for fn, t in zip(fns, times):
            t0 = time.perf_counter()
            fn()
            t.append(time.perf_counter() - t0)
    return [statistics.median(t) * 1e6 for t in times]


calls = []
# (q [B, Hq, L], k/v [B, Hkv, L], causal): the prompt over itself, the completions over themselves, the
# completions over their prompt.
for qs, ks, causal in (((1, 4, 4), (1, 2, 4), True), ((8, 4, 2), (8, 2, 2), True), ((1, 4, 16), (1, 2, 4), False)):
    q, k, v = torch.randn(*qs, 64), torch.randn(*ks, 64), torch.randn(*ks, 64)
    out, lse = fwd(q, k, v, 0.0, causal, scale=0.125)[:2]
    dout = torch.randn_like(out)
    calls.append(lambda q=q, k=k, v=v, c=causal: fwd(q, k, v, 0.0, c, scale=0.125))
    calls.append(lambda q=q, k=k, v=v, c=causal, o=out, l=lse, d=dout: bwd(d, q, k, v, o, l, 0.0, c, scale=0.125))


def six_calls():
    for call in calls:
        call()


qs, ks, vs = (torch.randn(1, h, 20, 64, requires_grad=True) for h in (4, 2, 2))
ds = torch.randn(1, 4, 20, 64)


def sdpa():
    torch.autograd.backward(F.scaled_dot_product_attention(qs, ks, vs, is_causal=True, enable_gqa=True), ds)


for r in range(3):
    a, b = median_us([six_calls, sdpa])
    print(f"round {r + 1}: six kernel calls {a:.0f} µs, SDPA forward+backward {b:.0f} µs, ratio {a / b:.2f}")
