"""Benchmark: ``python -m shared_prefix.bench``.

One step is the forward and backward of the completion log-probs of a GRPO micro-batch: B prompts of P tokens, each
with G completions of S tokens (config ``PxSxGxB``). Variants, measured side by side in one run:

- ``baseline``: stock rows ``[prompt, completion]`` as TRL builds them, SDPA, logits only at completion positions;
- ``packed_causal``: each group as one causal row of P + G·S tokens (the limit proxy: our token count with plain
  causal attention, so its log-probs are wrong by design); ``packed_causal_fa2`` (CUDA only) holds its SDPA to
  flash-attention 2 for the whole step: on Hopper SDPA picks cuDNN, which builds a graph per new shape, so under
  ``--vary`` the proxy pays those builds (as stock packed training would) and this one does not; with fixed shapes
  it splits our gap to the proxy into FA2's part (ours runs FA2 wherever a shape has not recurred) and the rest;
- ``shared_prefix``: ours (``_fa2`` / ``_cudnn`` / ``_cudnn_views``: one attention kernel forced, CUDA;
  ``_full_head``: the LM head in one piece instead of vocabulary slices; ``_split`` / ``_fused``: the prefixes'
  and the completions' causal attention forced apart, as DESIGN's three calls, or into one call, where by default
  each kernel chooses: one call on flash-attention 2, apart on cuDNN and the CPU kernels);
- ``prefix_grouper``: the original ``prefix-grouper`` package through its API, where it is installed;
- ``flex``: FlexAttention with a shared-prefix block mask (CUDA only; compile time reported separately).

Shapes: by default every step of a config has the same shapes, and the numbers are the steady state of a run that
repeats them (ours with ``cudnn_after(0)``: the cuDNN graphs of the long calls are built in the untimed steps, as
after the first 8 plans of a shape by default). ``--vary`` gives every step a new prompt length (P, P + 8, P + 16,
…; the same sequence for every variant), as GRPO batches have: whatever a kernel builds per shape (cuDNN graphs,
FlexAttention's block masks and recompiles) is then paid in the timed steps, and ours runs with its defaults.
``shared_prefix_eager_cudnn`` is ours giving every long one-batch call to cuDNN at once (the default before
2026-11-27); with fixed shapes it equals ``shared_prefix``. ``shared_prefix_cudnn_bucketed`` pads the causal self
calls to a multiple of 512 tokens (``cudnn_bucket``) and gives a call to cuDNN once its (padded) shape was seen
in one earlier plan, so that under ``--vary`` the prompts' call reaches cuDNN on recurring buckets; measure it in a
process of its own (the shape counts and cuDNN's graph cache are process-wide).

``--window W`` gives every layer a sliding window of W tokens (Qwen2's ``use_sliding_window``, as Mistral and
Gemma 3's sliding layers apply it); ``flex`` and ``prefix_grouper`` implement full causal attention only and are
left out then.

Per variant: the median of the timed steps after warm-up (rounds run the variants in turn, so drifts in the
machine's speed fall on all of them alike), the first step's time apart (compiles, graph builds), peak memory
above the weights, and max |Δ logprob|, gradient rel L2 and cosine against ``baseline``; on CUDA also the GPU
busy time of one profiled step (its kernels' summed durations, and those of its attention kernels), which leaves
out the host's time to issue the step.
Writes ``results.jsonl``, ``results.md`` and ``results.png``.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import platform
import subprocess
import sys
from pathlib import Path
from typing import Callable, Optional

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from tqdm import tqdm

import shared_prefix as sp
from shared_prefix._attention import cudnn_after, cudnn_bucket, self_calls
from shared_prefix._logprobs import token_logprobs
from shared_prefix._measure import UNTIMED_STEPS, measure_methods
from shared_prefix.hf import enable_checkpointing
from shared_prefix._reference import stock_logprobs

MODELS = {
    # Qwen2-shaped; the 0.5B/1.5B entries have Qwen2.5's shapes, with random weights built locally.
    "tiny": dict(hidden_size=256, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                 intermediate_size=704, vocab_size=8192),
    "qwen2.5-0.5b": dict(hidden_size=896, num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2,
                         intermediate_size=4864, vocab_size=151936),
    "qwen2.5-1.5b": dict(hidden_size=1536, num_hidden_layers=28, num_attention_heads=12, num_key_value_heads=2,
                         intermediate_size=8960, vocab_size=151936),
}
PRESETS = {
    "cpu-small": dict(device="cpu", model="tiny", dtype="float32", grad_ckpt=False, steps=5,
                      configs=["512x64x8x1", "1024x128x8x2"]),
    "gpu": dict(device="cuda", model="qwen2.5-0.5b", dtype="bfloat16", grad_ckpt=True, steps=5,
                configs=["4096x512x8x1", "8192x256x16x1", "16384x1024x8x1"]),
}
# Order of measurement: the reference first; the original package last (it may not fit long configs).
VARIANTS = ["baseline", "packed_causal", "packed_causal_fa2", "shared_prefix", "shared_prefix_fa2",
            "shared_prefix_cudnn", "shared_prefix_cudnn_views", "shared_prefix_full_head", "shared_prefix_split",
            "shared_prefix_fused", "shared_prefix_eager_cudnn", "shared_prefix_cudnn_bucketed", "flex",
            "prefix_grouper"]
# Variants that run ours with a forced kernel choice (SHARED_PREFIX_KERNELS for the whole measurement, so the
# checkpoint recompute in backward uses the same kernels as the forward).
KERNEL_VARIANTS = {"shared_prefix_fa2": "flash", "shared_prefix_cudnn": "cudnn",
                   "shared_prefix_cudnn_views": "cudnn_views"}
# Variants that force how the prefixes' and completions' causal calls run (`_attention.self_calls`), likewise.
SELF_CALL_VARIANTS = {"shared_prefix_split": "split", "shared_prefix_fused": "fused"}
# Variants that on CPU run exactly what shared_prefix runs (its kernels keep the three calls; cuDNN is CUDA's), or
# that only pad it for cuDNN's sake: left out of the CPU default, which must fit cpu-small in 3 minutes. Named in
# --variants, they run.
SAME_AS_OURS_ON_CPU = ("shared_prefix_split", "shared_prefix_eager_cudnn", "shared_prefix_cudnn_bucketed")
# shared_prefix_cudnn_bucketed: the causal self calls padded to this multiple (`cudnn_bucket`), cuDNN for a shape
# seen in one earlier plan: under --vary the prompts' call reaches cuDNN once its bucket recurs, while the cross
# call (unpadded, a new length every step) stays on FA2. The counts and cuDNN's graph cache are process-wide, so
# measure it in a process of its own (or before any other cuDNN variant): scripts/gpu_check.sh does.
BENCH_BUCKET = 512
# --vary: step k of every variant has prompts of P + VARY_STEP·k tokens (longer, so a config at a kernel's
# threshold, 8192 keys for cuDNN, stays above it).
VARY_STEP = 8


def parse_config(text: str) -> tuple[int, int, int, int]:
    try:
        p, s, g, b = (int(x) for x in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--config: expected PxSxGxB (e.g. 4096x512x8x1), got {text!r}") from None
    if min(p, s, g, b) < 1:
        raise argparse.ArgumentTypeError(f"--config: every field must be ≥ 1, got {text!r}")
    return p, s, g, b


def build_model(name: str, dtype: torch.dtype, device: torch.device, grad_ckpt: bool, window: Optional[int] = None):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    windowed = {} if window is None else dict(use_sliding_window=True, sliding_window=window, max_window_layers=0)
    cfg = Qwen2Config(**MODELS[name], max_position_embeddings=32768, rope_theta=1e6, rms_norm_eps=1e-6,
                      tie_word_embeddings=True, **windowed)
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(0)
    with torch.device(device):
        model = Qwen2ForCausalLM(cfg)
    model.to(dtype)
    if grad_ckpt:
        enable_checkpointing(model)
    model.train()  # attention dropout is 0 in Qwen2 configs
    return model


def make_batch(p: int, s: int, g: int, b: int, vocab: int, device: torch.device, seed: int = 0):
    """B prompts of P tokens, G completions of S tokens each, rows group by group (as TRL's generation batch)."""
    gen = torch.Generator().manual_seed(seed)
    prompts = torch.randint(1, vocab, (b, p), generator=gen)
    prompt_ids = prompts.repeat_interleave(g, dim=0)
    completion_ids = torch.randint(1, vocab, (b * g, s), generator=gen)
    ones = lambda t: torch.ones_like(t, dtype=torch.bool)  # noqa: E731
    return [x.to(device) for x in (prompt_ids, ones(prompt_ids), completion_ids, ones(completion_ids))]


def packed_rows(prompt_ids, completion_ids, g: int):
    """Each group as one row ``[prompt, c_1 … c_G]``, its position ids (completions restart at P) and, for every
    completion token, the flat index of the row position that predicts it."""
    bg, p = prompt_ids.shape
    s = completion_ids.shape[1]
    b = bg // g
    dev = prompt_ids.device
    ids = torch.cat([prompt_ids[::g], completion_ids.view(b, g * s)], dim=1)
    pos = torch.cat([torch.arange(p, device=dev), p + torch.arange(s, device=dev).repeat(g)]).expand(b, -1)
    j = torch.arange(s, device=dev)
    within = torch.where(j == 0, torch.full_like(j, p - 1), p + j - 1)  # for completion 0
    per_completion = within[None, :] + torch.where(j[None, :] == 0, 0, torch.arange(g, device=dev)[:, None] * s)
    length = p + g * s
    pred = (torch.arange(b, device=dev)[:, None, None] * length + per_completion[None]).reshape(bg, s)
    return ids, pos, pred


def packed_rows_logprobs(model, ids, pos, pred, completion_ids, attention_mask):
    """Completion log-probs from per-group packed rows: the decoder on ``ids``, the LM head on the predictor rows."""
    hidden = model.get_decoder()(input_ids=ids, position_ids=pos, attention_mask=attention_mask,
                                 use_cache=False).last_hidden_state
    h = hidden.reshape(-1, hidden.shape[-1]).index_select(0, pred.reshape(-1))
    logp, _ = token_logprobs(model.get_output_embeddings()(h), completion_ids.reshape(-1), 1.0, False)
    return logp.view_as(completion_ids)


def packed_causal_logprobs(model, prompt_ids, completion_ids, g: int):
    ids, pos, pred = packed_rows(prompt_ids, completion_ids, g)
    # An all-ones mask keeps transformers from reading the restarting positions as packed sequences: plain causal.
    return packed_rows_logprobs(model, ids, pos, pred, completion_ids, torch.ones_like(ids))


class FlexVariant:
    """FlexAttention with a block mask: completions see their group's prompt and causally themselves."""

    def __init__(self, model, prompt_ids, completion_ids, g: int):
        from torch.nn.attention.flex_attention import create_block_mask

        self.model, self.g, self.completion_ids = model, g, completion_ids
        self.ids, self.pos, self.pred = packed_rows(prompt_ids, completion_ids, g)
        p, s = prompt_ids.shape[1], completion_ids.shape[1]

        def mask_mod(b, h, q, kv):
            same_completion = torch.div(q - p, s, rounding_mode="floor") == torch.div(kv - p, s, rounding_mode="floor")
            return (kv <= q) & ((kv < p) | same_completion)

        length = self.ids.shape[1]
        self.block_mask = create_block_mask(mask_mod, B=None, H=None, Q_LEN=length, KV_LEN=length,
                                            device=prompt_ids.device)

    def __call__(self):
        model = self.model
        # Left on flex through backward (the checkpoint recompute runs there); run_config resets it.
        model.set_attn_implementation("flex_attention")
        return packed_rows_logprobs(model, self.ids, self.pos, self.pred, self.completion_ids, self.block_mask)


# Variants that compute full causal attention whatever the model's sliding window.
FULL_ATTENTION_ONLY = ("flex", "prefix_grouper")
# The table's note for the limit proxies (their log-probs are wrong by design).
PROXY_NOTES = {"packed_causal": "limit proxy; wrong mask by design",
               "packed_causal_fa2": "limit proxy on flash-attention 2"}


def variant_fns(model, batch, g: int, device: torch.device, wanted: list[str]) -> dict[str, Callable]:
    pid, pmask, cid, cmask = batch
    fns: dict[str, Callable] = {}
    windowed = bool(sp.hf.model_windows(model))
    for name in wanted:
        if windowed and name in FULL_ATTENTION_ONLY:
            continue
        if name == "baseline":
            fns[name] = lambda: stock_logprobs(model, pid, pmask, cid, cmask)
        elif name == "packed_causal" or (name == "packed_causal_fa2" and device.type == "cuda"):
            fns[name] = lambda: packed_causal_logprobs(model, pid, cid, g)
        elif (name in ("shared_prefix", "shared_prefix_eager_cudnn", "shared_prefix_cudnn_bucketed")
              or name in SELF_CALL_VARIANTS
              or (name in KERNEL_VARIANTS and device.type == "cuda")):
            fns[name] = lambda: sp.completion_logprobs(model, pid, pmask, cid, cmask, group_sizes=g)
        elif name == "shared_prefix_full_head":
            # Ours with the LM head in one piece (no vocabulary slices): what the memory-lean head costs and saves.
            vocab = model.config.vocab_size
            fns[name] = lambda: sp.completion_logprobs(model, pid, pmask, cid, cmask, group_sizes=g, chunk_size=vocab)
        elif name == "prefix_grouper":
            try:
                from shared_prefix._prefix_grouper import prefix_grouper_logprobs

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


def git_commit() -> str:
    # A copy of the tree without its .git (a device machine's) names the commit through the environment.
    if os.environ.get("SHARED_PREFIX_COMMIT"):
        return os.environ["SHARED_PREFIX_COMMIT"]
    try:
        here = Path(__file__).resolve().parent
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=here, capture_output=True, text=True)
        return out.stdout.strip() or "unknown"
    except OSError:
        return "unknown"


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{platform.processor() or platform.machine()} ({torch.get_num_threads()} threads)"


