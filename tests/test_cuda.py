"""GPU checks (marker ``cuda``; skipped without a GPU).

Low-precision results are judged against an fp64 CPU reference: ours must be about as close to it as the stock
per-row computation in the same dtype is (bf16 operands land between 1e-3 and 1e-2 relative error).
"""

from __future__ import annotations

import random

import pytest
import torch

import shared_prefix as sp
from helpers import (as_batch, build_case, case_leaves, causal_attention, features, head_leaves, make_batch,
                     pack_features, padded, reference, rel, stock_logprobs, tiny_model, tree_rows)
from shared_prefix._kernels import self_calls

# The references split the packed stream as [prompts | completions] (one-level plans); see test_tree.py for trees.
pytestmark = [pytest.mark.cuda, pytest.mark.usefixtures("prompts_only")]
DEV = torch.device("cuda")


def packed_on(plan, prompts, rows, lp, lc, left_prompt, left_completion, dtype):
    """Move the leaves to the GPU in ``dtype`` (new leaves) and pack q/k/v."""
    moved_p = [{n: (p[n].detach().to(DEV, dtype).requires_grad_() if n != "len" else p[n]) for n in p} for p in prompts]
    moved_r = [{n: (r[n].detach().to(DEV, dtype).requires_grad_() if n != "group" else r[n]) for n in r} for r in rows]
    packed = {}
    for name in ("q", "k", "v"):
        px, _ = padded([moved_p[r["group"]][name] for r in moved_r], lp, left_prompt)
        cx, _ = padded([r[name] for r in moved_r], lc, left_completion)
        packed[name] = plan.pack(px, cx)[0]
    return moved_p, moved_r, packed


def stock_low_precision(prompts, rows, scale, dtype, window=None):
    """Per-row attention in ``dtype`` on the GPU (SDPA), for the noise floor of that dtype."""
    outs = []
    for r in rows:
        p = prompts[r["group"]]
        q, k, v = (torch.cat([p[n], r[n]]).to(DEV, dtype).transpose(0, 1)[None] for n in ("q", "k", "v"))
        n = q.shape[2]
        i = torch.arange(n, device=DEV)
        keep = (i[None, :] <= i[:, None]) & ((i[None, :] > i[:, None] - window) if window else True)
        o = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=keep, scale=scale, enable_gqa=True)
        outs.append(o[0].transpose(0, 1)[p["len"] :].double().cpu())
    return outs


@pytest.mark.parametrize(
    "dtype,kernels",
    [(torch.bfloat16, None), (torch.float16, None), (torch.float32, None), (torch.bfloat16, "cudnn"),
     (torch.float16, "cudnn"), (torch.bfloat16, "flash"), (torch.float16, "flash"), (torch.bfloat16, "cudnn_views"),
     (torch.float16, "cudnn_views")],
)
@pytest.mark.parametrize("left", [True, False])
def test_attention_against_fp64(dtype, kernels, left):
    check_against_fp64(dtype, kernels, left)


@pytest.mark.parametrize("dtype,kernels", [(torch.bfloat16, None), (torch.float16, "flash"), (torch.float32, None)])
@pytest.mark.parametrize("window", [16, 100])
def test_sliding_window_against_fp64(dtype, kernels, window):
    """Sliding-window layers: flash-attention 2 with a left window over each completion's gathered key run (fp16/
    bf16), the explicit-math kernel's band mask (fp32); windows shorter than the completions and than the prompts."""
    check_against_fp64(dtype, kernels, True, window)


@pytest.mark.parametrize("mode,dtype,kernels", [("split", torch.bfloat16, "flash"), ("split", torch.float16, None),
                                               ("fused", torch.bfloat16, "cudnn_views"),
                                               ("fused", torch.float32, None)])
