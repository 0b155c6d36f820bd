"""The bench's variants: what each one runs for a batch, under which process-wide settings, and the models and
batches they run on."""

from __future__ import annotations

import contextlib
import os
from typing import Callable, Optional

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

import shared_prefix as sp
from shared_prefix._kernels import cudnn_after, cudnn_bucket, self_calls
from shared_prefix.bench.baselines import (FlexVariant, packed_causal_logprobs, packed_causal_roots_logprobs,
                                           packed_causal_tree_logprobs, stock_logprobs)
from shared_prefix.hf import enable_checkpointing, model_windows

MODELS = {
    # Qwen2-shaped; the 0.5B/1.5B entries have Qwen2.5's shapes, with random weights built locally.
    "tiny": dict(hidden_size=256, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                 intermediate_size=704, vocab_size=8192),
    "qwen2.5-0.5b": dict(hidden_size=896, num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2,
                         intermediate_size=4864, vocab_size=151936),
    "qwen2.5-1.5b": dict(hidden_size=1536, num_hidden_layers=28, num_attention_heads=12, num_key_value_heads=2,
                         intermediate_size=8960, vocab_size=151936),
    "qwen2.5-7b": dict(hidden_size=3584, num_hidden_layers=28, num_attention_heads=28, num_key_value_heads=4,
                       intermediate_size=18944, vocab_size=152064, tie_word_embeddings=False),
}
# Order of measurement: the reference first; the original package last (it may not fit long configs).
VARIANTS = ["baseline", "packed_causal", "packed_causal_fa2", "packed_causal_roots", "packed_causal_tree",
            "shared_prefix",
            "shared_prefix_prompts",
            "shared_prefix_fa2",
            "shared_prefix_cudnn", "shared_prefix_cudnn_views", "shared_prefix_full_head", "shared_prefix_split",
            "shared_prefix_fused", "shared_prefix_eager_cudnn", "shared_prefix_cudnn_bucketed", "flex",
            "prefix_grouper"]
# Variants that run ours with a forced kernel choice (SHARED_PREFIX_KERNELS for the whole measurement, so the
# checkpoint recompute in backward uses the same kernels as the forward).
KERNEL_VARIANTS = {"shared_prefix_fa2": "flash", "shared_prefix_cudnn": "cudnn",
                   "shared_prefix_cudnn_views": "cudnn_views"}
# Variants that force how the prefixes' and completions' causal calls run (`self_calls`), likewise.
SELF_CALL_VARIANTS = {"shared_prefix_split": "split", "shared_prefix_fused": "fused"}
# Variants that on CPU run exactly what shared_prefix runs (its kernels keep the three calls; cuDNN is CUDA's), or
# that only pad it for cuDNN's sake: left out of the CPU default, which must fit cpu-small in 3 minutes. Named in
# --variants, they run.
SAME_AS_OURS_ON_CPU = ("shared_prefix_split", "shared_prefix_eager_cudnn", "shared_prefix_cudnn_bucketed")
# Variants that measure what the prefix tree adds: in the default set only for batches that share more than whole
# prompts (--system, --branches); elsewhere they repeat packed_causal and shared_prefix.
# The limit proxies at the prefix tree's token count: packed_causal's rows (each root's subtree as one causal row)
# and a stricter one, rows as long as the longest stock row.
TREE_PROXIES = ("packed_causal_roots", "packed_causal_tree")
TREE_VARIANTS = (*TREE_PROXIES, "shared_prefix_prompts")
# shared_prefix_cudnn_bucketed: the causal self calls padded to this multiple (`cudnn_bucket`), cuDNN for a shape
# seen in one earlier plan: under --vary the prompts' call reaches cuDNN once its bucket recurs, while the cross
# call (unpadded, a new length every step) stays on FA2. The counts and cuDNN's graph cache are process-wide, so
# measure it in a process of its own (or before any other cuDNN variant): scripts/gpu_check.sh does.
BENCH_BUCKET = 512
# --vary: step k of every variant has prompts of P + VARY_STEP·k tokens (longer, so a config at a kernel's
# threshold, 8192 keys for cuDNN, stays above it).
VARY_STEP = 8


