"""Timing and peak-memory measurement shared by the demo and the bench."""

from __future__ import annotations

import contextlib
import os
import statistics
import sys
import time
import warnings
from typing import Callable

import torch


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_time(fn: Callable[[], object], device: torch.device, steps: int, warmup: int = 1, progress=None) -> float:
    """Median wall time of ``steps`` calls after ``warmup`` calls (device work included)."""
    for _ in range(warmup):
        fn()
        if progress is not None:
            progress.update(1)
    times = []
    for _ in range(steps):
        synchronize(device)
        t0 = time.perf_counter()
        fn()
        synchronize(device)
        times.append(time.perf_counter() - t0)
        if progress is not None:
            progress.update(1)
    return statistics.median(times)


@contextlib.contextmanager
def _quiet_native_stderr():
    """Silence libtorch's own log lines (profiler start-up notes) for the block; Python exceptions still raise."""
    sys.stderr.flush()
    saved = os.dup(2)
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


def _cpu_peak_bytes(fn: Callable[[], object]) -> int:
    # CPU tensors have no allocator statistics; the profiler records every allocation and free with its size and
    # time, so the peak of their running sum is the peak of memory allocated during fn (above what existed before).
    from torch.profiler import ProfilerActivity, profile

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*Profiler clears events.*")
        with _quiet_native_stderr(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            fn()
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    events.sort(key=lambda e: e.start_ns())
    current = peak = 0
    for e in events:
        current += e.nbytes()
        peak = max(peak, current)
    return peak


def peak_memory_bytes(fn: Callable[[], object], device: torch.device) -> int:
    """Peak bytes allocated while ``fn`` runs, above what was allocated before it (weights, inputs)."""
    if device.type == "cuda":
        synchronize(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        synchronize(device)
        return torch.cuda.max_memory_allocated(device) - base
    return _cpu_peak_bytes(fn)


def grad_vector(model: torch.nn.Module, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """All parameter gradients as one flat vector (fp32 keeps a 0.5B model's copy at 2 GB)."""
    return torch.cat([p.grad.reshape(-1).to(dtype) for p in model.parameters() if p.grad is not None])


def grad_agreement(ours: torch.Tensor, ref: torch.Tensor) -> tuple[float, float]:
    """(relative L2 difference, cosine similarity) of two flattened gradients."""
    rel = ((ours - ref).norm() / ref.norm()).item()
    cos = torch.nn.functional.cosine_similarity(ours, ref, dim=0).item()
    return rel, cos


def grpo_loss(logp: torch.Tensor, mask: torch.Tensor, advantages: torch.Tensor) -> torch.Tensor:
    """A GRPO-shaped surrogate: advantage-weighted token log-probs, averaged over valid tokens."""
    return -(logp * advantages[:, None] * mask).sum() / mask.sum()


def measure_logprob_step(model, fn, advantages, mask, device, steps: int, progress=None):
    """One log-prob method, forward+backward of ``grpo_loss``: ``(stats, logp, grad)`` where stats holds the
    median step time, the peak memory above what existed before (gradients included) and the first step's time."""

    def step():
        model.zero_grad(set_to_none=True)
        logp = fn()
        grpo_loss(logp, mask, advantages).backward()
        return logp

    synchronize(device)
    t0 = time.perf_counter()
    logp = step().detach()
    synchronize(device)
    first = time.perf_counter() - t0
    grad = grad_vector(model)
    if progress is not None:
        progress.update(1)
    model.zero_grad(set_to_none=True)
    peak = peak_memory_bytes(step, device)
    if progress is not None:
        progress.update(1)
    median = median_time(step, device, steps=steps, warmup=1, progress=progress)
    model.zero_grad(set_to_none=True)
    return dict(median_s=median, peak_mem_bytes=peak, first_step_s=first), logp, grad


def agreement(logp, grad, ref_logp, ref_grad, mask) -> dict:
    """max |Δ logprob| at valid tokens and gradient rel L2 / cosine against a reference method."""
    if ref_logp is None:
        return dict(max_abs_logp_diff=0.0, grad_rel_l2=0.0, grad_cos=1.0)
    rel, cos = grad_agreement(grad.double(), ref_grad.double())
    return dict(max_abs_logp_diff=((logp - ref_logp) * mask).abs().max().item(), grad_rel_l2=rel, grad_cos=cos)