def test_self_call_modes_against_fp64(mode, dtype, kernels):
    """The executor path each kernel does not choose itself: DESIGN's three calls apart on flash-attention 2 (which
    by default serves the prefixes' and the completions' causal calls as one varlen call; the bench's
    ``shared_prefix_split``), and the fused path on the per-run kernels (cuDNN, the fp32 math kernel)."""
    with self_calls(mode):
        check_against_fp64(dtype, kernels, True)


@pytest.mark.parametrize(
    "groups",
    [
        [(1, [1, 0, 1]), (1, [1])],  # every segment ≤ 1 token, an empty completion (FA2's GQA decode path)
        [(5, [1, 1, 0]), (7, [0, 0])],  # 1-token completions, an empty one, a group with no completion tokens
        [(40, [0, 0]), (9, [0])],  # no completion tokens at all
    ],
)
@pytest.mark.parametrize("mode", ["auto", "split"])
def test_edge_segments_against_fp64(groups, mode):
    """Segment tables FA2 varlen sees rarely: one-token and empty segments, groups without completion tokens, a
    batch without any; GQA (2 KV heads, 8 query heads), on both executor paths."""
    with self_calls(mode):
        check_against_fp64(torch.bfloat16, "flash", True, groups=groups)


def test_sinks_against_fp32_math():
    """Attention sinks (GPT-OSS) on the default bf16 path: values and gradients (sinks' too) against the fp32
    explicit-math kernel on the GPU, which the CPU tests check against an fp64 per-row reference."""
    prompts, rows, prompt_ids, _ = build_case(5, [(200, [30, 0, 17]), (64, [8, 8])], 2, 4, 64, True, False, True)
    lp = max(p["len"] for p in prompts) + 1
    lc = max(r["q"].shape[0] for r in rows) + 1
    pid, pmask = padded(prompt_ids, lp, True)
    cid, cmask = padded([torch.arange(r["q"].shape[0]) + 7 for r in rows], lc, False)
    plan = sp.plan(pid.to(DEV), pmask.to(DEV), cid.to(DEV), cmask.to(DEV))
    _, _, packed = packed_on(plan, prompts, rows, lp, lc, True, False, torch.float32)
    sinks = torch.randn(8, generator=torch.Generator().manual_seed(3)).to(DEV)
    w = torch.randn(packed["q"].shape, generator=torch.Generator().manual_seed(4)).to(DEV)

    def run(dtype, kernels):
        # Both runs take the same (bf16-rounded) values, so only the kernels' own errors count.
        leaves_ = [packed[n].detach().to(torch.bfloat16).to(dtype).requires_grad_() for n in ("q", "k", "v")]
        s = sinks.clone().requires_grad_()
        out = sp.attention(*leaves_, plan, kernels=kernels, sinks=s)
        grads = torch.autograd.grad((out.float() * w).sum(), leaves_ + [s])
        return [out.float()] + [g.float() for g in grads]

    for got, want in zip(run(torch.bfloat16, None), run(torch.float32, "math")):
        assert rel(got, want) < 2e-2, rel(got, want)


@pytest.mark.parametrize("mode,kernels", [("auto", None), ("split", "flash"), ("fused", "cudnn_views")])
def test_prefix_tree_against_fp32_math(mode, kernels):
    """A plan of several levels (a shared system prompt, branching completions, GQA) on the fp16/bf16 kernels:
    values and gradients against the fp32 explicit-math kernel on the GPU (which the CPU tests check against each
    row alone in fp64), forward and backward without a host sync."""
    rows = tree_rows(11, 4, vocab=1000)
    pid, pmask, cid, cmask = (x.to(DEV) for x in as_batch(rows))
    plan = sp.plan(pid, pmask, cid, cmask, max_depth=4, min_node_tokens=1)
    assert plan.levels > 2
    _, per_row = features(rows, 8, 2, 64, 5)
    packed = {n: x.detach().float() for n, x in
              pack_features(plan, rows, per_row, pid.shape[1], cid.shape[1], device=DEV).items()}
    w = torch.randn(packed["q"].shape, generator=torch.Generator().manual_seed(4)).to(DEV)

    rounded = {n: x.to(torch.bfloat16).float() for n, x in packed.items()}
    got = outputs_and_grads(rounded, plan, torch.bfloat16, kernels, mode, w, sync_check=True)
    for a, b in zip(got, outputs_and_grads(rounded, plan, torch.float32, "math", mode, w)):
        assert rel(a, b) < 2e-2, rel(a, b)