def build_model(name: str, dtype: torch.dtype, device: torch.device, grad_ckpt: bool, window: Optional[int] = None,
                layers: Optional[int] = None):
    """A Qwen2-shaped model with random weights; ``layers`` overrides the shape's depth."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    windowed = {} if window is None else dict(use_sliding_window=True, sliding_window=window, max_window_layers=0)
    shape = {"tie_word_embeddings": True, **MODELS[name]}
    if layers is not None:
        shape["num_hidden_layers"] = layers
    cfg = Qwen2Config(**shape, max_position_embeddings=32768, rope_theta=1e6, rms_norm_eps=1e-6, **windowed)
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(0)
    with torch.device(device):
        model = Qwen2ForCausalLM(cfg)
    model.to(dtype)
    if grad_ckpt:
        enable_checkpointing(model)
    model.train()  # attention dropout is 0 in Qwen2 configs
    return model


def make_batch(p: int, s: int, g: int, b: int, vocab: int, device: torch.device, seed: int = 0, system: int = 0,
               branches: int = 0):
    """B prompts of P tokens, G completions of S tokens each, rows group by group (as TRL's generation batch). The
    first ``system`` tokens of every prompt are one shared system prompt. ``branches``: a tree rollout, each
    group's completions branching once at half length: ``branches`` trunks of S/2 tokens, each continued by
    G/branches completions."""
    gen = torch.Generator().manual_seed(seed)
    prompts = torch.randint(1, vocab, (b, p), generator=gen)
    prompts[:, :system] = prompts[0, :system]
    prompt_ids = prompts.repeat_interleave(g, dim=0)
    completion_ids = torch.randint(1, vocab, (b * g, s), generator=gen)
    if branches:
        trunks = completion_ids.view(b, branches, g // branches, s)
        trunks[:, :, 1:, : s // 2] = trunks[:, :, :1, : s // 2]
    ones = lambda t: torch.ones_like(t, dtype=torch.bool)  # noqa: E731
    return [x.to(device) for x in (prompt_ids, ones(prompt_ids), completion_ids, ones(completion_ids))]


# Variants that compute full causal attention whatever the model's sliding window.
FULL_ATTENTION_ONLY = ("flex", "prefix_grouper")


def variant_fns(model, batch, g: int, device: torch.device, wanted: list[str]) -> dict[str, Callable]:
    pid, pmask, cid, cmask = batch
    fns: dict[str, Callable] = {}
    windowed = bool(model_windows(model))
    for name in wanted:
        if windowed and name in FULL_ATTENTION_ONLY:
            continue
        if name == "baseline":
            fns[name] = lambda: stock_logprobs(model, pid, pmask, cid, cmask)
        elif name == "packed_causal" or (name == "packed_causal_fa2" and device.type == "cuda"):
            fns[name] = lambda: packed_causal_logprobs(model, pid, cid, g)
        elif name == "packed_causal_roots":
            fns[name] = lambda: packed_causal_roots_logprobs(model, pid, pmask, cid, cmask)
        elif name == "packed_causal_tree":
            fns[name] = lambda: packed_causal_tree_logprobs(model, pid, pmask, cid, cmask)
        elif (name in ("shared_prefix", "shared_prefix_eager_cudnn", "shared_prefix_cudnn_bucketed")
              or name in SELF_CALL_VARIANTS
              or (name in KERNEL_VARIANTS and device.type == "cuda")):
            fns[name] = lambda: sp.completion_logprobs(model, pid, pmask, cid, cmask, group_sizes=g)
        elif name == "shared_prefix_prompts":
            # Ours sharing whole prompts only (no prefix tree): what the tree adds.
            fns[name] = lambda: sp.completion_logprobs(model, pid, pmask, cid, cmask, group_sizes=g, max_depth=1)
        elif name == "shared_prefix_full_head":
            # Ours with the LM head in one piece (no vocabulary slices): what the memory-lean head costs and saves.
            vocab = model.config.vocab_size
            fns[name] = lambda: sp.completion_logprobs(model, pid, pmask, cid, cmask, group_sizes=g, chunk_size=vocab)
        elif name == "prefix_grouper":
            try:
                from shared_prefix.bench.prefix_grouper import prefix_grouper_logprobs

                import prefix_grouper  # noqa: F401
            except ImportError:
                continue
            sizes = [g] * (pid.shape[0] // g)
            # Left on the package's attention through backward (checkpoint recompute); run_config resets it.
            fns[name] = lambda: prefix_grouper_logprobs(model, pid, pmask, cid, cmask, group_sizes=sizes,
                                                        keep_attention_implementation=True)
        elif name == "flex" and device.type == "cuda":
            fns[name] = FlexVariant(model, pid, cid, g)
    return fns


class Varying:
    """A variant that runs on the next batch of ``batches`` at every call (``--vary``): every variant sees the same
    sequence, so first steps (the agreement check) share a batch; building the variant for a batch is timed with
    it, as a training step would pay it."""

    def __init__(self, make: Callable, batches: list):
        self.make, self.batches, self.calls = make, batches, 0

    def __call__(self):
        batch = self.batches[self.calls % len(self.batches)]
        self.calls += 1
        return self.make(batch)()


@contextlib.contextmanager
def variant_setup(model, name: str, cudnn_plans: Optional[int]):
    """The settings variant ``name`` runs under, for a whole step (forward and backward): the checkpoint recompute
    in backward then uses the forward's kernels. ``cudnn_plans``: ``cudnn_after`` for ours (None: the default)."""
    model.set_attn_implementation("sdpa")  # every variant starts from the stock implementation
    before = os.environ.get("SHARED_PREFIX_KERNELS")
    if name in KERNEL_VARIANTS:
        os.environ["SHARED_PREFIX_KERNELS"] = KERNEL_VARIANTS[name]
    plans = {"shared_prefix_eager_cudnn": 0, "shared_prefix_cudnn_bucketed": 1}.get(name, cudnn_plans)
    # Process-wide flags, so they hold in autograd's backward thread too.
    sdpa = sdpa_kernel(SDPBackend.FLASH_ATTENTION) if name == "packed_causal_fa2" else contextlib.nullcontext()
    try:
        with sdpa, self_calls(SELF_CALL_VARIANTS.get(name, "auto")), \
                (cudnn_after(plans) if plans is not None else contextlib.nullcontext()), \
                cudnn_bucket(BENCH_BUCKET if name == "shared_prefix_cudnn_bucketed" else 0):
            yield
    finally:
        if before is None:
            os.environ.pop("SHARED_PREFIX_KERNELS", None)
        else:
            os.environ["SHARED_PREFIX_KERNELS"] = before
