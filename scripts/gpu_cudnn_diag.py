"""Diagnose cuDNN-kernel gradients at a given config: ours with kernels="cudnn" vs "flash", and PyTorch's own
SDPA cuDNN backend vs its flash backend on the shapes of our three calls. Usage: python3 scripts/gpu_cudnn_diag.py

``python3 scripts/gpu_cudnn_diag.py layouts OUT.jsonl``: the ATen cuDNN op on our calls' shapes with three operand
layouts, each in its own process — all contiguous [B, H, L, D] (what our cuDNN path does now, copies included in
the time), all strided views of [B, L, H, D] storage (q/k/v/out/dout alike: no copies, the layout HF's SDPA hands
cuDNN), and strided q/k/v with contiguous out/dout (the mix that gave wrong gradients) — gradient error against
fp32 math attention and time; then whether calls 1 and 2 can be one top-left-causal call.
"""

import sys

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

import shared_prefix as sp
from shared_prefix.bench.variants import make_batch

dev = torch.device("cuda")


def rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def ours(p, s, g, b, h=14, hkv=2, d=64):
    pid, pmask, cid, cmask = make_batch(p, s, g, b, 1000, dev)
    plan = sp.plan(pid, pmask, cid, cmask, group_sizes=g)
    torch.manual_seed(0)
    t = plan.num_tokens
    q = torch.randn(t, h, d, device=dev, dtype=torch.bfloat16)
    k = torch.randn(t, hkv, d, device=dev, dtype=torch.bfloat16)
    v = torch.randn(t, hkv, d, device=dev, dtype=torch.bfloat16)
    do = torch.randn(t, h, d, device=dev, dtype=torch.bfloat16)
    res = {}
    for name in ("flash", "cudnn", "math32"):
        qq, kk, vv = (x.detach().clone().requires_grad_() for x in (q, k, v))
        if name == "math32":
            qq, kk, vv = (x.detach().float().requires_grad_() for x in (q, k, v))
        o = sp.attention(qq, kk, vv, plan, kernels="math" if name == "math32" else name)
        o.backward(do.to(o.dtype))
        res[name] = (o.detach(), qq.grad, kk.grad, vv.grad)
    npf = plan.prefix_tokens
    for name in ("flash", "cudnn"):
        o, dq, dk, dv = res[name]
        ro, rdq, rdk, rdv = res["math32"]
        print(f"ours {p}x{s}x{g}x{b} {name:6s} out {rel(o, ro):.2e} dq {rel(dq, rdq):.2e} "
              f"dk_prefix {rel(dk[:npf], rdk[:npf]):.2e} dk_comp {rel(dk[npf:], rdk[npf:]):.2e} "
              f"dv_prefix {rel(dv[:npf], rdv[:npf]):.2e} dv_comp {rel(dv[npf:], rdv[npf:]):.2e}")


def torch_sdpa(bq, lq, lk, causal, h=14, hkv=2, d=64):
    torch.manual_seed(1)
    q = torch.randn(bq, lq, h, d, device=dev, dtype=torch.bfloat16).transpose(1, 2)
    k = torch.randn(bq, lk, hkv, d, device=dev, dtype=torch.bfloat16).transpose(1, 2)
    v = torch.randn(bq, lk, hkv, d, device=dev, dtype=torch.bfloat16).transpose(1, 2)
    do = torch.randn(bq, h, lq, d, device=dev, dtype=torch.bfloat16)
    out = {}
    for name, be in (("math", SDPBackend.MATH), ("flash", SDPBackend.FLASH_ATTENTION), ("cudnn", SDPBackend.CUDNN_ATTENTION)):
        qq, kk, vv = (x.detach().clone().requires_grad_() for x in (q, k, v))
        if name == "math":
            qq, kk, vv = (x.detach().float().requires_grad_() for x in (q, k, v))
        try:
            with sdpa_kernel([be]):
                o = torch.nn.functional.scaled_dot_product_attention(qq, kk, vv, is_causal=causal, enable_gqa=True)
            o.backward(do.to(o.dtype))
            out[name] = (qq.grad, kk.grad, vv.grad)
        except RuntimeError as e:
            print(f"torch sdpa {name} [{bq},{lq},{lk}] causal={causal}: {str(e).splitlines()[0][:120]}")
    for name in ("flash", "cudnn"):
        if name in out:
            g, r = out[name], out["math"]
            print(f"torch sdpa [{bq}x{lq}x{lk}] causal={causal} {name:6s} dq {rel(g[0], r[0]):.2e} "
                  f"dk {rel(g[1], r[1]):.2e} dv {rel(g[2], r[2]):.2e}")


