"""Prefix trees: every common prefix of a micro-batch forwarded once, against each row run alone (fp64, values and
gradients). Batches mix shared system prompts of varying length, shared prompts, completions that branch (tree
rollouts), rows sharing nothing, rows identical end to end and empty completions."""

from __future__ import annotations


import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import shared_prefix as sp
from helpers import (as_batch, causal_attention, features, pack_features, padded, param_grads, rel, stock_logprobs,
                     tiny_model, tree_rows)

pytestmark = pytest.mark.usefixtures("uninitialized_memory_is_nan")


# -- attention alone ----------------------------------------------------------------------------------------------


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 10**6), depth=st.integers(1, 4), hkv=st.sampled_from([1, 2]),
       ratio=st.sampled_from([1, 3]), min_node=st.sampled_from([1, 3]), left_prompt=st.booleans(),
       left_completion=st.booleans(), kernels=st.sampled_from(["cpu_flash", "math"]),
       mode=st.sampled_from(["auto", "split", "fused"]))
def test_attention_matches_each_row_alone(seed, depth, hkv, ratio, min_node, left_prompt, left_completion, kernels,
                                          mode):
    from shared_prefix._kernels import self_calls

    rows = tree_rows(seed, depth)
    pid, pmask, cid, cmask = as_batch(rows, left_prompt, left_completion)
    plan = sp.plan(pid, pmask, cid, cmask, max_depth=depth, min_node_tokens=min_node)
    assert plan.levels <= depth + 1 and plan.num_tokens <= plan.stock_tokens
    hq, dim, scale = hkv * ratio, 8, 0.3
    leaves, per_row = features(rows, hq, hkv, dim, seed)
    lp, lc = pid.shape[1], cid.shape[1]
    packed = pack_features(plan, rows, per_row, lp, lc, left_prompt, left_completion)
    with self_calls(mode):
        out = sp.attention(packed["q"], packed["k"], packed["v"], plan, scale=scale, kernels=kernels)

    # Every row alone; every packed token's output is its rows' (identical where they share it).
    ref = [causal_attention(x["q"], x["k"], x["v"], scale) for x in per_row]
    rp, _ = padded([r[: p.shape[0]] for r, (p, _) in zip(ref, rows)], lp, left_prompt)
    rc, _ = padded([r[p.shape[0]:] for r, (p, _) in zip(ref, rows)], lc, left_completion)
    assert rel(out, plan.pack(rp, rc)[0]) < 1e-12

    # Gradients of a loss on every row's completion outputs, weighted per row: a token several rows share gets
    # each row's weight.
    w = torch.randn(cid.shape + (hq, dim), generator=torch.Generator().manual_seed(seed + 1), dtype=torch.float64)
    ours = plan.unpack_completions(plan.scored_rows(out))
    stock = rc
    assert rel(ours[cmask], stock[cmask]) < 1e-12
    mine = torch.autograd.grad((ours * w).sum(), list(leaves.values()), allow_unused=True)
    theirs = torch.autograd.grad((stock * w).sum(), list(leaves.values()), allow_unused=True)
    for a, b in zip(mine, theirs):
        if b is None:
            assert a is None or a.abs().max() == 0
        else:
            assert rel(a, b) < 1e-10


