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


# Kernel names of attention kernels (FA2, cuDNN's fused SDPA, PyTorch's efficient/flex kernels) for gpu_attn_s.
_ATTENTION_KERNEL = ("flash", "fmha", "sdpa", "attention", "triton_tem_fused")


def gpu_kernel_seconds(fn: Callable[[], object]) -> dict:
    """GPU busy time of one call of ``fn``: the summed durations of its CUDA kernels and copies (one stream, so no
    overlap), and of its attention kernels alone. Wall time on a small model can be bound by the host issuing
    kernels; this is the time the GPU itself needs, what a step costs once the model is large enough to keep the
    GPU fed."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*Profiler clears events.*")
        with _quiet_native_stderr(), profile(activities=[ProfilerActivity.CUDA]) as prof:
            fn()
            torch.cuda.synchronize()
    kernels = [e for e in prof.events() if e.device_type == DeviceType.CUDA]
    if not kernels:  # no CUPTI, or another profiler holds it: no measurement rather than a busy time of 0
        raise RuntimeError("the profiler recorded no CUDA kernels")
    busy = sum(e.device_time_total for e in kernels)
    attn = sum(e.device_time_total for e in kernels if any(k in e.name.lower() for k in _ATTENTION_KERNEL))
    return dict(gpu_busy_s=busy * 1e-6, gpu_attn_s=attn * 1e-6)


def grad_snapshot(model: torch.nn.Module) -> list:
    """Every parameter's gradient as an fp32 (fp64 for fp64) copy in host memory (None where it has none): a 7B
    model's fp32 gradients would not fit on the GPU beside its weights and their gradients."""
    return [None if p.grad is None else p.grad.detach().to("cpu", torch.promote_types(p.grad.dtype, torch.float32))
            for p in model.parameters()]


# Elements per piece in grad_agreement: its fp64 temporaries stay at a few hundred MB whatever the parameter's size.
_PIECE = 1 << 24


def grad_agreement(model: torch.nn.Module, ref: list) -> tuple[float, float]:
    """(relative L2 difference, cosine similarity) of the model's current gradients against ``ref`` (a
    :func:`grad_snapshot`), summed in fp64 piece by piece, without a flat copy of either. A missing gradient
    counts as zeros."""
    sums = None  # Σ (g - r)², Σ r², Σ g², Σ g·r
    for p, r in zip(model.parameters(), ref):
        if p.grad is None and r is None:
            continue
        g = (p.grad if p.grad is not None else torch.zeros_like(p)).detach().reshape(-1)
        r = r.reshape(-1) if r is not None else torch.zeros(g.numel())
        for start in range(0, g.numel(), _PIECE):
            a = g[start : start + _PIECE].double()
            b = r[start : start + _PIECE].to(a.device, torch.float64)
            piece = torch.stack([(a - b).square().sum(), b.square().sum(), a.square().sum(), (a * b).sum()])
            sums = piece if sums is None else sums + piece
    if sums is None:
        return 0.0, 1.0
    diff, ref_sq, ours_sq, dot = sums.tolist()
    rel = diff**0.5 / ref_sq**0.5 if ref_sq > 0 else float("inf")
    cos = dot / max((ours_sq * ref_sq) ** 0.5, 1e-300)
    return rel, cos


def grpo_loss(logp: torch.Tensor, mask: torch.Tensor, advantages: torch.Tensor) -> torch.Tensor:
    """A GRPO-shaped surrogate: advantage-weighted token log-probs, averaged over valid tokens."""
    return -(logp * advantages[:, None] * mask).sum() / mask.sum()


def _timed(fn: Callable[[], object], device: torch.device) -> float:
    synchronize(device)
    t0 = time.perf_counter()
    fn()
    synchronize(device)
    return time.perf_counter() - t0


@contextlib.contextmanager
def _no_setup(name: str):
    yield


# Steps measure_methods runs per method besides the timed rounds (the first step, the peak-memory probe).
UNTIMED_STEPS = 2


