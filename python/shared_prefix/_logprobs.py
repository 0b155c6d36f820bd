"""Memory-lean completion log-probs: the LM head, temperature, log-softmax and target gather in vocabulary chunks.

With shared prefixes the peak of a step is the LM head over all completion rows: full-vocabulary logits in the
activation dtype, an fp32 copy, and the log-softmax. Here the head runs over slices of the vocabulary (rows of the
head weight): each slice's logits live only while that slice is processed, in forward (which keeps a running max
and two running sums per row) and again in backward (recomputed), so the full ``[rows, vocab]`` tensor never
exists.

Why vocabulary slices rather than row chunks: with row chunks the weight gradient sums over chunks, which needs a
weight-sized fp32 accumulator plus weight-sized temporaries per chunk (by their sizes, 1.4 GiB at a bf16
152k × 896 head: more than a chunk's logits). With vocabulary slices each slice of the weight gradient is one GEMM
over all rows, written once, exactly as the stock backward computes it; only the hidden-state gradient
``[rows, hidden]`` (small) sums over slices, in fp32. The backward is written out (exact, not an approximation) and
returns the gradients of the hidden rows, the head weight (tied embeddings included: autograd adds both uses) and
the bias.
"""

from __future__ import annotations

import functools
import math
from typing import Optional

import torch

# Working set per logit of a slice: the logits, their fp32 scaled copy, probabilities and the logits' gradient.
BYTES_PER_LOGIT = 16
# A slice's working set stays within this budget. Every slice also costs host time for its small ops, which a
# host-bound GPU step feels, so the budget trades peak memory for fewer slices (a 152k vocabulary at 4096 rows:
# 19 slices) ...
CHUNK_BUDGET_BYTES = 512 * 2**20
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
    acc = _accum(logits.dtype)
    if logits.dtype != acc and temperature != 1.0 and logits.is_cuda:
        # On CUDA, upcast and divide in one pass: a one-element fp32 divisor promotes the fp16/bf16 logits (a Python
        # scalar would keep their dtype). The CPU kernel would make an fp32 copy first, so it takes the two steps.
        return torch.div(logits, logits.new_full((1,), temperature, dtype=acc)), logits.dtype
    u = logits.to(acc)  # the linear's fresh output itself when already fp32/fp64: divided in place
    return (u.div_(temperature) if temperature != 1.0 else u), logits.dtype


def _slice_targets(targets, cols):
    """Each target's slice (slice i holds columns ``[i·cols, (i+1)·cols)``) and its column there as ``[rows, 1]``,
    once for all slices: a slice's ops are small, so on a GPU their count (host time) is what a slice costs."""
    slice_of = torch.div(targets, cols, rounding_mode="floor")
    return slice_of, (targets - slice_of * cols)[:, None]


def _in_slice(slice_of, col, i, width, cols):
    """Which rows' targets fall in slice ``i`` (``width`` columns), and their column there, clamped into the slice
    for the other rows (only the last slice can be narrower than ``cols``)."""
    return slice_of == i, (col if width == cols else col.clamp(max=width - 1))


@functools.cache
def _cuda_mm_out_dtype(dtype: torch.dtype, device: torch.device) -> bool:
    """Whether this build and device take fp16/bf16 CUDA matmul operands with an fp32 output (``out_dtype``)."""
    try:
        one = torch.ones(1, 1, device=device, dtype=dtype)
        return torch.mm(one, one, out_dtype=torch.float32).dtype == torch.float32
    except (RuntimeError, TypeError):
        return False


