"""Diagnose cuDNN-kernel gradients at a given config: ours with kernels="cudnn" vs "flash", and PyTorch's own
SDPA cuDNN backend vs its flash backend on the shapes of our three calls. Usage: python3 scripts/gpu_cudnn_diag.py
"""

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

import shared_prefix as sp
from shared_prefix.bench import make_batch

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


if __name__ == "__main__":
    ours(8192, 256, 16, 1)
    ours(4096, 512, 8, 1)
    torch_sdpa(16, 256, 256, True)   # call 3 at 8192x256x16x1
    torch_sdpa(1, 4096, 8192, False)  # call 2
    torch_sdpa(1, 8192, 8192, True)   # call 1
