"""What several test modules share: independent references (each row run alone, with plain math or the stock
model), the tiny models and ragged grouped batches they run on, and the launchers of multi-rank tests."""

from __future__ import annotations

import math

import torch
import transformers


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


# -- tiny models and ragged grouped batches, and the stock model's per-row reference -----------------------

FAMILIES = {
    "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM, {}),
    "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM, {}),
    "qwen3": (transformers.Qwen3Config, transformers.Qwen3ForCausalLM, {}),
    "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM, {"sliding_window": 4096}),
    "gemma": (transformers.GemmaConfig, transformers.GemmaForCausalLM, {}),
}
VOCAB = 61


def tiny_model(family: str, dtype=torch.float64, attn="sdpa", **extra):
    cfg_cls, model_cls, kw = FAMILIES[family]
    args = dict(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,  # GQA
        head_dim=8,
        max_position_embeddings=256,
        attention_dropout=0.0,
        tie_word_embeddings=family == "gemma",
    )
    cfg = cfg_cls(**{**args, **kw, **extra})
    cfg._attn_implementation = attn
    torch.manual_seed(0)
    return model_cls(cfg).to(dtype)


def make_batch(seed=0, left_pad_prompt=True, groups=((9, (5, 3, 0)), (4, (2,)), (17, (6, 6)))):
    """Rows for several groups, shuffled; one empty completion; prompts left-padded, completions right-padded."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for plen, comps in groups:
        prompt = torch.randint(1, VOCAB, (plen,), generator=g)
        rows += [(prompt, torch.randint(1, VOCAB, (s,), generator=g)) for s in comps]
    order = torch.randperm(len(rows), generator=g).tolist()
    rows = [rows[i] for i in order]
    lp = max(p.shape[0] for p, _ in rows) + 2
    lc = max(c.shape[0] for _, c in rows) + 1
    pid, pmask = padded([p for p, _ in rows], lp, left_pad_prompt)
    cid, cmask = padded([c for _, c in rows], lc, False)
    return rows, pid, pmask.long(), cid, cmask


def stock_logprobs(model, rows, lc, temperature):
    """Each row alone: [prompt, completion] through the stock model, log_softmax(logits / T) at the completion."""
    out = []
    for prompt, comp in rows:
        ids = torch.cat([prompt, comp])[None]
        logits = model(input_ids=ids).logits[0].double()
        logp = torch.log_softmax(logits / temperature, -1)
        p = prompt.shape[0]
        pred = logp[p - 1 : p - 1 + comp.shape[0]]
        lp = pred.gather(-1, comp[:, None])[:, 0]
        ent = -(pred.exp() * pred).sum(-1)
        pad = lc - comp.shape[0]
        out.append((torch.cat([lp, lp.new_zeros(pad)]), torch.cat([ent, ent.new_zeros(pad)])))
    return torch.stack([a for a, _ in out]), torch.stack([b for _, b in out])


def param_grads(model, loss):
    model.zero_grad(set_to_none=True)
    loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def assert_matches_stock(model, logp_tol=1e-9, grad_tol=1e-6, batch=None, **planning):
    """completion_logprobs (values, entropies, every parameter's gradient) against the rows run alone, fp64.
    ``batch``: ``(rows, prompt_ids, prompt_mask, completion_ids, completion_mask)`` (default: ``make_batch()``);
    ``planning``: how far prefixes are shared."""
    rows, pid, pmask, cid, cmask = make_batch() if batch is None else batch
    w = torch.randn(cid.shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    ref, ref_ent = stock_logprobs(model, rows, cid.shape[1], 0.7)
    ref_grads = param_grads(model, (ref * w).sum() + 0.1 * (ref_ent * w).sum())
    import shared_prefix as sp

    lp, ent = sp.completion_logprobs(model, pid, pmask, cid, cmask, temperature=0.7, return_entropy=True,
                                     **planning)
    assert (lp - ref).abs().max().item() <= logp_tol and (ent - ref_ent).abs().max().item() <= logp_tol
    grads = param_grads(model, (lp * w).sum() + 0.1 * (ent * w).sum())
    assert grads.keys() == ref_grads.keys()
    worst = max(((grads[n] - ref_grads[n]).norm() / ref_grads[n].norm().clamp_min(1e-300)).item() for n in grads)
    assert worst <= grad_tol, worst