def cuda_ms(fn, iters):
    """Mean milliseconds of ``fn`` on the GPU over ``iters`` calls, after 3 warm-up calls."""
    for _ in range(3):
        fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / iters


def layouts(bq, lq, lk, causal, modes=("contiguous", "strided", "mixed"), h=14, hkv=2, d=64, iters=20):
    """One call shape, each operand layout: rel error of dq/dk/dv vs fp32 math, and fwd+bwd time in ms."""
    aten = torch.ops.aten
    g = torch.Generator(device=dev).manual_seed(2)

    def bshd(L, heads):  # storage [B, L, H, D], seen as [B, H, L, D]
        return torch.randn(bq, L, heads, d, device=dev, dtype=torch.bfloat16, generator=g).transpose(1, 2)

    q, k, v, do = bshd(lq, h), bshd(lk, hkv), bshd(lk, hkv), bshd(lq, h)
    qf, kf, vf = (x.detach().float().requires_grad_() for x in (q, k, v))
    of = torch.nn.functional.scaled_dot_product_attention(qf, kf, vf, is_causal=causal, enable_gqa=True)
    of.backward(do.float())
    ref = (qf.grad, kf.grad, vf.grad)
    seed = torch.zeros(1, device=dev, dtype=torch.long)

    def run(mode):
        qq, kk, vv = (x.contiguous() for x in (q, k, v)) if mode == "contiguous" else (q, k, v)
        res = aten._scaled_dot_product_cudnn_attention(qq, kk, vv, None, True, 0.0, causal, False)
        out, lse = res[0], res[1]
        if mode == "contiguous":
            dout = do.contiguous()
        elif mode == "strided":  # out and dout as views of [B, L, H, D] storage, like q
            out, dout = out.transpose(1, 2).contiguous().transpose(1, 2), do
        else:  # "mixed"
            out, dout = out.contiguous(), do.contiguous()
        return aten._scaled_dot_product_cudnn_attention_backward(
            dout, qq, kk, vv, out, lse, seed, seed, None, None, None, lq, lk, 0.0, causal)

    rows = []
    for mode in modes:
        try:
            grads = run(mode)
            row = dict(shape=[bq, lq, lk], causal=causal, mode=mode, ms=cuda_ms(lambda: run(mode), iters),
                       dq=rel(grads[0], ref[0]), dk=rel(grads[1], ref[1]), dv=rel(grads[2], ref[2]),
                       out_stride=list(aten._scaled_dot_product_cudnn_attention(
                           q, k, v, None, True, 0.0, causal, False)[0].stride()))
        except RuntimeError as e:
            row = dict(shape=[bq, lq, lk], causal=causal, mode=mode, error=str(e).splitlines()[0][:200])
        print(row)
        rows.append(row)
    return rows


