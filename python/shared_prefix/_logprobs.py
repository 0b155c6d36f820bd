"""Memory-lean completion log-probs: the LM head, temperature, log-softmax and target gather in vocabulary chunks.

With shared prefixes the peak of a step is the LM head over all completion rows: full-vocabulary logits in the
activation dtype, an fp32 copy, and the log-softmax. Here the head runs over slices of the vocabulary (rows of the
head weight): each slice's logits live only while that slice is processed, in forward (which keeps a running
log-sum-exp per row) and again in backward (recomputed), so the full ``[rows, vocab]`` tensor never exists.

Why vocabulary slices rather than row chunks: with row chunks the weight gradient sums over chunks, which needs a
weight-sized fp32 accumulator plus weight-sized temporaries per chunk (about 1.4 GiB at a 152k × 896 head, more
than a chunk's logits). With vocabulary slices each slice of the weight gradient is one GEMM over all rows, written
once, exactly as the stock backward computes it; only the hidden-state gradient ``[rows, hidden]`` (small) sums
over slices, in fp32. The backward is written out (exact, not an approximation) and returns the gradients of the
hidden rows, the head weight (tied embeddings included: autograd adds both uses) and the bias.
"""

from __future__ import annotations

import functools
import math
from typing import Optional

import torch

# Working set per logit of a slice: the logits, their fp32 scaled copy, probabilities and the logits' gradient.
BYTES_PER_LOGIT = 16
# A slice's working set stays within this budget ...
CHUNK_BUDGET_BYTES = 256 * 2**20
# ... and is at most 1/MIN_CHUNKS of the unchunked one, so the head stays a small part of a step's peak on small
# models too; but a slice keeps at least MIN_COLUMNS columns (narrower GEMMs and more launches cost more than they
# save), and below UNCHUNKED_MAX_BYTES the head is not split at all.
MIN_CHUNKS = 8
MIN_COLUMNS = 1024
UNCHUNKED_MAX_BYTES = 32 * 2**20