def measure_methods(model, methods: dict[str, Callable], advantages, mask, device, steps: int, progress=None,
                    setup=_no_setup, keep_going: bool = True) -> dict[str, dict]:
    """Log-prob methods side by side, one step = forward+backward of ``grpo_loss``.

    Each method first runs once (its time is ``first_step_s``; its log-probs and gradient are compared with the
    first method's: ``agreement``) and once more under the peak-memory probe (``peak_mem_bytes`` above what existed
    before, gradients included); on CUDA a third, profiled step gives ``gpu_busy_s`` and ``gpu_attn_s``
    (``gpu_kernel_seconds``; not counted in ``progress``). Then ``steps`` rounds run the methods in turn, one timed
    step each, so that drifts in the machine's speed (other tenants, clocks) fall on every method alike;
    ``median_s`` is each method's median.
    ``setup(name)`` is a context manager entered around every call of that method. With ``keep_going`` a method
    that raises gets ``{"error": ...}`` and the others go on, and a ``KeyboardInterrupt`` (SIGINT, e.g. from
    ``timeout -s INT``) ends the measurement early with the rounds completed so far (``rounds`` counts them;
    ``interrupted`` is set), so a time limit does not lose them; without ``keep_going`` both propagate.
    Returns one dict per method, in order.
    """

    def make_step(fn):
        def step():
            model.zero_grad(set_to_none=True)
            logp = fn()
            grpo_loss(logp, mask, advantages).backward()
            return logp

        return step

    def failed(e: Exception) -> dict:
        if not keep_going:
            raise e
        model.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.empty_cache()
        return dict(error=f"{type(e).__name__}: {(str(e).splitlines() or [''])[0][:300]}")

    results: dict[str, dict] = {}
    steps_of: dict[str, Callable] = {}

    def first_steps() -> None:
        """Each method's first step (agreement with the first method) and its peak-memory step."""
        ref_logp = ref_grad = None
        for name, fn in methods.items():
            step = make_step(fn)
            try:
                with setup(name):
                    out: list[torch.Tensor] = []
                    first = _timed(lambda: out.append(step().detach()), device)
                    logp = out[0]
                    # Against the first method's gradients (in host memory), while this method's are in place.
                    agree = agreement(logp, ref_logp, mask, model, ref_grad)
                    grad = grad_snapshot(model) if ref_logp is None else None
                    if progress is not None:
                        progress.update(1)
                    model.zero_grad(set_to_none=True)
                    peak = peak_memory_bytes(step, device)
                    model.zero_grad(set_to_none=True)
                    if progress is not None:
                        progress.update(1)
            except Exception as e:  # an OOM, an unsupported case or a failing method: recorded, the run goes on
                out = logp = grad = None  # free this method's tensors before the next one runs
                results[name] = failed(e)
                continue
            results[name] = dict(peak_mem_bytes=peak, first_step_s=first, times=[])
            if device.type == "cuda":
                try:
                    with setup(name):
                        results[name].update(gpu_kernel_seconds(step))
                except Exception as e:  # the profiler is a measurement aid: its failure must not cost the method
                    results[name]["gpu_busy_error"] = f"{type(e).__name__}: {str(e)[:200]}"
                model.zero_grad(set_to_none=True)
            results[name].update(agree)
            if ref_logp is None:
                ref_logp, ref_grad = logp, grad
            del grad
            steps_of[name] = step

    try:
        first_steps()
        for _ in range(steps):
            for name, step in list(steps_of.items()):
                try:
                    with setup(name):
                        results[name]["times"].append(_timed(step, device))
                except Exception as e:  # keep what was measured (peak, agreement), drop the partial timings
                    results[name].pop("times")
                    results[name].update(failed(e))
                    del steps_of[name]
                if progress is not None:
                    progress.update(1)
    except KeyboardInterrupt:
        if not keep_going:
            raise
        for name in methods:
            results.setdefault(name, dict(error="interrupted before it ran"))["interrupted"] = True
    model.zero_grad(set_to_none=True)
    # Every result still holding its timings (whenever the interrupt came) gets its rounds and median.
    for res in results.values():
        if "times" not in res:
            continue
        times = res.pop("times")
        res["rounds"] = len(times)
        if times:
            res["median_s"] = statistics.median(times)
        else:
            res["error"] = "interrupted before a timed round" if res.get("interrupted") else "no timed round"
    return results


def agreement(logp, ref_logp, mask, model, ref_grad) -> dict:
    """max |Δ logprob| at valid tokens and gradient rel L2 / cosine (the model's current gradients) against a
    reference method's."""
    if ref_logp is None:
        return dict(max_abs_logp_diff=0.0, grad_rel_l2=0.0, grad_cos=1.0)
    rel, cos = grad_agreement(model, ref_grad)
    return dict(max_abs_logp_diff=((logp - ref_logp) * mask).abs().max().item(), grad_rel_l2=rel, grad_cos=cos)
