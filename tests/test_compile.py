"""torch.compile over planned forwards, and the attention ops as torch sees them (``torch.library.opcheck``): no
graph break in attention, results equal to eager and to each row run alone, one graph for every ragged step."""

from __future__ import annotations

import gc
import random

import pytest
import torch
import torch._dynamo
from torch._dynamo.utils import counters

import shared_prefix as sp
from shared_prefix.hf.registry import NAME, attention_implementation
from helpers import VOCAB, as_batch, padded, param_grads, rel, stock_logprobs, tiny_model, tree_rows

FORWARD = torch.ops.shared_prefix.attention_forward.default
BACKWARD = torch.ops.shared_prefix.attention_backward.default
# A window of 6 cuts the long batches' rows and none of the short batches'.
FAMILIES = {"qwen2": {}, "llama": {}, "mistral": {"sliding_window": 6}}


def ragged_batch(seed: int, short: bool):
    """Grouped rows of random lengths (a shared prompt per group, ragged completions) with at least two completion
    tokens in all; ``short``: every row at most 5 tokens, else rows up to 19."""
    g, ids = random.Random(seed), torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(g.randint(1, 3)):
        prompt = torch.randint(1, VOCAB, (g.randint(1, 3) if short else g.randint(2, 12),), generator=ids)
        for _ in range(g.randint(1, 4)):
            n = g.randint(1, 2) if short else g.randint(1, 7)
            rows.append((prompt, torch.randint(1, VOCAB, (n,), generator=ids)))
    if sum(c.shape[0] for _, c in rows) == 1:  # a size-1 dim is one more graph (dynamo's 0/1 specialization)
        rows.append((rows[0][0], torch.randint(1, VOCAB, (1,), generator=ids)))
    pid, pmask = padded([p for p, _ in rows], max(p.shape[0] for p, _ in rows) + g.randint(0, 2), True)
    cid, cmask = padded([c for _, c in rows], max(c.shape[0] for _, c in rows) + g.randint(0, 2), False)
    return rows, pid, pmask.long(), cid, cmask.long()


def op_inputs(dtype, window=None, sinks=False, hkv=2, tree=False):
    # A prefix tree (system prompts, branching completions) or ragged groups sharing whole prompts.
    pid, pmask, cid, cmask = as_batch(tree_rows(1, 3)) if tree else ragged_batch(5, short=False)[1:]
    plan = sp.plan(pid, pmask, cid, cmask, windows=[window] if window else None, min_node_tokens=1,
                   max_depth=4 if tree else 1)
    assert (plan.levels > 2 if tree else plan.levels == 2) and (window is None or plan.windows == [window])
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(plan.num_tokens, h, 8, generator=g, dtype=dtype).requires_grad_() for h in (4, hkv, hkv))
    s = torch.randn(4, generator=g, dtype=dtype).requires_grad_() if sinks else None
    return (q, k, v, plan.handle, 8 ** -0.5, None, window, s)


OP_CASES = {"fp64": dict(dtype=torch.float64), "fp32-mha": dict(dtype=torch.float32, hkv=4),
            "window": dict(dtype=torch.float64, window=4), "sinks": dict(dtype=torch.float64, sinks=True),
            "tree": dict(dtype=torch.float64, tree=True)}


@pytest.mark.parametrize("case", OP_CASES)
def test_opcheck_forward_and_backward_ops(case):
    """Schema, fake implementation (FakeTensor and dynamic-shape AOT tracing) and autograd registration."""
    args = op_inputs(**OP_CASES[case])
    torch.library.opcheck(FORWARD, args)
    q, k, v, plan, scale, kernels, window, sinks = (a.detach() if isinstance(a, torch.Tensor) else a for a in args)
    out, lse = FORWARD(q, k, v, plan, scale, kernels, window, sinks)
    torch.library.opcheck(BACKWARD, (torch.randn_like(out), q, k, v, out, lse, plan, scale, kernels, window, sinks))