def _add_mm(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """``acc += a @ b`` with the products summed in ``acc``'s dtype (fp32/fp64), not rounded to ``a``'s first."""
    if a.dtype == acc.dtype:
        acc.addmm_(a, b)
    elif a.is_cuda and _cuda_mm_out_dtype(a.dtype, a.device):
        acc += torch.mm(a, b, out_dtype=acc.dtype)
    else:  # fp16/bf16 on CPU (no such matmul there): upcast the slice; its fp32 copy is within the slice budget
        acc.addmm_(a.to(acc.dtype), b.to(acc.dtype))


class _ChunkedLogprobs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, temperature, cols, with_entropy):  # type: ignore[override]
        # Under autocast the head runs in autocast's dtype; backward recomputes under the same autocast state.
        device_type = hidden.device.type
        ctx.autocast = (device_type, torch.is_autocast_enabled(device_type), torch.get_autocast_dtype(device_type))
        ctx.set_materialize_grads(False)  # an unused output (often the entropy) costs no backward work
        n, vocab = hidden.shape[0], weight.shape[0]
        acc = _accum(torch.promote_types(hidden.dtype, weight.dtype))
        # Per row, over the slices so far: the running max m, S = Σ e^(u-m) and A = Σ e^(u-m)·(u-m), u = logits/T.
        # Then lse = m + log S and the entropy H = log S - A/S: a sum of two non-negative terms (u - m ≤ 0), so
        # it keeps its relative precision however peaked the distribution (lse - E_p[u] would cancel).
        m = s_sum = a_sum = None
        target_u = hidden.new_zeros(n, dtype=acc)
        slice_of, t_col = _slice_targets(targets, cols)
        for i, lo in enumerate(range(0, vocab, cols)):
            hi = min(lo + cols, vocab)
            u, _ = _scaled_logits(hidden, weight, bias, lo, hi, temperature)
            inside, col = _in_slice(slice_of, t_col, i, hi - lo, cols)
            target_u = torch.where(inside, u.gather(-1, col)[:, 0], target_u)
            m_new = u.amax(-1) if m is None else torch.maximum(m, u.amax(-1))
            shifted = u.sub_(m_new[:, None])
            e = shifted.exp() if with_entropy else shifted.exp_()  # without the entropy, u is not needed again
            if m is not None:  # rescale the running sums to the new max
                shift = m - m_new
                r = shift.exp()
                if with_entropy:
                    a_sum = r * (a_sum + shift * s_sum)
                s_sum = r * s_sum
            s_slice = e.sum(-1)
            s_sum = s_slice if m is None else s_sum + s_slice
            if with_entropy:
                a_slice = e.mul_(shifted).sum(-1)
                a_sum = a_slice if m is None else a_sum + a_slice
            m = m_new
            del u, shifted, e  # this slice's logits go before the next slice's are computed
        # log p = (u - m) - log S, as log_softmax computes it: rounding m + log S first would cost precision
        # at large logits.
        log_s = s_sum.log()
        picked = (target_u - m) - log_s
        entropy = log_s - a_sum / s_sum if with_entropy else target_u.new_zeros(0)
        ctx.save_for_backward(hidden, weight, bias, targets, m, log_s, entropy)
        ctx.temperature, ctx.cols, ctx.with_entropy = temperature, cols, with_entropy
        if not with_entropy:
            ctx.mark_non_differentiable(entropy)
        return picked, entropy

    @staticmethod
    def backward(ctx, g_picked, g_entropy):  # type: ignore[override]
        if torch.is_grad_enabled():
            # create_graph=True: the hand-written backward is not itself differentiable. Refuse rather than return
            # gradients without their second-order terms.
            raise RuntimeError("shared_prefix: the memory-lean LM head has no double backward (create_graph=True); "
                               "pass chunk_size >= the vocabulary size for the plain autograd head")
        device_type, autocast_on, autocast_dtype = ctx.autocast
        with torch.autocast(device_type, dtype=autocast_dtype, enabled=autocast_on):
            return _ChunkedLogprobs._backward(ctx, g_picked, g_entropy)

    @staticmethod
    def _backward(ctx, g_picked, g_entropy):
        hidden, weight, bias, targets, m, log_s, entropy = ctx.saved_tensors
        cols, inv_t = ctx.cols, 1.0 / ctx.temperature
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        vocab = weight.shape[0]
        use_entropy = ctx.with_entropy and g_entropy is not None
        if g_picked is None and not use_entropy:
            return None, None, None, None, None, None, None
        # The hidden-state gradient sums over slices: in fp32 (fp64), rounded once at the end. Every row of the
        # weight (bias) gradient is written by exactly one slice.
        dh = torch.zeros_like(hidden, dtype=m.dtype) if need_h else None
        dw = torch.empty_like(weight) if need_w else None
        db = torch.empty_like(bias) if (need_b and bias is not None) else None
        # Gradient of the logits z (u = z/T), per row: with p = softmax(u), picked = log p_t and H = -Σ p log p
        # (dH/du_j = -p_j (log p_j + H)), writing d = u - m (so log p = d - log S):
        #   dz_j = [j = t]·g/T + p_j·(a·d_j + c),   a = -g_H/T,   c = -(g + g_H·(H - log S))/T.
        # u is recomputed exactly as in forward, so the largest d is exactly 0 and the probabilities near 1 keep
        # their precision (u - (m + log S) in one step would not). A slice then takes three passes over its
        # logits without the entropy (d, e^d, dz) and five with it, besides the upcast and the GEMMs.
        gp = g_picked.to(m.dtype) if g_picked is not None else None
        inv_s = (-log_s).exp()[:, None]
        if use_entropy:
            ge = g_entropy.to(m.dtype)
            a = (-inv_t * ge)[:, None]
            spread = ge * (entropy - log_s)
            c = (-inv_t * (spread if gp is None else gp + spread))[:, None]
        else:
            c = (-inv_t * gp)[:, None] * inv_s
        h_cast = None
        slice_of, t_col = _slice_targets(targets, cols)
        g_target = (inv_t * gp)[:, None] if gp is not None else None  # the target column's own term, dz_t += g/T
        for i, lo in enumerate(range(0, vocab, cols)):
            hi = min(lo + cols, vocab)
            u, logits_dtype = _scaled_logits(hidden, weight, bias, lo, hi, ctx.temperature)
            d = u.sub_(m[:, None])
            if use_entropy:
                p = d.exp().mul_(inv_s)
                dz = torch.addcmul(c, d, a, out=d).mul_(p)
                del p
            else:
                dz = d.exp_().mul_(c)
            if g_target is not None:
                inside, col = _in_slice(slice_of, t_col, i, hi - lo, cols)
                dz.scatter_add_(-1, col, g_target * inside[:, None])
            # Back through the fp32 upcast: the gradient reaches the logits in their own dtype.
            dz = dz.to(logits_dtype)
            if dh is not None:
                w = weight[lo:hi]
                _add_mm(dh, dz, w if w.dtype == logits_dtype else w.to(logits_dtype))
            if dw is not None:
                if h_cast is None:
                    h_cast = hidden.to(logits_dtype)
                if dw.dtype == dz.dtype:
                    torch.mm(dz.t(), h_cast, out=dw[lo:hi])  # a contiguous block of rows: written in place
                else:  # fp32 master weights under autocast
                    dw[lo:hi] = dz.t() @ h_cast
            if db is not None:
                db[lo:hi] = dz.sum(0)
            del u, d, dz  # this slice's logits go before the next slice's are recomputed
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


