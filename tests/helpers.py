"""What several test modules share: independent references (each row run alone, with plain math or the stock
model), the tiny models and ragged grouped batches they run on, and the launchers of multi-rank tests."""

from __future__ import annotations

import math
import random

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


def stream_slice_facts(forward) -> dict:
    """What a sequence-parallel ``PackedForward``'s slice of the stream held: the stream's tokens, its tail padding,
    whether a prompt (a root node) crosses a slice boundary, this rank's predictor rows, and the shortest
    completion node."""
    s, plan = forward.stream, forward.plan
    bounds = range(s.length, s.padded, s.length)
    return {"tokens": plan.num_tokens, "pad": s.padded - plan.num_tokens, "rows": int(s.entries.numel()),
            "prompt_crosses": any(n.start < b < n.start + n.tokens for n in plan.nodes if n.parent < 0
                                  for b in bounds),
            "shortest_response": min((n.tokens for n in plan.nodes if n.parent >= 0), default=0)}


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


# -- attention cases: random q/k/v per prompt and completion, and each row alone -------------------------

def build_case(seed, groups, hkv, ratio, dim, left_prompt, left_completion, shuffle):
    """Random prompts (one per group) and ragged completions, as leaves; rows optionally shuffled."""
    g = torch.Generator().manual_seed(seed)
    hq = hkv * ratio

    def leaf(n, h):
        return torch.randn(n, h, dim, generator=g, dtype=torch.float64).requires_grad_()

    prompts = [{"len": p, "q": leaf(p, hq), "k": leaf(p, hkv), "v": leaf(p, hkv)} for p, _ in groups]
    rows = []
    for gi, (_, comps) in enumerate(groups):
        for s in comps:
            rows.append({"group": gi, "q": leaf(s, hq), "k": leaf(s, hkv), "v": leaf(s, hkv)})
    if shuffle:
        random.Random(seed).shuffle(rows)
    # Token ids: a prompt's ids identify its group, so default grouping recovers the groups.
    prompt_ids = [torch.full((prompts[r["group"]]["len"],), r["group"] + 1) for r in rows]
    for r, ids in zip(rows, prompt_ids):
        ids[0] = 100 + r["group"]
    return prompts, rows, prompt_ids, hq


def reference(prompts, rows, scale, window=None):
    """Per row: [prompt, completion] alone; returns prompt outputs per group and completion outputs per row."""
    prompt_out, comp_out = {}, []
    for r in rows:
        p = prompts[r["group"]]
        q, k, v = (torch.cat([p[n], r[n]]) for n in ("q", "k", "v"))
        o = causal_attention(q, k, v, scale, window)
        prompt_out.setdefault(r["group"], o[: p["len"]])
        comp_out.append(o[p["len"] :])
    return prompt_out, comp_out


def case_leaves(prompts, rows):
    """Every q/k/v leaf of a ``build_case`` case: the prompts', then the rows'."""
    return [p[n] for p in prompts for n in ("q", "k", "v")] + [r[n] for r in rows for n in ("q", "k", "v")]


# -- prefix-tree batches: rows that share prefixes at several levels, q/k/v per distinct prefix ----------

def tree_rows(seed: int, depth: int, n_rows: int = 9, vocab: int = VOCAB):
    """Rows (prompt, completion) whose sharing reaches about ``depth`` levels: system prompts shared by some
    prompts, prompts shared by several rows, completions that branch at random points, one row repeated end to
    end, one empty completion, one row sharing nothing."""
    rng = random.Random(seed)
    tok = lambda n: [rng.randrange(1, vocab) for _ in range(n)]  # noqa: E731
    systems = [tok(rng.randrange(3, 12)) for _ in range(2)]
    prompts = [rng.choice(systems) + tok(rng.randrange(1, 6)) for _ in range(3)]
    rows = []
    for _ in range(n_rows - 3):
        prompt = rng.choice(prompts)
        completion = []
        for _ in range(depth):  # a branch point per level: continue a sibling's completion, or start fresh
            siblings = [c for p, c in rows if p == prompt and len(c) > len(completion)]
            if siblings and rng.random() < 0.7:
                completion = rng.choice(siblings)[: len(completion) + rng.randrange(1, 5)]
            else:
                break
        rows.append((prompt, completion + tok(rng.randrange(0, 6))))
    rows.append(rows[0])  # identical end to end
    rows.append((rng.choice(prompts), []))  # an empty completion
    rows.append((tok(rng.randrange(2, 8)), tok(rng.randrange(1, 5))))  # shares nothing
    rng.shuffle(rows)
    return [(torch.tensor(p), torch.tensor(c, dtype=torch.long)) for p, c in rows]


def as_batch(rows, left_prompt=True, left_completion=False):
    lp = max(p.shape[0] for p, _ in rows) + 1
    lc = max(c.shape[0] for _, c in rows) + 1
    pid, pmask = padded([p for p, _ in rows], lp, left_prompt)
    cid, cmask = padded([c for _, c in rows], lc, left_completion)
    return pid, pmask, cid, cmask


def features(rows, hq, hkv, dim, seed):
    """q/k/v for every token as a function of its whole prefix (what a model computes), so that rows sharing a
    prefix have identical values there: one fp64 leaf per distinct prefix."""
    g = torch.Generator().manual_seed(seed)
    leaves = {}

    def of(prefix, name, heads):
        key = (prefix, name)
        if key not in leaves:
            leaves[key] = torch.randn(heads, dim, generator=g, dtype=torch.float64).requires_grad_()
        return leaves[key]

    per_row = []
    for p, c in rows:
        seq = tuple(torch.cat([p, c]).tolist())
        per_row.append({n: torch.stack([of(seq[: i + 1], n, h) for i in range(len(seq))])
                        for n, h in (("q", hq), ("k", hkv), ("v", hkv))})
    return leaves, per_row


def pack_features(plan, rows, per_row, lp, lc, left_prompt=True, left_completion=False, device=None):
    """Each row's q/k/v split at its prompt, padded as the batch is, packed by ``plan``."""
    packed = {}
    for n in ("q", "k", "v"):
        px, _ = padded([x[n][: p.shape[0]] for x, (p, _) in zip(per_row, rows)], lp, left_prompt)
        cx, _ = padded([x[n][p.shape[0]:] for x, (p, _) in zip(per_row, rows)], lc, left_completion)
        packed[n] = plan.pack(px.to(device or px.device), cx.to(device or cx.device))[0]
    return packed


# -- an LM head's inputs ----------------------------------------------------------------------------

def head_leaves(n=23, hidden=16, vocab=97, bias=True, dtype=torch.float64, seed=0):
    """Hidden rows ``[n, hidden]`` (a leaf), an LM head and target ids, random from ``seed``."""
    g = torch.Generator().manual_seed(seed)
    head = torch.nn.Linear(hidden, vocab, bias=bias).to(dtype)
    with torch.no_grad():
        head.weight.copy_(torch.randn(vocab, hidden, generator=g, dtype=dtype))
        if bias:
            head.bias.copy_(torch.randn(vocab, generator=g, dtype=dtype))
    h = torch.randn(n, hidden, generator=g, dtype=dtype, requires_grad=True)
    targets = torch.randint(0, vocab, (n,), generator=g)
    return h, head, targets