@pytest.mark.parametrize("kernels", ["cpu_flash", "math"])
def test_attention_sinks_over_a_tree(kernels):
    """Sinks (one logit per head) join the softmax after the merge, whatever the number of levels."""
    rows = tree_rows(8, 4)
    pid, pmask, cid, cmask = as_batch(rows)
    plan = sp.plan(pid, pmask, cid, cmask, max_depth=4, min_node_tokens=1)
    assert plan.levels > 2
    leaves, per_row = features(rows, 4, 2, 8, 9)
    lp, lc = pid.shape[1], cid.shape[1]
    packed = pack_features(plan, rows, per_row, lp, lc)
    sinks = torch.randn(4, generator=torch.Generator().manual_seed(2), dtype=torch.float64).requires_grad_()
    out = sp.attention(packed["q"], packed["k"], packed["v"], plan, scale=0.4, kernels=kernels, sinks=sinks)
    ref = [causal_attention(x["q"], x["k"], x["v"], 0.4, sinks=sinks) for x in per_row]
    rc, _ = padded([r[p.shape[0]:] for r, (p, _) in zip(ref, rows)], lc, False)
    ours = plan.unpack_completions(plan.scored_rows(out))
    assert rel(ours[cmask], rc[cmask]) < 1e-12
    w = torch.randn(ours.shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    wrt = [sinks] + list(leaves.values())
    mine = torch.autograd.grad((ours * w).sum(), wrt, allow_unused=True)
    theirs = torch.autograd.grad((rc * w).sum(), wrt, allow_unused=True)
    for a, b in zip(mine, theirs):
        if b is None:
            assert a is None or a.abs().max() == 0
        else:
            assert rel(a, b) < 1e-10


def test_sharing_beyond_prompts():
    sys_prompt = list(range(1, 41))
    rows = [(torch.tensor(sys_prompt + [50 + i]), torch.tensor([7, 8, 9, 10 + j])) for i in range(4) for j in range(2)]
    pid, pmask, cid, cmask = as_batch(rows)
    by_prompt = sp.plan(pid, pmask, cid, cmask, max_depth=1)
    tree = sp.plan(pid, pmask, cid, cmask, min_node_tokens=3)
    assert by_prompt.levels == 2 and by_prompt.num_tokens == 4 * 41 + 8 * 4
    # The system prompt once; each prompt's last token with its completions' shared start (7 8 9) once per prompt.
    assert tree.num_tokens == 40 + 4 * (1 + 3) + 8 and tree.levels == 3
    nodes = [(n.start, n.tokens, n.rows, n.parent) for n in tree.nodes]
    assert nodes == ([(0, 40, 8, -1)] + [(40 + 4 * i, 4, 2, 0) for i in range(4)]
                     + [(56 + k, 1, 1, 1 + k // 2) for k in range(8)])
    assert [(n.tokens, n.parent) for n in by_prompt.nodes[:4]] == [(41, -1)] * 4
    # A system prompt below the threshold goes to each prompt (no level of its own); a prompt's node stays.
    short = sp.plan(pid, pmask, cid, cmask, min_node_tokens=41)
    assert short.levels == 2 and short.num_tokens == 4 * (41 + 3) + 8


def test_prefix_tree_settings():
    before = sp.set_prefix_tree(max_depth=2, min_node_tokens=5)
    try:
        assert sp.set_prefix_tree() == {"max_depth": 2, "min_node_tokens": 5}
        for bad in (0, -1, 1.5, True, "2"):
            with pytest.raises(ValueError, match="max_depth"):
                sp.set_prefix_tree(max_depth=bad)
            with pytest.raises(ValueError, match="min_node_tokens"):
                sp.plan(*as_batch(tree_rows(0, 2)), min_node_tokens=bad)
    finally:
        sp.set_prefix_tree(**before)


def test_sliding_windows_limit_the_tree_to_two_levels():
    rows = tree_rows(3, 4)
    batch = as_batch(rows)
    deep = sp.plan(*batch, min_node_tokens=1)
    assert deep.levels > 2
    cut = sp.plan(*batch, min_node_tokens=1, windows=[3])  # the window cuts: a tree of two levels
    assert cut.levels == 2 and cut.num_tokens <= sp.plan(*batch, min_node_tokens=1, max_depth=1).num_tokens
    assert sp.plan(*batch, min_node_tokens=1, windows=[10**6]).levels == deep.levels  # it cuts nothing


# -- through a model --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("family", ["llama", "qwen2"])
@pytest.mark.parametrize("depth", [2, 4])
@pytest.mark.parametrize("left_prompt", [True, False])
def test_completion_logprobs_match_each_row_alone(family, depth, left_prompt):
    model = tiny_model(family)
    rows = tree_rows(depth * 7 + left_prompt, depth)
    pid, pmask, cid, cmask = as_batch(rows, left_prompt)
    w = torch.randn(cid.shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    ref, ref_ent = stock_logprobs(model, rows, cid.shape[1], 0.7)
    ref_grads = param_grads(model, (ref * w).sum() + 0.1 * (ref_ent * w).sum())
    lp, ent = sp.completion_logprobs(model, pid, pmask, cid, cmask, temperature=0.7, return_entropy=True,
                                     max_depth=depth, min_node_tokens=1)
    assert (lp - ref).abs().max().item() <= 1e-9 and (ent - ref_ent).abs().max().item() <= 1e-9
    grads = param_grads(model, (lp * w).sum() + 0.1 * (ent * w).sum())
    assert grads.keys() == ref_grads.keys()
    worst = max(rel(grads[n], ref_grads[n]) for n in grads)
    assert worst <= 1e-6, worst
    plan = sp.plan(pid, pmask, cid, cmask, max_depth=depth, min_node_tokens=1)
    assert plan.levels > 2 and plan.num_tokens < sp.plan(pid, pmask, cid, cmask, max_depth=1).num_tokens


@pytest.mark.parametrize("window", [2, 3, 5])
def test_windowed_model_over_a_cut_tree_matches_each_row_alone(window):
    """A window shorter than the rows limits the tree to two levels, whose roots may be prefixes that rows of
    several prompts share (not whole prompts): every completion's window keys still come out exact."""
    model = tiny_model("mistral", sliding_window=window)
    rows = tree_rows(5, 4)
    pid, pmask, cid, cmask = as_batch(rows)
    plan = sp.plan(pid, pmask, cid, cmask, min_node_tokens=1, windows=[window])
    prompts = {tuple(p.tolist()) for p, _ in rows}
    assert plan.levels == 2 and sum(n.parent == -1 for n in plan.nodes) < len(prompts)  # roots shared across prompts
    w = torch.randn(cid.shape, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    ref, ref_ent = stock_logprobs(model, rows, cid.shape[1], 0.9)
    ref_grads = param_grads(model, (ref * w).sum() + 0.1 * (ref_ent * w).sum())
    lp, ent = sp.completion_logprobs(model, pid, pmask, cid, cmask, temperature=0.9, return_entropy=True,
                                     min_node_tokens=1)
    assert (lp - ref).abs().max().item() <= 1e-9 and (ent - ref_ent).abs().max().item() <= 1e-9
    grads = param_grads(model, (lp * w).sum() + 0.1 * (ent * w).sum())
    assert max(rel(grads[n], ref_grads[n]) for n in ref_grads) <= 1e-6
