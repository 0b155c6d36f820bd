"""Chunked (memory-lean) log-probs against the unchunked stock computation: values and gradients, fp64."""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import shared_prefix as sp
from shared_prefix._logprobs import head_logprobs, token_logprobs
from shared_prefix.bench.measure import peak_memory_bytes
from helpers import head_leaves, make_batch, param_grads, stock_logprobs, tiny_model

# Fresh empty tensors are NaN-filled in every test here (conftest.py): the head's weight and bias gradients are
# allocated empty and written slice by slice, so a slice left unwritten fails instead of passing by luck.
pytestmark = pytest.mark.usefixtures("uninitialized_memory_is_nan")


@pytest.mark.parametrize("chunk", [1, 4, 7, 23, 100, None])
@pytest.mark.parametrize("bias", [False, True])
def test_chunked_matches_unchunked(chunk, bias):
    h, head, targets = head_leaves(bias=bias)
    w1, w2 = torch.randn(23, dtype=torch.float64), torch.randn(23, dtype=torch.float64)
    params = [h, head.weight] + ([head.bias] if bias else [])

    lp, ent = head_logprobs(h, head, targets, 0.7, True, chunk)
    got = torch.autograd.grad((lp * w1).sum() + (ent * w2).sum(), params)
    ref_lp, ref_ent = token_logprobs(head(h), targets, 0.7, True)
    want = torch.autograd.grad((ref_lp * w1).sum() + (ref_ent * w2).sum(), params)
    assert (lp - ref_lp).abs().max() < 1e-12 and (ent - ref_ent).abs().max() < 1e-12
    for a, b in zip(got, want):
        assert ((a - b).norm() / b.norm()).item() < 1e-12


def test_without_entropy_and_partial_grads():
    h, head, targets = head_leaves(bias=False)
    head.weight.requires_grad_(False)
    lp, ent = head_logprobs(h, head, targets, 1.0, False, 5)
    assert ent is None and lp.dtype == torch.float64
    (g,) = torch.autograd.grad(lp.sum(), [h])
    (want,) = torch.autograd.grad(token_logprobs(head(h), targets, 1.0, False)[0].sum(), [h])
    assert ((g - want).norm() / want.norm()).item() < 1e-12


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_half_head_close_to_unchunked(dtype, temperature):
    h, head, targets = head_leaves(n=64, hidden=32, vocab=301, bias=False, dtype=dtype)
    lp, _ = head_logprobs(h, head, targets, temperature, False, 8)
    assert lp.dtype == torch.float32
    ref, _ = token_logprobs(head(h), targets, temperature, False)
    assert (lp - ref).abs().max().item() < 1e-5  # same half-precision logits, same fp32 softmax
    (g,) = torch.autograd.grad(lp.sum(), [head.weight])
    (want,) = torch.autograd.grad(ref.sum(), [head.weight])
    assert ((g.float() - want.float()).norm() / want.float().norm()).item() < 1e-2


def test_peak_memory_drops():
    """The full [rows, vocab] fp32 logits never exist at once: peak is a chunk's, not all rows'."""
    h, head, targets = head_leaves(n=512, hidden=64, vocab=16384, bias=False, dtype=torch.float32)
    h = h.detach().requires_grad_()

    def chunked():
        head_logprobs(h, head, targets, 0.9, True, 32)[0].sum().backward()

    def full():
        token_logprobs(head(h), targets, 0.9, True)[0].sum().backward()

    logits_bytes = 512 * 16384 * 4
    lean, stock = peak_memory_bytes(chunked, torch.device("cpu")), peak_memory_bytes(full, torch.device("cpu"))
    assert stock > 2 * logits_bytes  # the stock path holds several full-vocabulary tensors
    assert lean < 0.25 * stock, (lean, stock)


def test_tied_embeddings_model_chunked():
    """A tied head (the embedding matrix): chunked log-probs and gradients equal the stock per-row model's."""
    model = tiny_model("gemma")  # tie_word_embeddings=True in the test models
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight
    rows, pid, pmask, cid, cmask = make_batch(seed=7)
    ref, ref_ent = stock_logprobs(model, rows, cid.shape[1], 1.3)
    ref_grads = param_grads(model, ref.sum() + ref_ent.sum())
    lp, ent = sp.completion_logprobs(model, pid, pmask, cid, cmask, temperature=1.3, return_entropy=True, chunk_size=3)
    assert (lp - ref).abs().max().item() <= 1e-9 and (ent - ref_ent).abs().max().item() <= 1e-9
    grads = param_grads(model, lp.sum() + ent.sum())
    assert max(((grads[n] - ref_grads[n]).norm() / ref_grads[n].norm()).item() for n in grads) <= 1e-6


