"""shared_prefix.attention against each row run alone with standard causal attention, fp64, values and grads."""

from __future__ import annotations

import contextlib

import pytest
import torch
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

import shared_prefix as sp
from helpers import build_case, case_leaves, causal_attention, padded, reference, rel
from shared_prefix import _core
from shared_prefix._kernels import cudnn_bucket, self_calls


# Fresh empty tensors are NaN-filled in every test here (conftest.py), so unwritten elements cannot pass by luck.
# The references here split the packed stream as [prompts | completions]: plans share whole prompts (test_tree.py
# tests prefix trees).
pytestmark = pytest.mark.usefixtures("uninitialized_memory_is_nan", "prompts_only")


def run_case(prompts, rows, prompt_ids, left_prompt, left_completion, scale, kernels=None, window=None):
    lp = max(p["len"] for p in prompts) + 1
    lc = max([r["q"].shape[0] for r in rows] + [0]) + 1
    pid, pmask = padded(prompt_ids, lp, left_prompt)
    cid, cmask = padded([torch.arange(r["q"].shape[0]) + 7 for r in rows], lc, left_completion)
    plan = sp.plan(pid, pmask, cid, cmask, windows=None if window is None else [window])

    packed = {}
    for name in ("q", "k", "v"):
        px, _ = padded([prompts[r["group"]][name] for r in rows], lp, left_prompt)
        cx, _ = padded([r[name] for r in rows], lc, left_completion)
        packed[name] = plan.pack(px, cx)[0]
    out = sp.attention(packed["q"], packed["k"], packed["v"], plan, scale=scale, kernels=kernels, window=window)
    return plan, out, cmask


def compare(prompts, rows, plan, out, cmask, prompt_out, comp_out, tol=1e-10):
    # Prefix region: group order is the plan's (first appearance).
    first_row_of_group = {}
    for i, r in enumerate(rows):
        first_row_of_group.setdefault(r["group"], i)
    ours_prompts = torch.split(out[: plan.prefix_tokens], [prompts[g]["len"] for g in first_row_of_group])
    for g, o in zip(first_row_of_group, ours_prompts):
        assert rel(o, prompt_out[g]) < tol
    ours_comp = plan.unpack_completions(out[plan.prefix_tokens :])
    for i, ref in enumerate(comp_out):
        got = ours_comp[i][cmask[i]]
        assert got.shape == ref.shape
        if ref.numel():
            assert rel(got, ref) < tol
    assert torch.all(ours_comp[~cmask] == 0)


def check_case(seed, groups, hkv, ratio, dim, left_prompt, left_completion, shuffle, kernels=None, value_dim=None,
               window=None):
    prompts, rows, prompt_ids, _ = build_case(seed, groups, hkv, ratio, dim, left_prompt, left_completion, shuffle)
    if value_dim is not None:  # values with their own head dim (multi-head latent attention)
        g = torch.Generator().manual_seed(seed + 2)
        for x in prompts + rows:
            x["v"] = torch.randn(x["v"].shape[0], hkv, value_dim, generator=g, dtype=torch.float64).requires_grad_()
    scale = dim**-0.5 * (1.3 if seed % 2 else 1.0)
    plan, out, cmask = run_case(prompts, rows, prompt_ids, left_prompt, left_completion, scale, kernels, window)
    prompt_out, comp_out = reference(prompts, rows, scale, window)
    compare(prompts, rows, plan, out, cmask, prompt_out, comp_out)

    # Gradients: the same scalar loss on both sides (each prompt output counted once, every completion output).
    g = torch.Generator().manual_seed(seed + 1)
    w = torch.randn(out.shape, generator=g, dtype=torch.float64)
    ours = torch.autograd.grad((out * w).sum(), case_leaves(prompts, rows), allow_unused=True)
    first_row_of_group = {}
    for i, r in enumerate(rows):
        first_row_of_group.setdefault(r["group"], i)
    w_prompts = torch.split(w[: plan.prefix_tokens], [prompts[gi]["len"] for gi in first_row_of_group])
    w_comp = plan.unpack_completions(w[plan.prefix_tokens :])
    loss = sum((prompt_out[gi] * wp).sum() for gi, wp in zip(first_row_of_group, w_prompts))
    loss = loss + sum((c * w_comp[i][cmask[i]]).sum() for i, c in enumerate(comp_out))
    refs = torch.autograd.grad(loss, case_leaves(prompts, rows), allow_unused=True)
    for a, b in zip(ours, refs):
        a = torch.zeros_like(b) if a is None and b is not None else a
        if b is None:
            assert a is None or torch.all(a == 0)
            continue
        # Relative in norm, with an absolute floor for gradients that are exactly 0 in the reference
        # (e.g. the key of a one-token prompt): there ours is rounding noise.
        assert (a - b).norm() <= 1e-10 * b.norm() + 1e-13