def outputs_and_grads(packed, plan, dtype, kernels, mode, w, sync_check=False):
    """Attention over ``packed`` q/k/v cast to ``dtype`` and the gradients of ``(out * w).sum()``, in ``w``'s dtype;
    forward and backward under ``set_sync_debug_mode("error")`` with ``sync_check``."""
    leaves_ = [packed[n].to(dtype).requires_grad_() for n in ("q", "k", "v")]
    torch.cuda.synchronize()
    if sync_check:
        torch.cuda.set_sync_debug_mode("error")
    try:
        with self_calls(mode):
            out = sp.attention(*leaves_, plan, kernels=kernels)
            grads = torch.autograd.grad((out.to(w.dtype) * w).sum(), leaves_)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    return [out.to(w.dtype)] + [g.to(w.dtype) for g in grads]


FUZZ_CASES = 32


@pytest.mark.parametrize("case", range(FUZZ_CASES))
def test_fuzz_ragged_trees(case):
    """Random ragged batches (prefix trees of depth 1-4 with empty and one-token segments, identical rows, rows
    sharing nothing, either padding side), GQA ratios 1/2/7, every CUDA kernel choice on both executor paths,
    forward and backward under ``set_sync_debug_mode("error")``: against each row alone in fp64 (values, and the
    gradients carried back to every distinct prefix's q/k/v), and, tighter, against the explicit-math kernel on the
    same rounded inputs (fp32 for fp16/bf16, fp64 for fp32)."""
    rng = random.Random(case)
    depth, hkv, ratio = rng.randint(1, 4), rng.choice([1, 2]), rng.choice([1, 2, 7])
    kernels, mode = rng.choice([None, "flash", "cudnn_views", "cudnn"]), rng.choice(["fused", "split"])
    dtype = rng.choice([torch.bfloat16, torch.float16, torch.float32])
    left_prompt, left_completion = rng.random() < 0.5, rng.random() < 0.5
    rows = tree_rows(1000 + case, depth, n_rows=rng.randint(4, 12), vocab=1000)
    pid, pmask, cid, cmask = (x.to(DEV) for x in as_batch(rows, left_prompt, left_completion))
    plan = sp.plan(pid, pmask, cid, cmask, max_depth=depth, min_node_tokens=rng.choice([1, 3]))
    leaves, per_row = features(rows, hkv * ratio, hkv, 64, case)
    lp, lc = pid.shape[1], cid.shape[1]
    packed64 = pack_features(plan, rows, per_row, lp, lc, left_prompt, left_completion, DEV)  # from the leaves
    w = torch.randn(packed64["q"].shape, generator=torch.Generator().manual_seed(case), dtype=torch.float64).to(DEV)
    what = dict(depth=depth, hkv=hkv, ratio=ratio, kernels=kernels, mode=mode, dtype=dtype, levels=plan.levels)

    # Each row alone, fp64 on the CPU; every packed token's output is its rows' (identical where they share it).
    ref = [causal_attention(x["q"], x["k"], x["v"], 64**-0.5) for x in per_row]
    rp, _ = padded([r[: p.shape[0]] for r, (p, _) in zip(ref, rows)], lp, left_prompt)
    rc, _ = padded([r[p.shape[0]:] for r, (p, _) in zip(ref, rows)], lc, left_completion)
    ref_out = plan.pack(rp.to(DEV), rc.to(DEV))[0]
    leaf_list = list(leaves.values())
    ref_grads = torch.autograd.grad((ref_out * w).sum(), leaf_list, allow_unused=True)

    ref_dtype = torch.float64 if dtype == torch.float32 else torch.float32
    kernels = None if dtype == torch.float32 else kernels  # FA2 and cuDNN take fp16/bf16 only (fp32: math)
    rounded = {n: x.detach().to(dtype).to(ref_dtype) for n, x in packed64.items()}
    got = outputs_and_grads(rounded, plan, dtype, kernels, mode, w, sync_check=True)
    want = outputs_and_grads(rounded, plan, ref_dtype, "math", mode, w)
    tol = {torch.float32: 1e-5, torch.float16: 2e-2, torch.bfloat16: 2e-2}[dtype]
    for name, a, b in zip(("out", "dq", "dk", "dv"), got, want):
        assert torch.isfinite(a).all(), (name, what)
        assert rel(a, b) < tol, (name, rel(a, b), what)
    # Against each row alone (input rounding included): the output, and the gradients through the packing.
    alone = {torch.float32: 1e-5, torch.float16: 1e-2, torch.bfloat16: 4e-2}[dtype]
    assert rel(got[0], ref_out.detach()) < alone, ("out alone", rel(got[0], ref_out.detach()), what)
    ours = torch.autograd.grad([packed64[n] for n in ("q", "k", "v")], leaf_list, grad_outputs=got[1:],
                               allow_unused=True)
    mine = torch.cat([a.reshape(-1) for a, b in zip(ours, ref_grads) if b is not None])
    theirs = torch.cat([b.reshape(-1) for b in ref_grads if b is not None])
    assert rel(mine, theirs) < alone, ("grads alone", rel(mine, theirs), what)