def test_bad_chunk_size():
    h, head, targets = head_leaves()
    for bad in (0, -3, 2.5, True):
        with pytest.raises(ValueError, match="chunk_size"):
            head_logprobs(h, head, targets, 1.0, False, bad)
    with pytest.raises(TypeError, match="LM head"):
        head_logprobs(h, torch.nn.Sequential(head), targets, 1.0, False, 4)


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_autocast_backward_recomputes_like_forward(temperature):
    """Under autocast the head runs in bf16; the chunked backward must differentiate that same computation (bf16
    logits), not an fp32 recompute of it. Reference: the fp64 gradient of the bf16 computation (bf16 operands,
    bf16-rounded logits). Plain autograd is within bf16 rounding of the logits' gradient (~2e-3) of it; a backward
    that recomputed the logits in fp32 is off by ~0.2 at these logit magnitudes."""
    h, head, targets = head_leaves(n=24, hidden=32, vocab=211, bias=False, dtype=torch.float32)
    with torch.no_grad():
        head.weight.mul_(10)  # large logits, so their bf16 rounding changes the softmax visibly
    w = torch.randn(24, generator=torch.Generator().manual_seed(5))

    def grads(chunk):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            lp, _ = head_logprobs(h, head, targets, temperature, False, chunk)
        return torch.autograd.grad((lp * w).sum(), [h, head.weight])

    hb, wb = h.detach().bfloat16().double(), head.weight.detach().bfloat16().double()
    p = torch.softmax((hb @ wb.t()).bfloat16().double() / temperature, -1)
    dz = (torch.nn.functional.one_hot(targets, 211).double() - p) * w.double()[:, None] / temperature
    want = (dz @ wb, dz.t() @ hb)

    def rel(a, b):
        return ((a.double() - b).norm() / b.norm()).item()

    for chunked, plain, ref in zip(grads(5), grads(1000), want):  # 1000 columns: one slice, plain autograd
        assert rel(plain, ref) < 5e-3
        assert rel(chunked, ref) < 5e-3


def test_weight_gradient_is_the_only_weight_sized_tensor():
    """bf16 head: each slice of the weight gradient is written once, with no fp32 weight-sized accumulator or
    temporaries (row chunks needed about 4× the weight's bytes on top of its gradient)."""
    h, head, targets = head_leaves(n=64, hidden=64, vocab=65536, bias=False, dtype=torch.bfloat16)
    h = h.detach().requires_grad_()
    weight_bytes = head.weight.numel() * 2

    def chunked():
        head_logprobs(h, head, targets, 1.0, True, 4096)[0].sum().backward()

    slice_bytes = 64 * 4096 * 16
    peak = peak_memory_bytes(chunked, torch.device("cpu"))
    assert peak < weight_bytes + 3 * slice_bytes, (peak, weight_bytes)


def test_targets_out_of_vocabulary():
    h, head, targets = head_leaves()
    for bad in (97, -1):
        t = targets.clone()
        t[3] = bad
        for chunk in (4, None):
            with pytest.raises(ValueError, match="targets"):
                head_logprobs(h, head, t, 1.0, False, chunk)


@pytest.mark.parametrize("scale,temperature", [(3.0, 0.3), (30.0, 1.0), (100.0, 0.5)])
def test_entropy_keeps_precision_when_peaked(scale, temperature):
    """fp32, peaked distributions (large logits, low temperature): the sliced entropy and its gradient are as close
    to fp64 as the plain fp32 path's, and never negative (lse - E_p[logit] would cancel here)."""
    h64, head64, targets = head_leaves(n=8, hidden=16, vocab=4096, bias=True, seed=3)
    with torch.no_grad():
        head64.weight.mul_(scale / 4)  # logits ~ N(0, scale²)
    w = torch.randn(8, dtype=torch.float64, generator=torch.Generator().manual_seed(4))

    def run(h, head, chunk):
        lp, ent = head_logprobs(h, head, targets, temperature, True, chunk)
        (g,) = torch.autograd.grad((ent * w.to(ent)).sum() + (lp * w.to(lp)).sum(), [h])
        return ent.detach().double(), g.double()

    ref_ent, ref_g = run(h64, head64, None)
    h32, head32 = h64.detach().float().requires_grad_(), torch.nn.Linear(16, 4096).float()
    with torch.no_grad():
        head32.weight.copy_(head64.weight)
        head32.bias.copy_(head64.bias)
    (ent_s, g_s), (ent_p, g_p) = run(h32, head32, 512), run(h32, head32, None)
    assert (ent_s >= 0).all()
    err = lambda a, b: (a - b).abs().max().item()  # noqa: E731
    assert err(ent_s, ref_ent) <= 2 * err(ent_p, ref_ent) + 1e-6, (err(ent_s, ref_ent), err(ent_p, ref_ent))
    assert err(g_s, ref_g) <= 2 * err(g_p, ref_g) + 1e-6 * ref_g.abs().max().item()