group_strategy = st.lists(
    st.tuples(
        st.one_of(st.integers(1, 12), st.integers(24, 72)),  # short prompts, and long prompts
        st.lists(st.integers(0, 6), min_size=1, max_size=4),  # completion lengths; 0 = empty completion
    ),
    min_size=1,
    max_size=4,
)


@settings(max_examples=220, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    seed=st.integers(0, 2**31 - 1),
    groups=group_strategy,
    hkv=st.sampled_from([1, 2]),
    ratio=st.sampled_from([1, 2, 4]),
    dim=st.sampled_from([4, 8]),
    left_prompt=st.booleans(),
    left_completion=st.booleans(),
    shuffle=st.booleans(),
    mode=st.sampled_from(["auto", "fused"]),
)
def test_matches_per_row_attention(seed, groups, hkv, ratio, dim, left_prompt, left_completion, shuffle, mode):
    # Both CPU backends: ATen's CPU flash kernel (the default) and the explicit-math kernel (CUDA's fp32 path);
    # both executor paths: the three calls apart (the CPU kernels' choice) and calls 1 and 3 as one (FA2's).
    with self_calls(mode):
        for kernels in ("cpu_flash", "math"):
            check_case(seed, groups, hkv, ratio, dim, left_prompt, left_completion, shuffle, kernels)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    seed=st.integers(0, 2**31 - 1),
    groups=group_strategy,
    hkv=st.sampled_from([1, 2]),
    ratio=st.sampled_from([1, 3]),
    window=st.one_of(st.integers(1, 6), st.integers(7, 80)),
    left_prompt=st.booleans(),
    left_completion=st.booleans(),
    shuffle=st.booleans(),
)
def test_sliding_window_matches_per_row_attention(seed, groups, hkv, ratio, window, left_prompt, left_completion,
                                                  shuffle):
    """Sliding-window layers (each token sees itself and the window - 1 tokens before it in its own row): windows
    shorter than the completion, than the prompt, and longer than every row; the default kernel (the explicit-math
    one on CPU) and a forced one. Values and gradients against per-row windowed attention in fp64."""
    for kernels in (None, "math"):
        check_case(seed, groups, hkv, ratio, 8, left_prompt, left_completion, shuffle, kernels, window=window)