def run_config(model, cfg, args, device, bar):
    """One result row per variant, the variants measured side by side (interleaved timed rounds)."""
    p, s, g, b = cfg
    vocab = model.config.vocab_size
    batch = make_batch(p, s, g, b, vocab, device)
    cmask = batch[3]
    adv = torch.randn(b * g, generator=torch.Generator().manual_seed(1)).to(device)
    # Fixed shapes: the steady state of a run repeating them, cuDNN's graphs built in the untimed steps.
    cudnn_plans = None if args.vary else 0

    @contextlib.contextmanager
    def setup(name):
        model.set_attn_implementation("sdpa")  # every variant starts from the stock implementation
        before = os.environ.get("SHARED_PREFIX_KERNELS")
        if name in KERNEL_VARIANTS:
            # For the whole step, so the checkpoint recompute in backward uses the forward's kernels.
            os.environ["SHARED_PREFIX_KERNELS"] = KERNEL_VARIANTS[name]
        plans = {"shared_prefix_eager_cudnn": 0, "shared_prefix_cudnn_bucketed": 1}.get(name, cudnn_plans)
        # Process-wide flags, so they hold in autograd's backward thread too (the checkpoint recompute).
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

    fns = variant_fns(model, batch, g, device, args.variants)
    if args.vary:
        # One batch per step each variant takes: the untimed ones, the profiled one on CUDA, the timed rounds.
        batches = [batch] + [make_batch(p + VARY_STEP * k, s, g, b, vocab, device, seed=k)
                             for k in range(1, UNTIMED_STEPS + 1 + args.steps)]
        fns = {name: Varying(lambda bt, name=name: variant_fns(model, bt, g, device, [name])[name], batches)
               for name in fns}
    results = measure_methods(model, fns, adv, cmask, device, args.steps, bar, setup)
    model.set_attn_implementation("sdpa")
    rows = []
    for name, stats in results.items():
        # Tokens forwarded: every row [prompt, completion] for the baseline; one prompt per group otherwise.
        row = dict(config="x".join(map(str, cfg)), variant=name,
                   tokens=b * g * (p + s) if name == "baseline" else b * (p + g * s), **stats)
        if name == "flex" and "error" not in row:
            row["compile_s"] = max(0.0, row["first_step_s"] - row["median_s"])
        rows.append(row)
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return rows