def test_entropy_only_and_unused_outputs():
    """Gradient through the entropy alone (log-probs unused), and through the log-probs alone with the entropy
    computed but unused: both equal the plain path's."""
    h, head, targets = head_leaves()
    for use_lp, use_ent in ((False, True), (True, False)):
        def loss(lp, ent):
            return (lp.sum() if use_lp else 0) + ((ent * ent).sum() if use_ent else 0)

        got = torch.autograd.grad(loss(*head_logprobs(h, head, targets, 0.8, True, 9)), [h, head.weight])
        want = torch.autograd.grad(loss(*token_logprobs(head(h), targets, 0.8, True)), [h, head.weight])
        for a, b in zip(got, want):
            assert ((a - b).norm() / b.norm()).item() < 1e-12


def test_double_backward_refused():
    h, head, targets = head_leaves()
    lp, _ = head_logprobs(h, head, targets, 1.0, False, 9)
    with pytest.raises(RuntimeError, match="double backward"):
        torch.autograd.grad(lp.sum(), [h], create_graph=True)


def test_bad_shapes():
    h, head, targets = head_leaves()
    with pytest.raises(ValueError, match="hidden"):
        head_logprobs(h[None], head, targets, 1.0, False, 9)
    with pytest.raises(ValueError, match="targets"):
        head_logprobs(h, head, targets[:-1], 1.0, False, 9)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    n=st.integers(1, 40), hidden=st.integers(1, 12), vocab=st.integers(2, 300), chunk=st.integers(1, 310),
    temperature=st.sampled_from([0.3, 0.7, 1.0, 2.0]), bias=st.booleans(),
    entropy=st.sampled_from(["off", "unused", "used"]), logit_scale=st.sampled_from([0.1, 1.0, 10.0]),
    seed=st.integers(0, 2**16),
)
def test_slices_match_plain_autograd(n, hidden, vocab, chunk, temperature, bias, entropy, logit_scale, seed):
    """Random shapes and slice widths (dividing the vocabulary or not, wider than it or 1), fp64: values, entropies
    and the gradients of hidden rows, weight and bias equal plain autograd's."""
    h, head, targets = head_leaves(n=n, hidden=hidden, vocab=vocab, bias=bias, seed=seed)
    with torch.no_grad():
        head.weight.mul_(logit_scale)
    g = torch.Generator().manual_seed(seed + 1)
    w1, w2 = torch.randn(n, generator=g, dtype=torch.float64), torch.randn(n, generator=g, dtype=torch.float64)
    params = [h, head.weight] + ([head.bias] if bias else [])
    with_entropy = entropy != "off"

    def loss(lp, ent):
        return (lp * w1).sum() + ((ent * w2).sum() if entropy == "used" else 0)

    lp, ent = head_logprobs(h, head, targets, temperature, with_entropy, chunk)
    got = torch.autograd.grad(loss(lp, ent), params)
    ref_lp, ref_ent = token_logprobs(head(h), targets, temperature, with_entropy)
    want = torch.autograd.grad(loss(ref_lp, ref_ent), params)
    assert (lp - ref_lp).abs().max().item() < 1e-10
    if with_entropy:
        assert (ent - ref_ent).abs().max().item() < 1e-10
    for a, b in zip(got, want):
        # Relative, with an absolute floor: a saturated softmax (p ~ e^-100) leaves gradients of 1e-50 whose last
        # digits depend on the order of operations.
        assert (a - b).norm().item() <= 1e-10 * b.norm().item() + 1e-12