@pytest.mark.parametrize("window", [None, 3])
@pytest.mark.parametrize("kernels", ["cpu_flash", "math"])
def test_attention_sinks(window, kernels):
    """GPT-OSS's sinks (one extra logit per head in every softmax, zero value), with and without a sliding window:
    values and the gradients of q, k, v and the sinks against per-row attention in fp64."""
    if window is not None and kernels == "cpu_flash":
        kernels = None  # the CPU flash kernel takes no window
    prompts, rows, prompt_ids, hq = build_case(9, [(11, [4, 0, 6]), (3, [5]), (7, [1, 2])], 2, 2, 8, True, False, True)
    sinks = torch.randn(hq, generator=torch.Generator().manual_seed(4), dtype=torch.float64).requires_grad_()
    pid, pmask, cid, cmask = _plan_inputs(prompt_ids, rows)
    plan = sp.plan(pid, pmask, cid, cmask, windows=None if window is None else [window])
    lp, lc = pid.shape[1], cid.shape[1]
    packed = {}
    for name in ("q", "k", "v"):
        px, _ = padded([prompts[r["group"]][name] for r in rows], lp, True)
        cx, _ = padded([r[name] for r in rows], lc, False)
        packed[name] = plan.pack(px, cx)[0]
    out = sp.attention(packed["q"], packed["k"], packed["v"], plan, scale=0.4, kernels=kernels, window=window,
                       sinks=sinks)
    ours_comp = plan.unpack_completions(out[plan.prefix_tokens :])
    w = torch.randn(out.shape, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    w_comp = plan.unpack_completions(w[plan.prefix_tokens :])
    loss, ref_loss = 0, 0
    for i, r in enumerate(rows):
        p = prompts[r["group"]]
        ref = causal_attention(*(torch.cat([p[n], r[n]]) for n in ("q", "k", "v")), 0.4, window, sinks)[p["len"]:]
        got = ours_comp[i][cmask[i]]
        assert rel(got, ref) < 1e-10 if ref.numel() else got.numel() == 0
        loss, ref_loss = loss + (got * w_comp[i][cmask[i]]).sum(), ref_loss + (ref * w_comp[i][cmask[i]]).sum()
    first = {}
    for r in rows:
        first.setdefault(r["group"], r)
    for (gi, r), got, wp in zip(first.items(), torch.split(out[: plan.prefix_tokens], [prompts[g]["len"] for g in first]),
                                torch.split(w[: plan.prefix_tokens], [prompts[g]["len"] for g in first])):
        p = prompts[gi]
        ref = causal_attention(p["q"], p["k"], p["v"], 0.4, window, sinks)
        assert rel(got, ref) < 1e-10
        loss, ref_loss = loss + (got * wp).sum(), ref_loss + (ref * wp).sum()
    inputs = case_leaves(prompts, rows) + [sinks]
    ours = torch.autograd.grad(loss, inputs, allow_unused=True)
    refs = torch.autograd.grad(ref_loss, inputs, allow_unused=True)
    assert refs[-1].abs().max() > 1e-3  # the sinks do get a gradient
    for a, b in zip(ours, refs):
        a = torch.zeros_like(b) if a is None and b is not None else a
        if b is not None:
            assert (a - b).norm() <= 1e-10 * b.norm() + 1e-13


def test_sliding_window_arguments():
    prompts, rows, prompt_ids, _ = build_case(5, [(9, [3, 4]), (6, [2])], 2, 2, 8, True, False, False)
    plan, _, _ = run_case(prompts, rows, prompt_ids, True, False, 0.3, window=4)
    assert plan.windows == [4]
    q, k, v = (torch.randn(plan.num_tokens, h, 8, dtype=torch.float64) for h in (4, 2, 2))
    with pytest.raises(ValueError, match="window: the plan holds no key tables for a sliding window of 3"):
        sp.attention(q, k, v, plan, window=3)
    with pytest.raises(ValueError, match="kernels: \"cpu_flash\" takes no sliding window"):
        sp.attention(q, k, v, plan, window=4, kernels="cpu_flash")
    for bad in (0, -2, 2.5, True):
        with pytest.raises(ValueError, match="window: expected a positive int"):
            sp.attention(q, k, v, plan, window=bad)
    for bad in ([0], (w for w in [4]), 4, [2.0]):
        with pytest.raises(ValueError, match="windows: expected a list of positive ints"):
            sp.plan(*_plan_inputs(prompt_ids, rows), windows=bad)
    assert sp.plan(*_plan_inputs(prompt_ids, rows), windows=[2**70, 4]).windows == [4]  # a huge one cuts nothing
    # A window as long as the longest row cuts nothing: no tables, the plain path, the same result.
    assert plan.max_seqlen == 13
    long = sp.plan(*_plan_inputs(prompt_ids, rows), windows=[13, 50])
    assert long.windows == []
    torch.testing.assert_close(sp.attention(q, k, v, long, window=13), sp.attention(q, k, v, long), rtol=0, atol=0)


def _plan_inputs(prompt_ids, rows):
    lp = max(p.shape[0] for p in prompt_ids) + 1
    lc = max(r["q"].shape[0] for r in rows) + 1
    pid, pmask = padded(prompt_ids, lp, True)
    cid, cmask = padded([torch.arange(r["q"].shape[0]) + 7 for r in rows], lc, False)
    return pid, pmask, cid, cmask


@pytest.mark.parametrize(
    "groups",
    [
        [(5, [3])],  # group of one
        [(64, [1, 1, 1, 1, 1, 1, 1, 1])],  # long prompt, one-token completions
        [(3, [0, 0]), (4, [2, 0])],  # a group with no completion tokens at all
        [(7, [4, 4, 4]), (7, [4, 4])],  # equal lengths: batched runs
    ],
)
@pytest.mark.parametrize("kernels", ["cpu_flash", "math"])
@pytest.mark.parametrize("mode", ["auto", "fused"])
def test_edge_shapes(groups, kernels, mode):
    with self_calls(mode):
        check_case(3, groups, 2, 2, 8, True, False, True, kernels)


@contextlib.contextmanager
def padding_short_runs():
    """Bucket padding applies to runs of cuDNN's length (8192 keys and more); inside the block, to every run."""
    before = _core._set_pad_min_keys(0)
    try:
        yield
    finally:
        _core._set_pad_min_keys(before)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    seed=st.integers(0, 2**31 - 1),
    groups=st.one_of(
        group_strategy,
        # Equal lengths: every call one run (the shape cuDNN takes), every segment padded.
        st.tuples(st.integers(1, 40), st.integers(1, 9), st.integers(1, 4), st.integers(1, 3)).map(
            lambda t: [(t[0], [t[1]] * t[2])] * t[3]),
    ),
    bucket=st.sampled_from([2, 3, 8, 64]),
    left_prompt=st.booleans(),
    mode=st.sampled_from(["auto", "fused"]),
)
# Fused, a prompt as long as its completions: the prefixes' and completions' call is one run of 5-token segments.
@example(seed=1, groups=[(5, [5, 5])], bucket=8, left_prompt=True, mode="fused")
def test_padded_self_calls_match_per_row_attention(seed, groups, bucket, left_prompt, mode):
    """``cudnn_bucket``: the causal self-attention runs padded at each segment's tail to a multiple of ``bucket``
    (the dense kernels all take it; CUDA's cuDNN is the one it is for) give the same values and gradients."""
    with padding_short_runs(), cudnn_bucket(bucket), self_calls(mode):
        for kernels in ("cpu_flash", "math"):
            check_case(seed, groups, 2, 2, 8, left_prompt, False, True, kernels)