def auto_chunk_columns(rows: int, vocab: int) -> int:
    """Vocabulary columns per slice for ``rows`` rows; ``vocab`` (one slice, plain autograd) for small heads."""
    if rows * vocab * BYTES_PER_LOGIT <= UNCHUNKED_MAX_BYTES:
        return vocab
    cols = min(CHUNK_BUDGET_BYTES // (BYTES_PER_LOGIT * max(rows, 1)), math.ceil(vocab / MIN_CHUNKS))
    return min(vocab, max(MIN_COLUMNS, cols))


def _accum(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _scaled_logits(h, weight, bias, lo, hi, temperature):
    """fp32 (fp64) ``logits / T`` of vocabulary columns ``[lo, hi)``, computed as the stock head computes them; and
    the logits' dtype (the activation dtype, or autocast's)."""
    logits = torch.nn.functional.linear(h, weight[lo:hi], None if bias is None else bias[lo:hi])
    u = logits.to(_accum(logits.dtype))  # a fresh tensor either way (the linear's output or its upcast)
    return (u.div_(temperature) if temperature != 1.0 else u), logits.dtype


def _in_slice(targets, lo, hi):
    """Which rows' targets fall in ``[lo, hi)``, and their column within the slice (clamped elsewhere)."""
    inside = (targets >= lo) & (targets < hi)
    return inside, (targets - lo).clamp_(0, hi - lo - 1)


@functools.cache
def _cuda_mm_out_dtype(dtype: torch.dtype) -> bool:
    """Whether this build's CUDA matmul takes fp16/bf16 operands with an fp32 output (``out_dtype``)."""
    try:
        one = torch.ones(1, 1, device="cuda", dtype=dtype)
        return torch.mm(one, one, out_dtype=torch.float32).dtype == torch.float32
    except (RuntimeError, TypeError):
        return False


def _add_mm(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """``acc += a @ b`` with the products summed in ``acc``'s dtype (fp32/fp64), not rounded to ``a``'s first."""
    if a.dtype == acc.dtype:
        acc.addmm_(a, b)
    elif a.is_cuda and _cuda_mm_out_dtype(a.dtype):
        acc += torch.mm(a, b, out_dtype=acc.dtype)
    else:  # fp16/bf16 on CPU (no such matmul there): upcast the slice; its fp32 copy is within the slice budget
        acc.addmm_(a.to(acc.dtype), b.to(acc.dtype))


class _ChunkedLogprobs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, temperature, cols, with_entropy):  # type: ignore[override]
        # Under autocast the head runs in autocast's dtype; backward recomputes under the same autocast state.
        device_type = hidden.device.type
        ctx.autocast = (device_type, torch.is_autocast_enabled(device_type), torch.get_autocast_dtype(device_type))
        n, vocab = hidden.shape[0], weight.shape[0]
        acc = _accum(torch.promote_types(hidden.dtype, weight.dtype))
        lse = hidden.new_full((n,), -math.inf, dtype=acc)
        target_u = hidden.new_zeros(n, dtype=acc)
        mean_u = hidden.new_zeros(n if with_entropy else 0, dtype=acc)  # E_p[u] over the slices so far
        for lo in range(0, vocab, cols):
            hi = min(lo + cols, vocab)
            u, _ = _scaled_logits(hidden, weight, bias, lo, hi, temperature)
            inside, col = _in_slice(targets, lo, hi)
            target_u = torch.where(inside, u.gather(-1, col[:, None])[:, 0], target_u)
            slice_lse = torch.logsumexp(u, -1)
            new_lse = torch.logaddexp(lse, slice_lse)
            if with_entropy:
                # Slice-local E[u], then a weighted merge with the running one: weights are the slices' shares of Z.
                slice_mean = torch.exp(u - slice_lse[:, None]).mul_(u).sum(-1)
                mean_u = mean_u * torch.exp(lse - new_lse) + slice_mean * torch.exp(slice_lse - new_lse)
            lse = new_lse
        picked = target_u - lse
        entropy = lse - mean_u if with_entropy else mean_u  # H = -Σ p (u - lse) = lse - E_p[u]
        ctx.save_for_backward(hidden, weight, bias, targets, lse, entropy)
        ctx.temperature, ctx.cols, ctx.with_entropy = temperature, cols, with_entropy
        if not with_entropy:
            ctx.mark_non_differentiable(entropy)
        return picked, entropy

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g_picked, g_entropy):  # type: ignore[override]
        device_type, autocast_on, autocast_dtype = ctx.autocast
        with torch.autocast(device_type, dtype=autocast_dtype, enabled=autocast_on):
            return _ChunkedLogprobs._backward(ctx, g_picked, g_entropy)

    @staticmethod
    def _backward(ctx, g_picked, g_entropy):
        hidden, weight, bias, targets, lse, entropy = ctx.saved_tensors
        t, cols = ctx.temperature, ctx.cols
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        vocab = weight.shape[0]
        use_entropy = ctx.with_entropy and g_entropy is not None
        # The hidden-state gradient sums over slices: in fp32 (fp64), rounded once at the end. Every row of the
        # weight (bias) gradient is written by exactly one slice.
        dh = torch.zeros_like(hidden, dtype=lse.dtype) if need_h else None
        dw = torch.empty_like(weight) if need_w else None
        db = torch.empty_like(bias) if (need_b and bias is not None) else None
        gp = g_picked[:, None].to(lse.dtype)
        h_cast = None
        for lo in range(0, vocab, cols):
            hi = min(lo + cols, vocab)
            u, logits_dtype = _scaled_logits(hidden, weight, bias, lo, hi, t)
            logp = u.sub_(lse[:, None])
            p = logp.exp()
            if use_entropy:
                # H = -Σ p log p;  dH/du_j = -p_j (log p_j + H). Computed in logp's buffer.
                ent_term = logp.add_(entropy[:, None]).mul_(p).mul_(g_entropy[:, None])
            # d picked / d u = onehot - p, with u = logits / T. Computed in p's buffer.
            inside, col = _in_slice(targets, lo, hi)
            du = p.mul_(-gp).scatter_add_(-1, col[:, None], gp * inside[:, None])
            if use_entropy:
                du.sub_(ent_term)
            # Back through the fp32 upcast and 1/T: the gradient reaches the logits in their own dtype.
            dz = (du.div_(t) if t != 1.0 else du).to(logits_dtype)
            if dh is not None:
                _add_mm(dh, dz, weight[lo:hi].to(logits_dtype))
            if dw is not None:
                if h_cast is None:
                    h_cast = hidden.to(logits_dtype)
                if dw.dtype == dz.dtype:
                    torch.mm(dz.t(), h_cast, out=dw[lo:hi])  # a contiguous block of rows: written in place
                else:  # fp32 master weights under autocast
                    dw[lo:hi] = dz.t() @ h_cast
            if db is not None:
                db[lo:hi] = dz.sum(0)
        dh = dh.to(hidden.dtype) if dh is not None else None
        return dh, dw, db, None, None, None, None


def token_logprobs(
    logits: torch.Tensor, targets: torch.Tensor, temperature: float, with_entropy: bool
) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """log_softmax(logits / temperature) at ``targets``, in fp32 (fp64 for fp64 logits); optionally the entropy."""
    acc = torch.float64 if logits.dtype == torch.float64 else torch.float32
    logp = torch.log_softmax(logits.to(acc) / temperature, dim=-1)
    picked = logp.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    entropy = -(logp.exp() * logp).sum(-1) if with_entropy else None
    return picked, entropy


def _check_targets(targets: torch.Tensor, vocab: int) -> None:
    # The slices only gather targets that fall inside them, so an out-of-range id must be caught here rather than
    # by a gather. On CUDA the check is an asynchronous device assert (no host sync).
    ok = ((targets >= 0) & (targets < vocab)).all()
    if targets.device.type == "cuda":
        torch._assert_async(ok, f"targets: token ids must lie in [0, {vocab})")
    elif not bool(ok):
        raise ValueError(f"targets: token ids must lie in [0, {vocab}) (the LM head's vocabulary)")


def linear_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    targets: torch.Tensor,
    temperature: float,
    with_entropy: bool,
    chunk_size: Optional[int] = None,
) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """``log_softmax((hidden @ weight.T + bias) / T)`` at ``targets`` (and the entropy), for rows ``hidden [N, H]``.

    ``chunk_size`` vocabulary columns per slice; ``None`` picks one from the row count and vocabulary size.
    """
    if chunk_size is None:
        chunk_size = auto_chunk_columns(hidden.shape[0], weight.shape[0])
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size: expected a positive int or None, got {chunk_size!r}")
    _check_targets(targets, weight.shape[0])
    if chunk_size >= weight.shape[0]:
        # One slice holds the whole vocabulary: plain autograd keeps the same peak without recomputing the head.
        return token_logprobs(torch.nn.functional.linear(hidden, weight, bias), targets, temperature, with_entropy)
    picked, entropy = _ChunkedLogprobs.apply(hidden, weight, bias, targets, float(temperature), chunk_size, with_entropy)
    return picked, (entropy if with_entropy else None)


def head_logprobs(
    hidden: torch.Tensor,
    head: torch.nn.Module,
    targets: torch.Tensor,
    temperature: float,
    with_entropy: bool,
    chunk_size: Optional[int] = None,
) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """:func:`linear_logprobs` through an LM head, which must be a ``torch.nn.Linear`` (every supported model's)."""
    if not isinstance(head, torch.nn.Linear):
        raise TypeError(f"model: the LM head is a {type(head).__name__}, expected torch.nn.Linear")
    return linear_logprobs(hidden, head.weight, head.bias, targets, temperature, with_entropy, chunk_size)