@pytest.mark.parametrize("case", OP_CASES)
def test_fake_outputs_are_the_kernels(case):
    """The fake implementations give exactly the real outputs' shapes, dtypes and strides (fp32 log-sum-exp for
    fp32, fp64 for fp64), forward and backward: a compiled graph plans its views on them."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    args = tuple(a.detach() if isinstance(a, torch.Tensor) else a for a in op_inputs(**OP_CASES[case]))
    out, lse = FORWARD(*args)
    back = (torch.randn_like(out), *args[:3], out, lse, *args[3:])
    for op, inputs in ((FORWARD, args), (BACKWARD, back)):
        real = op(*inputs)
        with FakeTensorMode(allow_non_fake_inputs=True) as mode:
            fake = op(*(mode.from_tensor(a) if isinstance(a, torch.Tensor) else a for a in inputs))
        assert [(t.shape, t.dtype, t.stride()) for t in fake] == [(t.shape, t.dtype, t.stride()) for t in real]


def test_the_ops_check_their_inputs_naming_the_argument():
    """The ops' kernels are the one home of the value checks: called directly (as a compiled graph or another
    library would), bad values get the Python exception that names the argument."""
    q, k, v, handle, scale, _, _, sinks = (a.detach() if isinstance(a, torch.Tensor) else a
                                           for a in op_inputs(torch.float64, sinks=True))
    out, lse = FORWARD(q, k, v, handle, scale, None, None, sinks)
    cases = [
        (ValueError, "q: expected a packed", (q[0], k, v, handle, scale, None, None, None)),
        (ValueError, "q: has 3 tokens", (q[:3], k, v, handle, scale, None, None, None)),
        (TypeError, "k: dtype", (q, k.float(), v, handle, scale, None, None, None)),
        (TypeError, "v: expected float16, bfloat16, float32 or float64", (q, k, v.long(), handle, scale, None,
                                                                         None, None)),
        (ValueError, "k: 3 key/value heads", (q, torch.cat([k, k[:, :1]], 1), torch.cat([v, v[:, :1]], 1), handle,
                                              scale, None, None, None)),
        (ValueError, "scale: must be a finite positive number", (q, k, v, handle, -1.0, None, None, None)),
        (ValueError, "scale: must be a finite positive number", (q, k, v, handle, float("nan"), None, None, None)),
        (ValueError, "window: expected a positive int", (q, k, v, handle, scale, None, 0, None)),
        (ValueError, "window: the plan holds no key tables for a sliding window of 2", (q, k, v, handle, scale,
                                                                                        None, 2, None)),
        (ValueError, "sinks: expected a float \\[Hq\\] tensor", (q, k, v, handle, scale, None, None, sinks[:2])),
        (ValueError, "sinks: expected a float \\[Hq\\] tensor", (q, k, v, handle, scale, None, None, sinks.long())),
        (ValueError, "kernels: \"nope\"", (q, k, v, handle, scale, "nope", None, None)),
    ]
    for error, match, args in cases:
        with pytest.raises(error, match=match):
            FORWARD(*args)
    with pytest.raises(ValueError, match="lse: expected a float"):
        BACKWARD(out, q, k, v, out, lse[:, :1], handle, scale, None, None, sinks)
    with pytest.raises(ValueError, match="dout: expected q's shape"):
        BACKWARD(out[:, :1], q, k, v, out, lse, handle, scale, None, None, sinks)
    with pytest.raises(ValueError, match="out: expected q's shape"):
        BACKWARD(out, q, k, v, out.float(), lse, handle, scale, None, None, sinks)


def test_a_plan_lives_while_autograd_holds_its_handle():
    """The handle's storage owns the plan: backward after the plan object is gone still finds it; a tensor that
    merely copies a handle's value is refused once the plan is freed (never a dangling plan)."""
    args = op_inputs(torch.float64)
    q, k, v, handle = args[:4]
    copy = handle.clone()
    out, _ = FORWARD(*args)
    del args, handle  # the only other reference is autograd's saved one
    gc.collect()
    out.sum().backward()
    assert q.grad is not None and torch.isfinite(q.grad).all()
    del out
    gc.collect()
    with pytest.raises(ValueError, match="plan: not the handle of a live plan"):
        FORWARD(q.detach(), k.detach(), v.detach(), copy, 0.3, None, None, None)
    with pytest.raises(ValueError, match="plan: expected a plan's handle"):
        FORWARD(q.detach(), k.detach(), v.detach(), torch.zeros(2), 0.3, None, None, None)


def _explain(model, **inputs):
    torch._dynamo.reset()
    return torch._dynamo.explain(model)(**inputs, use_cache=False)