@pytest.mark.parametrize("mode", ["split", "fused"])
def test_padded_self_calls_pad(mode):
    """The padding is really there, forward and backward: the CPU flash kernel sees the causal self calls at the
    bucketed lengths. Two prompts of 13 tokens with 5-token completions: the prompts' run 13 -> 16 and the
    completions' 5 -> 8, as calls of their own (split) or as two runs of one call (fused); the cross call (5 rows
    against 13 keys) is never padded. At the default threshold (8192 keys) nothing this short is."""
    want = [5, 8, 16]
    q, k, v = (torch.randn(2 * 13 + 2 * 5, 2, 8, dtype=torch.float64, requires_grad=True) for _ in range(3))
    ids = torch.stack([torch.arange(1, 14), torch.arange(2, 15)])

    def make_plan():  # the plan holds the padding (bucket and threshold) in effect when it is made
        with cudnn_bucket(8):
            return sp.plan(ids, torch.ones(2, 13, dtype=torch.bool), ids[:, :5], torch.ones(2, 5, dtype=torch.bool))

    def lengths(plan, op):
        with self_calls(mode), torch.profiler.profile(record_shapes=True) as prof:
            sp.attention(q, k, v, plan, kernels="cpu_flash").sum().backward()
        return sorted({tuple(e.input_shapes[0])[2] for e in prof.events() if e.name == op})

    forward = "aten::_scaled_dot_product_flash_attention_for_cpu"
    with padding_short_runs():
        padded = make_plan()
    got = (lengths(padded, forward), lengths(padded, forward + "_backward"))
    assert got[0] == want and got[1] == want, got
    assert 16 not in lengths(make_plan(), forward)


@pytest.mark.parametrize("mode,calls", [("fused", 2), ("split", 3), ("auto", 3)])
def test_self_call_modes(mode, calls):
    """Fused, the prefixes' and completions' causal calls are one call: with a prompt as long as each of its
    completions, its segments and theirs are one run of equal lengths, so the CPU flash kernel runs twice (that
    run, and the completions against the prompt) instead of three times. The CPU kernels' own choice is the split."""
    q, k, v = (torch.randn(4 * 3, 2, 8, dtype=torch.float64, requires_grad=True) for _ in range(3))
    ids = torch.arange(1, 5).expand(2, 4)
    plan = sp.plan(ids, torch.ones(2, 4, dtype=torch.bool), ids, torch.ones(2, 4, dtype=torch.bool))
    with self_calls(mode), torch.profiler.profile() as prof:
        sp.attention(q, k, v, plan, kernels="cpu_flash").sum().backward()
    counts = {e.key: e.count for e in prof.key_averages()}
    assert counts["aten::_scaled_dot_product_flash_attention_for_cpu"] == calls
    assert counts["aten::_scaled_dot_product_flash_attention_for_cpu_backward"] == calls
    with pytest.raises(ValueError, match="mode: expected"):
        _core.set_self_calls("two")


@pytest.mark.parametrize("value_dim", [4, 24])
@pytest.mark.parametrize("kernels", ["cpu_flash", "math"])
def test_value_head_dim_unlike_query_head_dim(value_dim, kernels):
    """v with its own head dim (narrower or wider than q/k's 8): exact, values and gradients."""
    check_case(11, [(9, [5, 0, 3]), (4, [2])], 2, 2, 8, True, False, True, kernels, value_dim=value_dim)