def fused_prefix_call(np_=8192, nc=4096, h=14, hkv=2, d=64, iters=20):
    """Could calls 1 and 2 be one cuDNN call? Queries = prompt + completion rows (np_ + nc), keys = the prompt
    (np_), is_causal: with a top-left aligned mask, prompt rows see keys up to themselves and completion rows see
    the whole prompt, which is exactly calls 1 and 2. Reports which alignment the op uses (error against math with
    each mask) and the time of the one call against the two separate calls (forward + backward each)."""
    aten = torch.ops.aten
    g = torch.Generator(device=dev).manual_seed(3)
    q = torch.randn(1, np_ + nc, h, d, device=dev, dtype=torch.bfloat16, generator=g).transpose(1, 2)
    k, v = (torch.randn(1, np_, hkv, d, device=dev, dtype=torch.bfloat16, generator=g).transpose(1, 2) for _ in "kv")
    rows = {}
    try:
        out = aten._scaled_dot_product_cudnn_attention(q, k, v, None, True, 0.0, True, False)[0]
    except RuntimeError as e:
        return [dict(test="fused_prefix_call", error=str(e).splitlines()[0][:200])]
    qf, kf, vf = q.float(), k.float().repeat_interleave(h // hkv, 1), v.float().repeat_interleave(h // hkv, 1)
    i = torch.arange(np_ + nc, device=dev)[:, None]
    j = torch.arange(np_, device=dev)[None]
    for name, allowed in (("top_left", j <= i), ("bottom_right", j <= i - nc)):
        ref = torch.nn.functional.scaled_dot_product_attention(qf, kf, vf, attn_mask=allowed)
        ok = allowed.any(-1)  # bottom-right leaves the first rows with no key at all
        rows[name] = rel(out[:, :, ok], ref[:, :, ok])
    seed = torch.zeros(1, device=dev, dtype=torch.long)
    do = torch.randn_like(q)

    def step(qq, kk, vv, causal, dout):
        o, lse = aten._scaled_dot_product_cudnn_attention(qq, kk, vv, None, True, 0.0, causal, False)[:2]
        aten._scaled_dot_product_cudnn_attention_backward(dout, qq, kk, vv, o, lse, seed, seed, None, None, None,
                                                          qq.shape[2], kk.shape[2], 0.0, causal)

    qp, qc = q[:, :, :np_], q[:, :, np_:]
    timings = {}
    for name, fn in (("one_call", lambda: step(q, k, v, True, do)),
                     ("two_calls", lambda: (step(qp, k, v, True, do[:, :, :np_]),
                                            step(qc, k, v, False, do[:, :, np_:])))):
        try:
            timings[name] = cuda_ms(fn, iters)
        except RuntimeError as e:
            timings[name] = "error: " + str(e).splitlines()[0][:200]
    row = dict(test="fused_prefix_call", shape=[np_ + nc, np_], rel_vs_top_left=rows["top_left"],
               rel_vs_bottom_right=rows["bottom_right"], ms=timings)
    print(row)
    return [row]


SHAPES = ((1, 8192, 8192, True), (1, 4096, 8192, False), (16, 256, 256, True),  # the calls at 8192x256x16x1
          (1, 4096, 4096, True), (1, 4096, 4096, False), (8, 512, 512, True))  # and at 4096x512x8x1

if __name__ == "__main__" and sys.argv[1:2] == ["layouts"]:
    # Each operand layout in its own process: ATen caches cuDNN graphs by q/k/v shapes and strides only, so modes
    # sharing q/k/v strides ("strided", "mixed") would otherwise reuse each other's graph.
    import subprocess

    open(sys.argv[2], "w").close()
    for part in ("contiguous", "strided", "mixed", "fused"):
        subprocess.run([sys.executable, __file__, "layouts-part", part, sys.argv[2]], timeout=60)
elif __name__ == "__main__" and sys.argv[1:2] == ["layouts-part"]:
    import json

    part, path = sys.argv[2], sys.argv[3]
    with open(path, "a") as f:
        shapes = [()] if part == "fused" else SHAPES
        for shape in shapes:
            rows = fused_prefix_call() if part == "fused" else layouts(*shape, modes=(part,))
            for row in rows:
                f.write(json.dumps(row) + "\n")
                f.flush()
elif __name__ == "__main__":
    ours(8192, 256, 16, 1)
    ours(4096, 512, 8, 1)
    torch_sdpa(16, 256, 256, True)   # call 3 at 8192x256x16x1
    torch_sdpa(1, 4096, 8192, False)  # call 2
    torch_sdpa(1, 8192, 8192, True)   # call 1
