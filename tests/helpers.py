"""Independent references for the tests: each row run alone, with plain math (no shared_prefix code)."""

from __future__ import annotations

import math

import torch


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, window=None,
                     sinks=None) -> torch.Tensor:
    """Standard causal attention of one sequence, ``[L, Hq, D]`` × ``[L, Hkv, D]``, written out in full; with a
    sliding ``window``, token i sees tokens i - window + 1 ..= i (transformers' definition); with ``sinks [Hq]``,
    each head's softmax also covers one logit per query (GPT-OSS), whose probability is then dropped."""
    rep = q.shape[1] // k.shape[1]
    k = k.repeat_interleave(rep, dim=1)
    v = v.repeat_interleave(rep, dim=1)
    scores = torch.einsum("qhd,khd->hqk", q, k) * scale
    n = q.shape[0]
    future = torch.triu(torch.ones(n, n, dtype=torch.bool, device=q.device), diagonal=1)
    if window is not None:
        future |= torch.tril(torch.ones(n, n, dtype=torch.bool, device=q.device), diagonal=-window)
    scores = scores.masked_fill(future, -math.inf)
    if sinks is not None:
        column = sinks[:, None, None].expand(-1, n, 1)
        return torch.einsum("hqk,khd->qhd", torch.cat([scores, column], -1).softmax(-1)[..., :-1], v)
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


def ensure_gloo() -> None:
    """A one-rank gloo process group in this test process (FSDP2 and verl's engine need one), started once."""
    import os

    import torch.distributed as dist

    if not dist.is_initialized():
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(29600 + os.getpid() % 1000))
        dist.init_process_group("gloo", rank=0, world_size=1)


def fully_shard_causal_lm(model: torch.nn.Module, head_unit: bool, param_dtype=None) -> None:
    """FSDP2 on a one-rank CPU mesh with reshard_after_forward: each decoder layer, the LM head as its own unit
    when ``head_unit``, then the root; ``param_dtype`` sets a mixed-precision policy (fp32 gradient reduction)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    ensure_gloo()
    mesh = init_device_mesh("cpu", (1,))
    kw = dict(mesh=mesh, reshard_after_forward=True)
    if param_dtype is not None:
        kw["mp_policy"] = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32)
    for layer in model.model.layers:
        fully_shard(layer, **kw)
    if head_unit:
        fully_shard(model.lm_head, **kw)
    fully_shard(model, **kw)


def torchrun(script, *args, ranks: int = 2, timeout: int = 600) -> None:
    """Run ``script`` with ``args`` on ``ranks`` CPU processes under torchrun (gloo); fail the test with the ranks'
    output tail unless every rank succeeds. The interpreter's scripts directory goes first on PATH: DeepSpeed
    builds an op with ninja from there."""
    import os
    import shutil
    import subprocess
    import sys
    from pathlib import Path

    import pytest

    bindir = str(Path(sys.executable).parent)
    launcher = shutil.which("torchrun", path=bindir) or shutil.which("torchrun")
    if launcher is None:
        pytest.skip("torchrun is not installed")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(sys.path),
           "PATH": os.pathsep.join([bindir, os.environ.get("PATH", "")])}
    port = 29500 + (os.getpid() * 7 + hash(str(args))) % 2000
    proc = subprocess.run([launcher, "--nproc_per_node", str(ranks), "--master_port", str(port), str(script),
                           *map(str, args)], env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, (proc.stdout[-2000:], proc.stderr[-4000:])