@pytest.fixture
def math_block_bytes():
    """Set the explicit-math kernel's score budget per query block for one test (restored after)."""
    from shared_prefix import _core

    previous = []
    yield lambda n: previous.append(_core.set_math_block_bytes(n))
    if previous:
        _core.set_math_block_bytes(previous[0])


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                  HealthCheck.function_scoped_fixture])
@given(
    seed=st.integers(0, 2**31 - 1),
    groups=group_strategy,
    ratio=st.sampled_from([1, 3]),
    budget=st.sampled_from([1, 700, 5000]),
    left_prompt=st.booleans(),
)
def test_math_kernel_in_query_blocks(math_block_bytes, seed, groups, ratio, budget, left_prompt):
    """The explicit-math kernel (CUDA's fp32/fp64 path) over blocks of query rows, down to one row per block, with
    the causal diagonal offset per block and dK/dV summed over blocks: still exact."""
    math_block_bytes(budget)
    check_case(seed, groups, 2, ratio, 8, left_prompt, True, True, "math")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_math_kernel_blocks_in_low_precision(math_block_bytes, dtype):
    """fp32/bf16 through the math kernel in blocks (dK/dV summed over blocks in fp32): as close to the fp64 result
    as the unblocked kernel in the same dtype."""
    pid = torch.randint(1, 50, (1, 40)).repeat(3, 1)
    cid = torch.randint(1, 50, (3, 7))
    plan = sp.plan(pid, torch.ones_like(pid), cid, torch.ones_like(cid))
    g = torch.Generator().manual_seed(0)
    q, k, v, w = (torch.randn(plan.num_tokens, h, 8, dtype=torch.float64, generator=g) for h in (6, 2, 2, 6))

    def run(dt):
        leaves = [x.to(dt).requires_grad_() for x in (q, k, v)]
        out = sp.attention(*leaves, plan, kernels="math")
        return [t.double() for t in (out, *torch.autograd.grad((out * w.to(dt)).sum(), leaves))]

    want = run(torch.float64)
    whole = run(dtype)
    math_block_bytes(1)  # one query row per block
    blocked = run(dtype)
    for b, u, ref in zip(blocked, whole, want):
        assert rel(b, ref) <= 1.5 * rel(u, ref) + 1e-7, (rel(b, ref), rel(u, ref))


def test_math_kernel_memory_is_bounded_by_blocks(math_block_bytes):
    """One 1024-token prompt with 4 completions: with a 1 MiB score budget the math kernel's peak (forward and
    backward) is a fraction of the unblocked one, whose score tensors are 4 x 1024 x 1024 x 8 bytes each."""
    from shared_prefix.bench.measure import peak_memory_bytes

    pid = torch.randint(1, 50, (1, 1024)).repeat(4, 1)
    cid = torch.randint(1, 50, (4, 16))
    plan = sp.plan(pid, torch.ones_like(pid), cid, torch.ones_like(cid))
    q = torch.randn(plan.num_tokens, 4, 8, dtype=torch.float64, requires_grad=True)
    k, v = (torch.randn(plan.num_tokens, 2, 8, dtype=torch.float64, requires_grad=True) for _ in range(2))

    def step():
        sp.attention(q, k, v, plan, kernels="math").sum().backward()

    peaks = {}
    for budget in (2**40, 2**20):
        math_block_bytes(budget)
        peaks[budget] = peak_memory_bytes(step, torch.device("cpu"))
    assert peaks[2**20] < 0.25 * peaks[2**40], peaks


def test_math_block_budget_rejects_zero():
    from shared_prefix import _core

    with pytest.raises(ValueError, match="at least 1 byte"):
        _core.set_math_block_bytes(0)


def test_wrong_mask_is_caught():
    """Negative control: plain causal attention over the packed stream (completions see each other) must fail."""
    prompts, rows, prompt_ids, _ = build_case(11, [(6, [3, 4]), (5, [2])], 2, 2, 8, True, False, False)
    scale = 8**-0.5
    plan, out, cmask = run_case(prompts, rows, prompt_ids, True, False, scale)
    # Same packed inputs, wrong mask.
    lp = max(p["len"] for p in prompts) + 1
    lc = max(r["q"].shape[0] for r in rows) + 1
    qkv = []
    for name in ("q", "k", "v"):
        px, _ = padded([prompts[r["group"]][name] for r in rows], lp, True)
        cx, _ = padded([r[name] for r in rows], lc, False)
        qkv.append(plan.pack(px, cx)[0])
    wrong = causal_attention(*qkv, scale)
    prompt_out, comp_out = reference(prompts, rows, scale)
    with pytest.raises(AssertionError):
        compare(prompts, rows, plan, wrong, cmask, prompt_out, comp_out)
    compare(prompts, rows, plan, out, cmask, prompt_out, comp_out)