def check_against_fp64(dtype, kernels, left, window=None, groups=None):
    groups = groups or [(300, [40, 7, 0, 64]), (33, [5]), (129, [16, 16, 16])]
    prompts, rows, prompt_ids, _ = build_case(7, groups, 2, 4, 64, left, not left, True)
    scale = 64**-0.5
    lp = max(p["len"] for p in prompts) + 1
    lc = max(r["q"].shape[0] for r in rows) + 1
    pid, pmask = padded(prompt_ids, lp, left)
    cid, cmask = padded([torch.arange(r["q"].shape[0]) + 7 for r in rows], lc, not left)
    plan = sp.plan(pid.to(DEV), pmask.to(DEV), cid.to(DEV), cmask.to(DEV), windows=[window] if window else None)
    gp, gr, packed = packed_on(plan, prompts, rows, lp, lc, left, not left, dtype)
    out = sp.attention(packed["q"], packed["k"], packed["v"], plan, scale=scale, kernels=kernels, window=window)
    assert out.dtype == dtype and out.is_cuda

    _, comp_ref = reference(prompts, rows, scale, window)
    ours = plan.unpack_completions(out[plan.prefix_tokens :]).double().cpu()
    got = torch.cat([ours[i][cmask[i]] for i in range(len(rows))])
    want = torch.cat(comp_ref)
    err = rel(got, want.detach())
    if not want.numel():
        pass  # no completion tokens: the prompts' outputs are checked through their gradients below
    elif dtype == torch.float32:
        assert err < 1e-5, err
    else:
        stock = torch.cat(stock_low_precision(prompts, rows, scale, dtype, window))
        floor = rel(stock, want.detach())
        assert err < 2e-2 and err <= 2 * floor + 1e-3, (err, floor)

    # Gradients of the same loss, against fp64 per-row autograd.
    w = torch.randn(out.shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    ours_g = torch.autograd.grad((out.double() * w.to(DEV)).sum(), case_leaves(gp, gr), allow_unused=True)
    first = {}
    for i, r in enumerate(rows):
        first.setdefault(r["group"], i)
    prompt_ref, _ = reference(prompts, rows, scale, window)
    w_pr = torch.split(w[: plan.prefix_tokens], [prompts[g]["len"] for g in first])
    w_c = plan.unpack_completions(w[plan.prefix_tokens :].to(DEV)).cpu()
    loss = sum((prompt_ref[g] * wp).sum() for g, wp in zip(first, w_pr))
    loss = loss + sum((c * w_c[i][cmask[i]]).sum() for i, c in enumerate(comp_ref))
    ref_g = torch.autograd.grad(loss, case_leaves(prompts, rows), allow_unused=True)
    tol = 1e-5 if dtype == torch.float32 else 5e-2
    for a, b in zip(ours_g, ref_g):
        if b is None or b.norm() == 0:
            continue
        assert rel(a.double().cpu(), b) < tol


@pytest.mark.parametrize("kernels,window,mode", [(None, None, "auto"), ("cudnn", None, "auto"),
                                                 ("cudnn_views", None, "auto"), ("flash", None, "auto"),
                                                 ("flash", None, "split"), (None, 32, "auto")])
def test_zero_syncs_in_attention_forward_backward(kernels, window, mode):
    prompts, rows, prompt_ids, _ = build_case(1, [(512, [64] * 8), (100, [3, 90])], 2, 4, 64, True, False, True)
    lp = max(p["len"] for p in prompts) + 1
    lc = max(r["q"].shape[0] for r in rows) + 1
    pid, pmask = padded(prompt_ids, lp, True)
    cid, cmask = padded([torch.arange(r["q"].shape[0]) + 7 for r in rows], lc, False)
    # The plan may sync (one D2H read); its window tables go up in its one H2D copy.
    plan = sp.plan(pid.to(DEV), pmask.to(DEV), cid.to(DEV), cmask.to(DEV), windows=[window] if window else None)
    _, _, packed = packed_on(plan, prompts, rows, lp, lc, True, False, torch.bfloat16)
    q, k, v = (packed[n].detach().requires_grad_() for n in ("q", "k", "v"))
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(2):
            with self_calls(mode):
                out = sp.attention(q, k, v, plan, kernels=kernels, window=window)
                out.float().square().sum().backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()
    assert torch.isfinite(q.grad).all() and torch.isfinite(k.grad).all()


def test_zero_syncs_in_model_layers():
    model = tiny_model("qwen2", dtype=torch.bfloat16).to(DEV)
    rows, pid, pmask, cid, cmask = make_batch()
    plan = sp.plan(pid.to(DEV), pmask.to(DEV), cid.to(DEV), cmask.to(DEV))
    sp.register()
    model.set_attn_implementation("shared_prefix")
    layer = model.model.layers[0]
    hidden = torch.randn(1, plan.num_tokens, 32, device=DEV, dtype=torch.bfloat16, requires_grad=True)
    pos = model.model.rotary_emb(hidden, plan.position_ids)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        out = layer(hidden, attention_mask=None, position_embeddings=pos, position_ids=plan.position_ids,
                    shared_prefix_plan=plan)
        out = out[0] if isinstance(out, tuple) else out
        out.float().square().sum().backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert torch.isfinite(hidden.grad).all()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("family,extra", [("qwen2", {}), ("mistral", {"sliding_window": 4})], ids=["full", "window"])
def test_completion_logprobs_on_gpu(dtype, family, extra):
    model64 = tiny_model(family, **extra)  # fp64 CPU reference
    rows, pid, pmask, cid, cmask = make_batch()
    ref, _ = stock_logprobs(model64, rows, cid.shape[1], 0.8)
    model = tiny_model(family, dtype=dtype, **extra).to(DEV)
    sp.hf.enable_checkpointing(model)
    model.train()
    lp = sp.completion_logprobs(model, pid.to(DEV), pmask.to(DEV), cid.to(DEV), cmask.to(DEV), temperature=0.8)
    assert lp.dtype == torch.float32
    lp.sum().backward()
    err = (lp.double().cpu() - ref.detach()).abs().max().item()
    # The same rows alone through the same low-precision model: the noise floor of the dtype.
    stock = stock_logprobs(model, [(p.to(DEV), c.to(DEV)) for p, c in rows], cid.shape[1], 0.8)[0].detach().cpu()
    floor = (stock - ref.detach()).abs().max().item()
    assert err <= 2 * floor + (1e-5 if dtype == torch.float32 else 2e-2), (err, floor)
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


def test_completion_logprobs_under_cuda_autocast():
    """fp32 weights under CUDA bf16 autocast (TRL's `bf16=True`): attention gets fp32 q/k beside a bf16 v and runs
    them as bf16 on the fp16/bf16 kernels; as close to the fp64 rows as the stock rows under the same autocast."""
    model64 = tiny_model("qwen2")
    rows, pid, pmask, cid, cmask = make_batch()
    ref, _ = stock_logprobs(model64, rows, cid.shape[1], 0.8)
    model = tiny_model("qwen2", dtype=torch.float32).to(DEV)
    sp.hf.enable_checkpointing(model)
    model.train()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        lp = sp.completion_logprobs(model, pid.to(DEV), pmask.to(DEV), cid.to(DEV), cmask.to(DEV), temperature=0.8)
        stock = stock_logprobs(model, [(p.to(DEV), c.to(DEV)) for p, c in rows], cid.shape[1], 0.8)[0]
    lp.sum().backward()
    err = (lp.double().cpu() - ref.detach()).abs().max().item()
    floor = (stock.detach().cpu() - ref.detach()).abs().max().item()
    assert 1e-5 < floor and err <= 2 * floor + 1e-4, (err, floor)
    assert all(p.grad is not None and p.grad.dtype == torch.float32 and torch.isfinite(p.grad).all()
               for p in model.parameters())


def _head_case(dtype, n=96, hidden=64, vocab=5000):
    """fp64 CPU leaves of an LM head and their copies on the GPU in ``dtype``."""
    h, head, targets = head_leaves(n=n, hidden=hidden, vocab=vocab, bias=False)
    with torch.no_grad():
        head.weight.mul_(0.2)  # logits of a few units, as a trained head's
    head_d = torch.nn.Linear(hidden, vocab, bias=False).to(DEV, dtype)
    with torch.no_grad():
        head_d.weight.copy_(head.weight)
    h_d = h.detach().to(DEV, dtype).requires_grad_()
    return (h, head, targets), (h_d, head_d, targets.to(DEV))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_sliced_head_against_fp64(dtype):
    """Vocabulary slices on the GPU (fp32 sums of the hidden gradient over slices) against the fp64 CPU head: about
    as close as the unsliced head in the same dtype."""
    from shared_prefix._logprobs import head_logprobs

    (h, head, t), (h_d, head_d, t_d) = _head_case(dtype)
    w1, w2 = torch.randn(96, dtype=torch.float64), torch.randn(96, dtype=torch.float64)

    def run(hh, hd, tt, chunk):
        lp, ent = head_logprobs(hh, hd, tt, 0.7, True, chunk)
        loss = (lp * w1.to(lp)).sum() + (ent * w2.to(ent)).sum()
        grads = torch.autograd.grad(loss, [hh, hd.weight])
        return [x.detach().double().cpu() for x in (lp, ent, *grads)]

    ref = run(h, head, t, None)
    sliced, whole = run(h_d, head_d, t_d, 512), run(h_d, head_d, t_d, 10**6)
    slack = 1e-5 if dtype == torch.float32 else 1e-3
    for ours, stock, want in zip(sliced, whole, ref):
        assert rel(ours, want) <= 2 * rel(stock, want) + slack, (rel(ours, want), rel(stock, want))


def test_sliced_head_peak_memory_and_syncs():
    """On the GPU the sliced head's peak is a fraction of the unsliced one's, and it never reads back to the host."""
    from shared_prefix._logprobs import head_logprobs
    from shared_prefix.bench.measure import peak_memory_bytes

    _, (h_d, head_d, t_d) = _head_case(torch.bfloat16, n=2048, hidden=256, vocab=65536)

    def step(chunk):
        return lambda: head_logprobs(h_d, head_d, t_d, 1.0, True, chunk)[0].sum().backward()

    step(None)()  # warm-up (cuBLAS handles, the out_dtype probe)
    torch.cuda.set_sync_debug_mode("error")
    try:
        step(None)()
    finally:
        torch.cuda.set_sync_debug_mode(0)
    sliced, whole = peak_memory_bytes(step(None), DEV), peak_memory_bytes(step(10**6), DEV)
    assert sliced < 0.3 * whole, (sliced, whole)


@pytest.mark.parametrize("kernels", ["cudnn", "cudnn_views", "flash", "auto_fresh", "auto_eager"])
@pytest.mark.parametrize("head_major_qk", [False, True])
def test_kernels_at_the_bench_shape_that_broke_cudnn(kernels, head_major_qk):
    """8192x256x16x1 (Qwen2.5-0.5B heads): the shape where strided q/k/v with contiguous dO/O gave cuDNN gradients
    off by 0.46. Each kernel against fp32 explicit-math attention on the same bf16 inputs: bf16-level errors. The
    default rule on a shape no plan had before (``auto_fresh``: flash-attention 2, prefixes and completions in one
    call) and with ``cudnn_after(0)`` (``auto_eager``: copy-free cuDNN for the 8192-key calls); the profiler shows
    which kernels ran. Head-major q/k beside a token-major v and dO is what partial-rotary models (GLM, Phi,
    GPT-NeoX) hand over: every operand must still reach copy-free cuDNN in one layout."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    from shared_prefix.bench.variants import make_batch

    pid, pmask, cid, cmask = make_batch(8192, 256, 16, 1, 1000, DEV)
    sp._core._forget_shapes()
    with sp.cudnn_after(0 if kernels == "auto_eager" else 8):
        plan = sp.plan(pid, pmask, cid, cmask, group_sizes=16)
    sp._core._forget_shapes()
    if kernels == "auto_fresh":
        assert plan.auto_kernels == {"prefix+completions": "flash", "completions_x_prefix": "flash"}
    if kernels == "auto_eager":
        assert plan.auto_kernels == {"prefix": "cudnn", "completions_x_prefix": "cudnn", "completions": "flash"}
    auto = kernels.startswith("auto")
    kernels = None if auto else kernels
    g = torch.Generator(device=DEV).manual_seed(0)
    t = plan.num_tokens
    q, k, v, do = (torch.randn(t, h, 64, device=DEV, dtype=torch.bfloat16, generator=g) for h in (14, 2, 2, 14))

    def grads(dtype, name):
        leaves = [x.detach().to(dtype).requires_grad_() for x in (q, k, v)]
        q_in, k_in, v_in = leaves
        if head_major_qk:  # the same values, stored [H, T, D]
            q_in, k_in = (x.transpose(0, 1).contiguous().transpose(0, 1) for x in (q_in, k_in))
            assert q_in.stride()[0] == 64 and k_in.stride()[0] == 64
        out = sp.attention(q_in, k_in, v_in, plan, kernels=name)
        out.backward(do.to(dtype))
        return [out.detach()] + [x.grad for x in leaves]

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        ours = grads(torch.bfloat16, kernels)
        torch.cuda.synchronize()
    gpu_kernels = [e.name for e in prof.events() if e.device_type == DeviceType.CUDA]
    if auto:
        # What the plan said is what ran: cuDNN's kernels carry "cudnn" in their names (and "flash" too, e.g.
        # cudnn_generated_fort_native_sdpa_sm90_flash_fprop...), ATen's FA2 kernels live in pytorch_flash::.
        assert gpu_kernels and any("pytorch_flash::" in n for n in gpu_kernels), gpu_kernels[:20]
        ran_cudnn = any("cudnn" in n.lower() for n in gpu_kernels)
        assert ran_cudnn == ("cudnn" in plan.auto_kernels.values()), gpu_kernels[:20]
    for got, want in zip(ours, grads(torch.float32, "math")):
        assert rel(got.float(), want) < 2e-2, (kernels, rel(got.float(), want))


@pytest.mark.parametrize("kernels", ["auto", "cudnn_views"])
def test_cudnn_on_padded_self_calls(kernels):
    """``cudnn_bucket(512)``: an 8292-token prompt's causal call padded to 8704 rows on cuDNN (``auto`` gives it to
    cuDNN under ``cudnn_after(0)``); the 300-token completions run unpadded (shorter than the 8192 keys padding
    needs). bf16 against fp32 explicit-math attention on the same inputs and an unpadded plan, values and
    gradients; the profiler shows cuDNN's forward and backward at the padded length."""
    from shared_prefix.bench.variants import make_batch

    pid, pmask, cid, cmask = make_batch(8292, 300, 4, 1, 1000, DEV)
    sp._core._forget_shapes()
    with sp.cudnn_after(0), sp.cudnn_bucket(512):
        plan = sp.plan(pid, pmask, cid, cmask, group_sizes=4)
    reference_plan = sp.plan(pid, pmask, cid, cmask, group_sizes=4)
    sp._core._forget_shapes()
    assert plan.auto_kernels == {"prefix": "cudnn", "completions_x_prefix": "cudnn", "completions": "flash"}
    g = torch.Generator(device=DEV).manual_seed(0)
    q, k, v, do = (torch.randn(plan.num_tokens, h, 64, device=DEV, dtype=torch.bfloat16, generator=g)
                   for h in (14, 2, 2, 14))

    def grads(dtype, name, p):
        leaves = [x.detach().to(dtype).requires_grad_() for x in (q, k, v)]
        out = sp.attention(*leaves, p, kernels=name)
        out.backward(do.to(dtype))
        return [out.detach()] + [x.grad for x in leaves]

    with torch.profiler.profile(record_shapes=True) as prof:
        ours = grads(torch.bfloat16, None if kernels == "auto" else kernels, plan)
        torch.cuda.synchronize()
    cudnn_lengths = {(e.name, tuple(e.input_shapes[0])[2]) for e in prof.events()
                     if e.name.startswith("aten::_scaled_dot_product_cudnn_attention") and e.input_shapes}
    assert ("aten::_scaled_dot_product_cudnn_attention", 8704) in cudnn_lengths, cudnn_lengths
    assert ("aten::_scaled_dot_product_cudnn_attention_backward", 8704) in cudnn_lengths, cudnn_lengths
    for got, want in zip(ours, grads(torch.float32, "math", reference_plan)):
        assert torch.isfinite(got).all() and rel(got.float(), want) < 2e-2, (kernels, rel(got.float(), want))


def test_gpu_kernel_seconds():
    """The bench's GPU busy time: kernels of a step are counted (a 4096² matmul alone is well above 10 µs), and an
    SDPA call's kernel lands in the attention part, a matmul's does not."""
    from shared_prefix.bench.measure import gpu_kernel_seconds

    a = torch.randn(4096, 4096, device=DEV, dtype=torch.bfloat16)
    mm = gpu_kernel_seconds(lambda: a @ a)
    assert 1e-5 < mm["gpu_busy_s"] < 1.0 and mm["gpu_attn_s"] == 0.0, mm
    q = torch.randn(1, 8, 2048, 64, device=DEV, dtype=torch.bfloat16)
    attn = gpu_kernel_seconds(lambda: torch.nn.functional.scaled_dot_product_attention(q, q, q, is_causal=True))
    assert 0 < attn["gpu_attn_s"] <= attn["gpu_busy_s"], attn
