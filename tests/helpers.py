"""Independent references for the tests: each row run alone, with plain math (no shared_prefix code)."""

from __future__ import annotations

import math

import torch


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """Standard causal attention of one sequence, ``[L, Hq, D]`` × ``[L, Hkv, D]``, written out in full."""
    rep = q.shape[1] // k.shape[1]
    k = k.repeat_interleave(rep, dim=1)
    v = v.repeat_interleave(rep, dim=1)
    scores = torch.einsum("qhd,khd->hqk", q, k) * scale
    n = q.shape[0]
    future = torch.triu(torch.ones(n, n, dtype=torch.bool, device=q.device), diagonal=1)
    scores = scores.masked_fill(future, -math.inf)
    return torch.einsum("hqk,khd->qhd", scores.softmax(-1), v)


def padded(rows: list[torch.Tensor], width: int, left: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Stack variable-length ``[L_i, ...]`` rows into ``[B, width, ...]`` with zero padding, plus the mask."""
    out, mask = [], []
    for r in rows:
        pad = width - r.shape[0]
        z = r.new_zeros((pad, *r.shape[1:]))
        out.append(torch.cat([z, r] if left else [r, z]))
        m = torch.zeros(width, dtype=torch.bool)
        if left:
            m[pad:] = True
        else:
            m[: r.shape[0]] = True
        mask.append(m)
    return torch.stack(out), torch.stack(mask).to(out[0].device)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm().clamp_min(1e-300)).item()