def test_float32_close_to_fp64():
    prompts, rows, prompt_ids, _ = build_case(5, [(40, [8, 3, 5]), (9, [6])], 2, 2, 16, False, False, True)
    plan, out64, cmask = run_case(prompts, rows, prompt_ids, False, False, 0.25)
    for p in prompts:
        for n in ("q", "k", "v"):
            p[n] = p[n].detach().float().requires_grad_()
    for r in rows:
        for n in ("q", "k", "v"):
            r[n] = r[n].detach().float().requires_grad_()
    _, out32, _ = run_case(prompts, rows, prompt_ids, False, False, 0.25)
    assert out32.dtype == torch.float32
    assert rel(out32.double(), out64) < 1e-5


@pytest.mark.parametrize("kernels", ["cpu_flash", "math"])
def test_autocast_casts_operands_like_sdpa(kernels):
    """Under autocast, q/k/v run in autocast's dtype as scaled_dot_product_attention's do (HF's RoPE hands fp32 q/k
    beside a bf16 v there), gradients return in each leaf's dtype, fp64 is left alone, and neither forward nor a
    backward called inside the autocast region changes the kernels' dtypes."""
    pid = torch.randint(1, 50, (1, 9)).repeat(3, 1)
    cid = torch.randint(1, 50, (3, 4))
    plan = sp.plan(pid, torch.ones_like(pid), cid, torch.ones_like(cid))
    g = torch.Generator().manual_seed(3)
    q, k, v, w = (torch.randn(plan.num_tokens, h, 8, generator=g) for h in (4, 2, 2, 4))
    leaves = [q.clone().requires_grad_(), k.clone().requires_grad_(), v.bfloat16().requires_grad_()]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = sp.attention(*leaves, plan, kernels=kernels)
        grads = torch.autograd.grad((out * w.bfloat16()).sum(), leaves)
    assert out.dtype == torch.bfloat16
    assert [x.dtype for x in grads] == [torch.float32, torch.float32, torch.bfloat16]
    # The same as the op on bf16 operands outside autocast, bit for bit.
    plain = [x.detach().bfloat16().requires_grad_() for x in leaves]
    want = sp.attention(*plain, plan, kernels=kernels)
    want_grads = torch.autograd.grad((want * w.bfloat16()).sum(), plain)
    assert torch.equal(out, want)
    for got, ref in zip(grads, want_grads):
        assert torch.equal(got, ref.to(got.dtype))
    # fp64 operands stay fp64 (autocast does not cast them), with the fp64 result.
    q64 = [x.double().requires_grad_() for x in (q, k, v)]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out64 = sp.attention(*q64, plan, kernels=kernels)
    assert out64.dtype == torch.float64
    assert torch.equal(out64, sp.attention(*q64, plan, kernels=kernels))
    # An fp32 forward whose backward is called inside autocast: the same fp32 gradients (the math kernel's matmuls
    # would otherwise run in bf16 there).
    q32 = [x.clone().requires_grad_() for x in (q, k, v)]
    out32 = sp.attention(*q32, plan, kernels=kernels)
    want32 = torch.autograd.grad((out32 * w).sum(), q32, retain_graph=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got32 = torch.autograd.grad((out32 * w).sum(), q32)
    for got, ref in zip(got32, want32):
        assert torch.equal(got, ref)


def test_double_backward_refused():
    """The kernels' backward is not differentiable: gradients taken with create_graph=True are the first-order
    ones, and differentiating them again is refused, never silently missing its second-order terms."""
    pid = torch.tensor([[1, 2, 3], [1, 2, 3]])
    cid = torch.tensor([[4, 5], [6, 7]])
    plan = sp.plan(pid, torch.ones_like(pid), cid, torch.ones_like(cid))
    q = torch.randn(plan.num_tokens, 2, 8, dtype=torch.float64, requires_grad=True)
    (first,) = torch.autograd.grad(sp.attention(q, q, q, plan).sum(), [q])
    (g,) = torch.autograd.grad(sp.attention(q, q, q, plan).sum(), [q], create_graph=True)
    assert torch.equal(g, first) and g.requires_grad
    with pytest.raises(RuntimeError, match="double backward"):
        torch.autograd.grad(g.pow(2).sum(), [q])


class TestBadInputs:
    def setup_method(self):
        pid = torch.tensor([[1, 2, 3], [1, 2, 3]])
        cid = torch.tensor([[4, 5], [6, 0]])
        self.plan = sp.plan(pid, torch.ones_like(pid), cid, torch.tensor([[1, 1], [1, 0]]))
        self.t = self.plan.num_tokens

    def test_token_count(self):
        q = torch.randn(self.t + 1, 2, 4)
        with pytest.raises(ValueError, match="q: has"):
            sp.attention(q, q, q, self.plan)

    def test_heads(self):
        q = torch.randn(self.t, 3, 4)
        k = torch.randn(self.t, 2, 4)
        with pytest.raises(ValueError, match="k: 2 key/value heads"):
            sp.attention(q, k, k, self.plan)

    def test_dims_and_types(self):
        q = torch.randn(self.t, 2, 4)
        with pytest.raises(ValueError, match="k: head dim"):
            sp.attention(q, torch.randn(self.t, 2, 8), torch.randn(self.t, 2, 8), self.plan)
        with pytest.raises(ValueError, match="v: shape"):
            sp.attention(q, q, torch.randn(self.t, 1, 4), self.plan)
        with pytest.raises(TypeError, match="v: dtype"):
            sp.attention(q, q, q.double(), self.plan)
        with pytest.raises(TypeError, match="q: expected float16, bfloat16, float32 or float64"):
            sp.attention(q.long(), q.long(), q.long(), self.plan)
        with pytest.raises(TypeError, match="plan:"):
            sp.attention(q, q, q, "plan")
        with pytest.raises(ValueError, match="q: expected a packed"):
            sp.attention(q[None], q, q, self.plan)

    def test_backend_choice(self):
        q = torch.randn(self.t, 2, 8)
        with pytest.raises(ValueError, match="kernels: \"flash\" is not available on cpu"):
            sp.attention(q, q, q, self.plan, kernels="flash")
        with pytest.raises(ValueError, match="kernels: \"nope\""):
            sp.attention(q, q, q, self.plan, kernels="nope")


# Each case runs in a child process under an address-space limit of what it holds plus `headroom` MiB.
_OOM_CASES = {
    # The math kernel's score tensors: [1, 4, 4096, 4096] fp64 is 512 MiB in one block; one fits, not two.
    "math scores": ("q = torch.randn(plan.num_tokens, 4, 8, dtype=torch.float64)\n"
                    "k = torch.randn(plan.num_tokens, 1, 8, dtype=torch.float64)\n"
                    "sp._core.set_math_block_bytes(2**40)\n", "kernels='math'", 700),
    # The executor's layout copy of a q whose head dim is not unit-stride: 256 MiB that cannot fit.
    "layout copy": ("q = torch.randn(64, 128, plan.num_tokens, dtype=torch.float64).permute(2, 1, 0)\n"
                    "k = torch.randn(plan.num_tokens, 1, 64, dtype=torch.float64)\n", "", 64),
}


@pytest.mark.parametrize("case", list(_OOM_CASES))
def test_out_of_memory_is_an_exception_not_a_panic(tmp_path, case):
    """A libtorch error inside Rust (running out of memory, in a child process with an address-space limit)
    reaches Python as a RuntimeError. tch's unwrapping ops (Scalar-taking ones, `contiguous`) turned it into a Rust
    panic (pyo3's PanicException, not an Exception, so `except Exception` missed it)."""
    import subprocess
    import sys

    setup, kwargs, headroom = _OOM_CASES[case]
    script = tmp_path / "oom.py"
    script.write_text(
        "import resource, torch\n"
        "import shared_prefix as sp\n"
        "pid = torch.randint(1, 50, (1, 4096)); cid = torch.randint(1, 50, (1, 4))\n"
        "plan = sp.plan(pid, torch.ones_like(pid), cid, torch.ones_like(cid))\n"
        + setup +
        "vm = int(open('/proc/self/statm').read().split()[0]) * resource.getpagesize()\n"
        f"resource.setrlimit(resource.RLIMIT_AS, (vm + {headroom} * 2**20, resource.RLIM_INFINITY))\n"
        "try:\n"
        f"    sp.attention(q, k, k, plan, {kwargs})\n"
        "    print('no error')\n"
        "except Exception as e:\n"
        "    print('exception', type(e).__name__, 'alloc' in str(e) or 'memory' in str(e))\n"
    )
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300)
    assert proc.stdout.strip() == "exception RuntimeError True", (proc.stdout, proc.stderr[-2000:])