def markdown(rows: list[dict], meta: dict) -> str:
    window = "" if meta.get("window") is None else f", sliding window {meta['window']} on every layer"
    shapes = (f"a new prompt length every step (P, P + {VARY_STEP}, …)" if meta.get("vary")
              else "the same shapes every step (steady state)")
    # CUDA runs add the GPU busy time of one profiled step (kernels only: what the step costs the GPU, apart from
    # the host's time to issue it) and its attention part, with its ratio to packed_causal's.
    busy = any("gpu_busy_s" in r for r in rows)
    lines = [
        f"Device: {meta['device_name']}; model {meta['model']} (random weights{window}), {meta['dtype']}, "
        f"grad checkpointing {'on' if meta['grad_ckpt'] else 'off'}; torch {meta['torch']}; commit {meta['commit']}; "
        f"{meta['date']}. Median of {meta['steps']} interleaved rounds (forward+backward of completion log-probs), "
        f"{shapes}.",
        "",
        "| config PxSxGxB | variant | median s | first step s | vs baseline | vs packed_causal | peak mem GiB "
        "| max abs Δlogp | grad rel L2 | grad cos |"
        + (" GPU busy s (attention) | busy vs packed_causal |" if busy else "") + " note |",
        "|---|---|---|---|---|---|---|---|---|---|" + ("---|---|" if busy else "") + "---|",
    ]
    for cfg in dict.fromkeys(r["config"] for r in rows):
        group = {r["variant"]: r for r in rows if r["config"] == cfg}
        base = group.get("baseline")
        limit = group.get("packed_causal")
        base = base if base and "error" not in base else None
        limit = limit if limit and "error" not in limit else None
        for r in group.values():
            if "error" in r:
                dashes = " — |" * (10 if busy else 8)
                lines.append(f"| {cfg} | {r['variant']} |{dashes} {r['error']} |")
                continue
            speed = f"{base['median_s'] / r['median_s']:.2f}× faster" if base else "—"
            ratio = f"{r['median_s'] / limit['median_s']:.2f}×" if limit else "—"
            notes = [f"+{r['compile_s']:.0f} s first compile" if "compile_s" in r else ""]
            if r["variant"] in PROXY_NOTES:
                notes = [PROXY_NOTES[r["variant"]]]
            if r.get("interrupted"):
                notes.append(f"interrupted: median of {r['rounds']} of {meta['steps']} rounds")
            gpu = ""
            if busy:
                gpu = " — | — |"
                if "gpu_busy_s" in r:
                    vs = (f"{r['gpu_busy_s'] / limit['gpu_busy_s']:.2f}×"
                          if limit and limit.get("gpu_busy_s") else "—")
                    gpu = f" {r['gpu_busy_s']:.3f} ({r['gpu_attn_s']:.3f}) | {vs} |"
            note = "; ".join(n for n in notes if n)
            first = f"{r['first_step_s']:.3f}" if "first_step_s" in r else "—"
            lines.append(
                f"| {cfg} | {r['variant']} | {r['median_s']:.3f} | {first} | {speed} | {ratio} | "
                f"{r['peak_mem_bytes'] / 2**30:.2f} | {r['max_abs_logp_diff']:.1e} | {r['grad_rel_l2']:.1e} | "
                f"{r['grad_cos']:.6f} |{gpu} {note} |"
            )
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    configs = list(dict.fromkeys(r["config"] for r in rows))
    variants = list(dict.fromkeys(r["variant"] for r in rows))
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    width = 0.8 / max(1, len(variants))
    for i, v in enumerate(variants):
        xs, ts, ms = [], [], []
        for j, c in enumerate(configs):
            r = next((r for r in rows if r["config"] == c and r["variant"] == v and "error" not in r), None)
            if r is not None:
                xs.append(j + i * width)
                ts.append(r["median_s"])
                ms.append(r["peak_mem_bytes"] / 2**30)
        axes[0].bar(xs, ts, width, label=v)
        axes[1].bar(xs, ms, width, label=v)
    for ax, title in zip(axes, ["step time (s, median)", "peak memory above weights (GiB)"]):
        ax.set_xticks([j + width * (len(variants) - 1) / 2 for j in range(len(configs))], configs)
        ax.set_xlabel("P x S x G x B")
        ax.set_title(title)
    if variants:
        axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m shared_prefix.bench", description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", choices=sorted(PRESETS), default=None)
    ap.add_argument("--device", choices=["cpu", "cuda"], default=None)
    ap.add_argument("--config", action="append", type=parse_config, help="PxSxGxB; repeatable")
    ap.add_argument("--model", choices=sorted(MODELS), default=None)
    ap.add_argument("--dtype", choices=["float32", "bfloat16", "float16", "float64"], default=None)
    ap.add_argument("--grad-ckpt", action=argparse.BooleanOptionalAction, default=None)
    ap.add_argument("--variants", default=None,
                    help="comma-separated subset of " + ",".join(VARIANTS) + " (default: all of them; on CPU without "
                    + " and ".join(SAME_AS_OURS_ON_CPU) + ", which run what shared_prefix runs there)")
    ap.add_argument("--steps", type=int, default=None,
                    help="timed rounds (one step of each variant per round; median reported; ≥ 3; preset: 5)")
    ap.add_argument("--window", type=int, default=None, help="a sliding window of this many tokens on every layer")
    ap.add_argument("--vary", action="store_true",
                    help=f"a new prompt length every step (P, P + {VARY_STEP}, …), as in training (default: the "
                         "same shapes every step)")
    ap.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1), help="CPU threads")
    ap.add_argument("--out", default="bench-out")
    args = ap.parse_args(argv)
    preset = PRESETS[args.preset or ("gpu" if args.device == "cuda" else "cpu-small")]
    args.device = args.device or preset["device"]
    args.model = args.model or preset["model"]
    args.dtype = args.dtype or preset["dtype"]
    args.grad_ckpt = preset["grad_ckpt"] if args.grad_ckpt is None else args.grad_ckpt
    args.steps = preset["steps"] if args.steps is None else args.steps
    configs = args.config or [parse_config(c) for c in preset["configs"]]
    if args.variants is None:
        skip = SAME_AS_OURS_ON_CPU if args.device == "cpu" else ()
        args.variants = ",".join(v for v in VARIANTS if v not in skip)
    args.variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = set(args.variants) - set(VARIANTS)
    if unknown:
        ap.error(f"--variants: unknown {sorted(unknown)}")
    if "baseline" in args.variants:  # the reference for every comparison runs first
        args.variants = ["baseline"] + [v for v in args.variants if v != "baseline"]
    if args.steps < 3:
        ap.error("--steps: at least 3")
    if args.window is not None and args.window < 1:
        ap.error("--window: at least 1 token")
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda: no CUDA device is available")
    if device.type == "cpu":
        torch.set_num_threads(args.threads)

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    model = build_model(args.model, getattr(torch, args.dtype), device, args.grad_ckpt, args.window)
    meta = dict(device_name=device_name(device), model=args.model, window=args.window, dtype=args.dtype,
                grad_ckpt=args.grad_ckpt, vary=args.vary,
                torch=torch.__version__, commit=git_commit(), steps=args.steps,
                date=datetime.date.today().isoformat(), python=sys.version.split()[0])
    per_variant = args.steps + UNTIMED_STEPS
    total = len(configs) * len(args.variants) * per_variant
    rows: list[dict] = []
    interrupted = False
    with tqdm(total=total, desc="bench", unit="step") as bar, open(out / "results.jsonl", "w") as f:
        for i, cfg in enumerate(configs):
            bar.set_postfix_str("x".join(map(str, cfg)))
            config_rows = run_config(model, cfg, args, device, bar)
            for r in config_rows:
                r.update(meta)
                f.write(json.dumps(r) + "\n")
                f.flush()
                rows.append(r)
            if any(r.get("interrupted") for r in config_rows):
                interrupted = True  # SIGINT (e.g. a time limit): keep what was measured, skip the rest
                break
            bar.total = bar.n * len(configs) // (i + 1)  # variants unavailable here take no steps
            bar.refresh()
    table = markdown(rows, meta)
    (out / "results.md").write_text(table)
    plot(rows, out / "results.png")
    print(table)
    print(f"wrote {out / 'results.jsonl'}, {out / 'results.md'}, {out / 'results.png'}")
    if interrupted:
        print("interrupted: the results above are partial (see each row's rounds)", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
