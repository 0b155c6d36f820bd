"""Memory-lean completion log-probs: the LM head, temperature, log-softmax and target gather in row chunks.

With shared prefixes the peak of a step is the LM head over all completion rows: full-vocabulary logits in the
activation dtype, an fp32 copy, and the log-softmax. Here each chunk's logits live only while that chunk is
processed, in forward and again in backward (recomputed), so the full ``[rows, vocab]`` tensor never exists.
The backward is written out (it is exact, not an approximation) and returns the gradients of the hidden rows, the
head weight (tied embeddings included: autograd adds both uses) and the bias.
"""

from __future__ import annotations

from typing import Optional

import torch

# Working set per chunk: fp32 logits, probabilities and their gradient, about 3 × 4 bytes × vocab per row.
CHUNK_BUDGET_BYTES = 256 * 2**20


def auto_chunk_rows(vocab: int, budget_bytes: int = CHUNK_BUDGET_BYTES) -> int:
    """Rows per chunk so that one chunk's fp32 working set stays within ``budget_bytes``."""
    return max(1, budget_bytes // (12 * vocab))


def _accum(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _chunk_logp(h, weight, bias, temperature):
    """fp32 (fp64) log-softmax of one chunk's logits, computed as the stock head computes them; and the logits'
    dtype (the activation dtype, or autocast's)."""
    logits = torch.nn.functional.linear(h, weight, bias)
    return torch.log_softmax(logits.to(_accum(logits.dtype)) / temperature, dim=-1), logits.dtype


class _ChunkedLogprobs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, temperature, chunk, with_entropy):  # type: ignore[override]
        # Under autocast the head runs in autocast's dtype; backward recomputes under the same autocast state.
        device_type = hidden.device.type
        ctx.autocast = (device_type, torch.is_autocast_enabled(device_type), torch.get_autocast_dtype(device_type))
        n = hidden.shape[0]
        acc = _accum(torch.promote_types(hidden.dtype, weight.dtype))
        picked = hidden.new_empty(n, dtype=acc)
        entropy = hidden.new_empty(n if with_entropy else 0, dtype=acc)
        for s in range(0, n, chunk):
            logp, _ = _chunk_logp(hidden[s : s + chunk], weight, bias, temperature)
            picked[s : s + chunk] = logp.gather(-1, targets[s : s + chunk, None])[:, 0]
            if with_entropy:
                entropy[s : s + chunk] = -(logp.exp() * logp).sum(-1)
        ctx.save_for_backward(hidden, weight, bias, targets, entropy)
        ctx.temperature, ctx.chunk, ctx.with_entropy = temperature, chunk, with_entropy
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
        hidden, weight, bias, targets, entropy = ctx.saved_tensors
        t, chunk = ctx.temperature, ctx.chunk
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        acc = _accum(weight.dtype)
        dh = torch.zeros_like(hidden) if need_h else None
        # Weight and bias gradients sum over chunks: accumulate in fp32 (fp64), round once at the end.
        dw = torch.zeros_like(weight, dtype=acc) if need_w else None
        db = torch.zeros_like(bias, dtype=acc) if (need_b and bias is not None) else None
        for s in range(0, hidden.shape[0], chunk):
            h = hidden[s : s + chunk]
            logp, logits_dtype = _chunk_logp(h, weight, bias, t)
            p = logp.exp()
            gp = g_picked[s : s + chunk, None]
            if ctx.with_entropy and g_entropy is not None:
                # H = -Σ p log p;  dH/du_j = -p_j (log p_j + H). Computed in logp's buffer.
                ent_term = logp.add_(entropy[s : s + chunk, None]).mul_(p).mul_(g_entropy[s : s + chunk, None])
            else:
                ent_term = None
            # d picked / d u = onehot - p, with u = logits / T. Computed in p's buffer.
            du = p.mul_(-gp).scatter_add_(-1, targets[s : s + chunk, None], gp)
            if ent_term is not None:
                du.sub_(ent_term)
            # Back through the fp32 upcast and 1/T: the gradient reaches the logits in their own dtype.
            dz = du.div_(t).to(logits_dtype)
            if dh is not None:
                dh[s : s + chunk] = (dz @ weight.to(logits_dtype)).to(hidden.dtype)
            if dw is not None:
                dw += (dz.t() @ h.to(logits_dtype)).to(acc)
            if db is not None:
                db += dz.sum(0).to(acc)
        dw = dw.to(weight.dtype) if dw is not None else None
        db = db.to(bias.dtype) if db is not None else None
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

    ``chunk_size`` rows per chunk; ``None`` picks one from the vocabulary size.
    """
    if chunk_size is None:
        chunk_size = auto_chunk_rows(weight.shape[0])
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size: expected a positive int or None, got {chunk_size!r}")
    if hidden.shape[0] <= chunk_size:
        # One chunk holds every row: plain autograd keeps the same peak without recomputing the head in backward.
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