@pytest.mark.parametrize("kernels", ["cpu_flash", "math"])
def test_any_layout_of_q_k_v(kernels):
    """Views whose last dimension is not unit-stride (a transpose, an expanded dimension): the same values and
    gradients as contiguous inputs. ATen's CPU flash kernel returned garbage for them (found by fuzzing)."""
    pid = torch.randint(1, 50, (1, 9)).repeat(3, 1)
    cid = torch.randint(1, 50, (3, 4))
    plan = sp.plan(pid, torch.ones_like(pid), cid, torch.ones_like(cid))
    t = plan.num_tokens
    g = torch.Generator().manual_seed(0)
    base = [torch.randn(t, h, 8, dtype=torch.float64, generator=g) for h in (4, 2, 2)]
    w = torch.randn(t, 4, 8, dtype=torch.float64, generator=g)

    def run(make):
        leaves = [x.clone().requires_grad_() for x in base]
        out = sp.attention(*[make(x) for x in leaves], plan, kernels=kernels)
        return [out.detach(), *torch.autograd.grad((out * w).sum(), leaves)]

    want = run(lambda x: x)
    transposed = run(lambda x: x.transpose(1, 2).contiguous().transpose(1, 2))  # strides (H*D, 1, H)
    last_dim_strided = run(lambda x: x.transpose(0, 2).contiguous().transpose(0, 2))  # strides (1, T, T*H)
    for got in (transposed, last_dim_strided):
        for a, b in zip(got, want):
            assert rel(a, b) < 1e-12
    q1 = base[0][:, :, :1].expand(t, 4, 8)  # stride(-1) = 0
    out = sp.attention(q1, base[1], base[2], plan, kernels=kernels)
    ref = sp.attention(q1.contiguous(), base[1], base[2], plan, kernels=kernels)
    assert rel(out, ref) < 1e-12