def check_token_ids(ids: torch.Tensor, vocab: int, name: str = "targets") -> None:
    """Token ids within ``[0, vocab)``: a ValueError naming ``name`` on CPU, an asynchronous device assert on CUDA
    and in compiled graphs (no host sync). The head's slices only gather targets that fall inside them, so an
    out-of-range id must be caught here rather than by a gather."""
    ok = ((ids >= 0) & (ids < vocab)).all()
    if ids.device.type == "cuda" or torch.compiler.is_compiling():  # a compiled graph reads no value on the host
        torch._assert_async(ok, f"{name}: token ids must lie in [0, {vocab})")
    elif not bool(ok):
        raise ValueError(f"{name}: token ids must lie in [0, {vocab}) (the model's vocabulary)")


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
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1]:
        raise ValueError(f"hidden: expected [rows, {weight.shape[-1]}] rows for a [vocab, hidden] head weight "
                         f"{tuple(weight.shape)}, got {tuple(hidden.shape)}")
    if targets.shape != hidden.shape[:1]:
        raise ValueError(f"targets: expected one id per row, shape ({hidden.shape[0]},), got {tuple(targets.shape)}")
    if chunk_size is None:
        chunk_size = auto_chunk_columns(hidden.shape[0], weight.shape[0])
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size: expected a positive int or None, got {chunk_size!r}")
    check_token_ids(targets, weight.shape[0])
    if chunk_size >= weight.shape[0]:
        # One slice holds the whole vocabulary: plain autograd keeps the same peak without recomputing the head.
        return token_logprobs(torch.nn.functional.linear(hidden, weight, bias), targets, temperature, with_entropy)
    picked, entropy = _ChunkedLogprobs.apply(hidden, weight, bias, targets, float(temperature), chunk_size,
                                             with_entropy)
    return picked, (entropy if with_entropy else None)


def check_linear_head(head: torch.nn.Module) -> None:
    if not isinstance(head, torch.nn.Linear):
        raise TypeError(f"model: the LM head is a {type(head).__name__}, expected torch.nn.Linear")


def head_logprobs(
    hidden: torch.Tensor,
    head: torch.nn.Module,
    targets: torch.Tensor,
    temperature: float,
    with_entropy: bool,
    chunk_size: Optional[int] = None,
) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """:func:`linear_logprobs` through an LM head, which must be a ``torch.nn.Linear`` (every supported model's)."""
    check_linear_head(head)
    return linear_logprobs(hidden, head.weight, head.bias, targets, temperature, with_entropy, chunk_size)