@pytest.mark.parametrize("family", FAMILIES)
def test_compiled_packed_forward_breaks_no_more_than_stock(family):
    """``torch._dynamo.explain`` over a planned forward: no more graph breaks or graphs than the stock SDPA
    forward of the same rows, with one shared-prefix attention op per layer in the graph."""
    model = tiny_model(family, dtype=torch.float32, **FAMILIES[family])
    _, pid, pmask, cid, cmask = ragged_batch(0, short=False)
    forward = sp.hf.PackedForward.prepare(model, pid, pmask, cid, cmask)
    with attention_implementation(model, NAME):
        ours = _explain(model, **forward.inputs(1.0))
    stock = _explain(model, input_ids=torch.cat([pid, cid], 1), attention_mask=torch.cat([pmask, cmask], 1))
    assert ours.graph_break_count <= stock.graph_break_count and ours.graph_count <= stock.graph_count
    ops = sum(str(g.code).count("shared_prefix.attention_forward") for g in ours.graphs)
    assert ops == model.config.num_hidden_layers


@pytest.mark.parametrize("how", ["model.compile", "torch.compile"])
@pytest.mark.parametrize("family", FAMILIES)
def test_compiled_training_steps_equal_eager_and_stock_in_one_graph(family, how):
    """20 ragged steps (long and short rows alternating, so the window cuts some batches and not others) through
    ``completion_logprobs`` on a compiled model: log-probs, entropies and every parameter's gradient equal eager's
    and each row's alone (fp64), all in the one graph compiled at the first step."""
    eager = tiny_model(family, **FAMILIES[family])
    compiled = tiny_model(family, **FAMILIES[family])
    torch._dynamo.reset()
    counters.clear()
    if how == "model.compile":
        compiled.compile(backend="aot_eager")  # AOT autograd: the fake implementations and the registered backward
        run = compiled
    else:
        run = torch.compile(compiled, backend="aot_eager")
    cut = set()
    for step in range(20):
        rows, pid, pmask, cid, cmask = ragged_batch(step, short=step % 2 == 1)
        cut.add(max(p.shape[0] + c.shape[0] for p, c in rows) > 6)
        w = torch.randn(cid.shape, generator=torch.Generator().manual_seed(step), dtype=torch.float64)
        results = []
        for m, weights in ((eager, eager), (run, compiled)):
            lp, ent = sp.completion_logprobs(m, pid, pmask, cid, cmask, temperature=0.7, return_entropy=True)
            results.append((lp, ent, param_grads(weights, (lp * w).sum() + 0.1 * (ent * w).sum())))
        (lp_e, ent_e, g_e), (lp_c, ent_c, g_c) = results
        assert torch.equal(lp_c, lp_e) and torch.equal(ent_c, ent_e)
        assert g_c.keys() == g_e.keys() and all(torch.equal(g_c[n], g_e[n]) for n in g_e)
        if step < 4:
            ref, ref_ent = stock_logprobs(eager, rows, cid.shape[1], 0.7)
            assert (lp_c - ref).abs().max().item() <= 1e-9 and (ent_c - ref_ent).abs().max().item() <= 1e-9
            ref_grads = param_grads(eager, (ref * w).sum() + 0.1 * (ref_ent * w).sum())
            assert max(rel(g_c[n], ref_grads[n]) for n in ref_grads) <= 1e-6
    assert counters["stats"]["unique_graphs"] == 1, dict(counters["stats"])
    assert cut == {True, False}


def test_inductor_compiled_steps_match_eager():
    """The default backend (inductor, its own kernels around ours) over three ragged steps: within fp32 rounding."""
    eager = tiny_model("qwen2", dtype=torch.float32)
    compiled = tiny_model("qwen2", dtype=torch.float32)
    torch._dynamo.reset()
    counters.clear()
    compiled.compile()
    for step in range(3):
        _, pid, pmask, cid, cmask = ragged_batch(step, short=False)
        out = []
        for m in (eager, compiled):
            lp = sp.completion_logprobs(m, pid, pmask, cid, cmask)
            out.append((lp, param_grads(m, lp.sum())))
        assert (out[0][0] - out[1][0]).abs().max().item() <= 1e-5
        assert max(rel(out[1][1][n], g) for n, g in out[0][1].items()) <= 1e-5
    assert counters["stats"]["unique_graphs"] == 1