def test_bad_dtype_and_scale():
    pid = torch.tensor([[1, 2, 3]] * 2)
    plan = sp.plan(pid, torch.ones_like(pid), torch.tensor([[4], [5]]), torch.ones(2, 1, dtype=torch.bool))
    q = torch.randn(plan.num_tokens, 2, 8, dtype=torch.float64)
    for dtype in (torch.uint16, torch.int32, torch.complex64):
        with pytest.raises(TypeError, match="q: expected float16, bfloat16, float32 or float64"):
            sp.attention(q.to(dtype), q, q, plan)
    for scale in (0.0, -0.5, float("nan"), float("inf"), 10**400):
        with pytest.raises(ValueError, match="scale: must be a finite positive number"):
            sp.attention(q, q, q, plan, scale=scale)
    with pytest.raises(TypeError, match="scale"):
        sp.attention(q, q, q, plan, scale="0.3")
    with pytest.raises(ValueError, match="D >= 1"):
        sp.attention(q[..., :0], q[..., :0], q[..., :0], plan)
    with pytest.raises(ValueError, match="q: expected at least one head and a head dim >= 1"):
        sp.attention(q[..., :0], q[..., :0], q[..., :0], plan, scale=0.5)  # D = 0, scale given
    with pytest.raises(ValueError, match="q: expected at least one head"):
        sp.attention(q[:, :0], q[:, :1], q[:, :1], plan)  # Hq = 0
    with pytest.raises(ValueError, match="sinks: expected a float \\[Hq\\] tensor"):
        sp.attention(q, q, q, plan, sinks=torch.zeros(3, dtype=torch.float64))
    with pytest.raises(TypeError, match="sinks: expected a tensor or None"):
        sp.attention(q, q, q, plan, sinks=[0.0, 0.0])


def test_layouts_and_devices_other_than_dense_cpu_cuda_are_refused():
    """Sparse or meta tensors get a ValueError naming the argument (sparse ones reached Rust, whose layout copy
    and stride read panicked; a meta tensor was reported as being on "Mps")."""
    pid = torch.tensor([[1, 2, 3]] * 2)
    plan = sp.plan(pid, torch.ones_like(pid), torch.tensor([[4], [5]]), torch.ones(2, 1, dtype=torch.bool))
    q = torch.randn(plan.num_tokens, 2, 8, dtype=torch.float64)
    for name, bad in (("q", (q.to_sparse(), q, q)), ("k", (q, q.to_sparse(), q)), ("v", (q, q, q.to_sparse()))):
        with pytest.raises(ValueError, match=f"{name}: expected a dense \\(strided\\) tensor"):
            sp.attention(*bad, plan)
    with pytest.raises(ValueError, match="q: expected a dense"):
        sp.attention(q.reshape(-1, 8).to_sparse_csr(), q, q, plan)  # CSR has no strides at all
    with pytest.raises(ValueError, match="q: expected a CPU or CUDA tensor, got one on meta"):
        sp.attention(q.to("meta"), q, q, plan)
