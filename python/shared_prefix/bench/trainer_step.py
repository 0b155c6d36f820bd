"""``python -m shared_prefix.bench.trainer_step``: one whole GRPO trainer step, stock ``trl.GRPOTrainer`` against
``shared_prefix.trl.SharedPrefixGRPOTrainer``, on one device, with generation by transformers (no vLLM).

Both trainers start from the same locally built checkpoint (a Qwen2 of the bench's ``--model`` shapes, random
weights, saved to a temporary directory), the same word-level tokenizer (one word per vocabulary entry, so a prompt
of P words is P tokens), the same data, seed and ``GRPOConfig``. One trainer step is one optimizer step on one
generation batch: B prompts × G completions are generated (``min_new_tokens`` = ``max_completion_length`` = S, so
every completion has S tokens), scored by a toy reward, their log-probs without grad computed where TRL computes
them in this config (the reference model's when ``--beta`` > 0; old log-probs are not needed with one optimizer step
per generation batch), then one loss forward, backward and optimizer step over all B·G rows. The trainers run one
after the other (stock first), each ``--warmup`` untimed steps (default 1) and then ``--steps`` timed steps.

A step's time runs from the trainer's ``on_step_begin`` to its ``on_step_end`` callback, and is split by timers
wrapped around methods of the trainer instance, each synchronizing CUDA on entry and exit (the same overhead on
both trainers). A timer's time excludes the timers nested in it, so no time is counted twice. Buckets:

- ``generation``: ``model.generate`` (sampling only: not tokenizing, decoding or rewards);
- ``logprobs_no_grad``: ``_get_per_token_logps_and_entropies`` called without grad (reference / old log-probs);
- ``loss_forward``: ``compute_loss``, including its log-prob forward with grad (also given apart, as
  ``loss_logprobs``: that forward alone, the part shared_prefix changes);
- ``backward``: ``accelerator.backward`` (with ``--grad-ckpt``, the recompute of the forward too);
- ``optimizer_rest``: the rest of the step: optimizer step, gradient clipping, prompt tokenization, decoding,
  rewards and advantages, the trainer's bookkeeping.

Reports per trainer the median of each over the timed steps, ours' speedup over stock per bucket, peak GPU memory
on CUDA, the tokens shared_prefix saved (its ``shared_prefix/tokens_saved_frac`` metric) and the completions' mean
length. Writes ``trainer_step.json`` and ``trainer_step.md`` to ``--out``.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import functools
import gc
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Optional, Union

import torch
from transformers import PrinterCallback, TrainerCallback

from shared_prefix.bench.cli import device_name, git_commit, open_device
from shared_prefix.bench.variants import MODELS

TRAINERS = ("stock", "shared_prefix")
# Timed buckets of a step, in report order; optimizer_rest is the step's total minus the others.
BUCKETS = ("generation", "logprobs_no_grad", "loss_forward", "backward", "optimizer_rest")
LABELS = {"generation": "generation (`model.generate`)",
          "logprobs_no_grad": "log-prob forwards, no grad (ref/old)",
          "loss_forward": "loss forward (with grad)",
          "loss_logprobs": "… of which the log-prob forward",
          "backward": "backward",
          "optimizer_rest": "optimizer + rest",
          "total": "**total step**"}
PAD, EOS = "<pad>", "<eos>"


def tokenizer(vocab_size: int):
    """A word-level tokenizer with exactly ``vocab_size`` entries: ``<pad>``, ``<eos>``, then ``w0``, ``w1``, …"""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = [PAD, EOS] + [f"w{i}" for i in range(vocab_size - 2)]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token=PAD, eos_token=EOS)


def save_checkpoint(name: str, dtype: torch.dtype, device: torch.device, length: int, path: Path) -> None:
    """A Qwen2 of ``MODELS[name]``'s shapes with random weights (seed 0), saved in ``dtype`` to ``path``."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    shape = {"tie_word_embeddings": True, **MODELS[name]}
    cfg = Qwen2Config(**shape, max_position_embeddings=max(32768, length), rope_theta=1e6, rms_norm_eps=1e-6,
                      pad_token_id=0, eos_token_id=1)  # no BOS, as the tokenizer
    torch.manual_seed(0)
    with torch.device(device):  # initialized where it will run: the large shapes initialize faster on a GPU
        model = Qwen2ForCausalLM(cfg)
    model.to(dtype).save_pretrained(path)
    del model


def dataset(prompts: int, length: int, vocab_size: int):
    """``prompts`` prompts of ``length`` random words (none of them ``<pad>`` or ``<eos>``)."""
    import datasets

    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab_size - 2, (prompts, length), generator=g).tolist()
    return datasets.Dataset.from_dict({"prompt": [" ".join(f"w{i}" for i in row) for row in ids]})


def reward(completions, **kwargs):
    """A toy reward (cheap, and varied within a group so that advantages are not all zero): the share of even
    word ids."""
    return [sum(w[1:].isdigit() and int(w[1:]) % 2 == 0 for w in c.split()) / max(1, len(c.split()))
            for c in completions]


class StepTimer(TrainerCallback):
    """Trainer callback timing each step and the wrapped methods in it. A wrapped call's time is exclusive: the
    time of wrapped calls nested in it goes to theirs only."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.steps: list[dict] = []
        self._times: dict = {}
        self._stack: list[float] = []
        self._t0 = 0.0

    def _sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()

    def wrap(self, fn: Callable, bucket: Union[str, Callable[[], str]]) -> Callable:
        """``fn`` timed into ``bucket`` (or the bucket ``bucket()`` names at the call)."""

        @functools.wraps(fn)
        def timed(*args, **kwargs):
            name = bucket() if callable(bucket) else bucket
            self._sync()
            self._stack.append(0.0)  # the time of the calls nested in this one
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self._sync()
                elapsed = time.perf_counter() - t0
                nested = self._stack.pop()
                self._times[name] = self._times.get(name, 0.0) + elapsed - nested
                if self._stack:
                    self._stack[-1] += elapsed
        return timed

    def on_step_begin(self, args, state, control, **kwargs):
        self._sync()
        if self.cuda:
            torch.cuda.reset_peak_memory_stats()
        self._times = {}
        self._t0 = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        self._sync()
        total = time.perf_counter() - self._t0
        t = self._times
        step = dict(total=total, generation=t.get("generation", 0.0), logprobs_no_grad=t.get("logprobs_no_grad", 0.0),
                    loss_forward=t.get("compute_loss", 0.0) + t.get("logprobs_grad", 0.0),
                    loss_logprobs=t.get("logprobs_grad", 0.0), backward=t.get("backward", 0.0))
        step["optimizer_rest"] = max(0.0, total - sum(step[b] for b in BUCKETS[:-1]))
        if self.cuda:
            step["peak_mem_gib"] = torch.cuda.max_memory_allocated() / 2**30
        self.steps.append(step)


def instrument(trainer, timer: StepTimer) -> None:
    """Wrap the trainer instance's methods that the buckets time (instance attributes shadow the class's; the
    shared-prefix override's fallback calls the stock method through ``super()``, not through these)."""
    # The model TRL's unwrap_model_for_generation yields on one device (no DDP/DeepSpeed wrapper).
    model = trainer.accelerator.unwrap_model(trainer.model)
    model.generate = timer.wrap(model.generate, "generation")
    trainer._get_per_token_logps_and_entropies = timer.wrap(
        trainer._get_per_token_logps_and_entropies,
        lambda: "logprobs_grad" if torch.is_grad_enabled() else "logprobs_no_grad")
    trainer.compute_loss = timer.wrap(trainer.compute_loss, "compute_loss")
    trainer.accelerator.backward = timer.wrap(trainer.accelerator.backward, "backward")


def grpo_config(args, output_dir: Path, **extra):
    """The trainer step's ``GRPOConfig`` (``extra``: more fields, such as an engine's)."""
    import trl

    fields = dict(
        output_dir=str(output_dir), seed=0, max_steps=args.warmup + args.steps, report_to="none", logging_steps=1,
        save_strategy="no", disable_tqdm=True, dataloader_num_workers=0, use_cpu=args.device == "cpu",
        bf16=args.dtype == "bfloat16", fp16=False,
        model_init_kwargs=dict(dtype=args.dtype, attn_implementation="sdpa"),
        # One optimizer step per generation batch of B prompts × G completions.
        per_device_train_batch_size=args.prompts * args.group, num_generations=args.group,
        gradient_accumulation_steps=1, steps_per_generation=1, num_iterations=1,
        max_completion_length=args.completion_tokens,
        generation_kwargs=dict(min_new_tokens=args.completion_tokens),  # no early <eos>: S tokens each
        gradient_checkpointing=args.grad_ckpt, beta=args.beta)
    return trl.GRPOConfig(**{**fields, **extra})


def run_trainer(which: str, args, checkpoint: Path, tok, data, work: Path) -> dict:
    """Train ``args.warmup`` + ``args.steps`` steps with one trainer; its timed steps and metrics."""
    import trl

    from shared_prefix.trl import METRIC, TREE_METRIC, SharedPrefixGRPOTrainer

    cls = SharedPrefixGRPOTrainer if which == "shared_prefix" else trl.GRPOTrainer
    timer = StepTimer(torch.device(args.device))
    trainer = cls(model=str(checkpoint), reward_funcs=reward, args=grpo_config(args, work / which),
                  train_dataset=data, processing_class=tok, callbacks=[timer])
    trainer.remove_callback(PrinterCallback)  # the logs of every step: kept in log_history, not printed
    instrument(trainer, timer)
    interrupted = False
    try:
        trainer.train()
    except KeyboardInterrupt:  # a time limit (SIGINT): keep the steps measured so far
        interrupted = True
    logs = [h for h in trainer.state.log_history if h.get("step", 0) > args.warmup]  # the timed steps'
    metric = lambda key: [h[key] for h in logs if key in h]  # noqa: E731
    steps = timer.steps[args.warmup:]
    if not steps:
        return dict(trainer=cls.__name__, interrupted=interrupted, error="no timed step")
    result = dict(
        trainer=cls.__name__, steps=steps, interrupted=interrupted,
        median={k: statistics.median(s[k] for s in steps) for k in steps[0]},
        warmup_total_s=[s["total"] for s in timer.steps[: args.warmup]],
        completion_mean_length=statistics.mean(metric("completions/mean_length") or [float("nan")]),
        beta=trainer.beta)
    if args.device == "cuda":
        result["peak_mem_gib"] = max(s["peak_mem_gib"] for s in steps)
    if which == "shared_prefix":
        result["tokens_saved_frac"] = statistics.mean(metric(METRIC)) if metric(METRIC) else None
        result["tree_tokens_saved_frac"] = statistics.mean(metric(TREE_METRIC)) if metric(TREE_METRIC) else None
        result["fallbacks"] = sorted(trainer.shared_prefix_fallbacks.said)
    del trainer
    gc.collect()
    if args.device == "cuda":
        torch.cuda.empty_cache()
    return result


def speedup(stock: float, ours: float) -> Optional[float]:
    return stock / ours if ours > 0 and stock > 0 else None


def markdown(report: dict) -> str:
    m = report["meta"]
    stock, ours = (report["trainers"][t] for t in TRAINERS)
    lines = [
        f"Device: {m['device_name']}; model {m['model']} (random weights, vocab {m['vocab_size']}), {m['dtype']}, "
        f"grad checkpointing {'on' if m['grad_ckpt'] else 'off'}; torch {m['torch']}, transformers "
        f"{m['transformers']}, trl {m['trl']}; commit {m['commit']}; {m['date']}.",
        "",
        f"One GRPO trainer step (generate + score + loss forward/backward + optimizer step): B={m['prompts']} prompts "
        f"of P={m['prompt_tokens']} tokens × G={m['group']} completions of S={m['completion_tokens']} tokens "
        f"(completions' mean length: stock {stock['completion_mean_length']:.1f}, ours "
        f"{ours['completion_mean_length']:.1f}), beta={m['beta']}, transformers generation. Median of {m['steps']} "
        f"timed steps after {m['warmup']} warm-up step(s) per trainer; the trainers ran one after the other, stock "
        "first. Each row is its own median, so the rows need not add up to the total's (every step's parts add up: "
        "see trainer_step.json).",
        "",
        f"| part of the step | {stock['trainer']} s | {ours['trainer']} s | speedup |",
        "|---|---:|---:|---:|",
    ]
    for key in (*BUCKETS[:3], "loss_logprobs", *BUCKETS[3:], "total"):
        s, o = stock["median"][key], ours["median"][key]
        x = report["speedup"][key]
        lines.append(f"| {LABELS[key]} | {s:.4f} | {o:.4f} | {'—' if x is None else f'{x:.2f}×'} |")
    if "peak_mem_gib" in stock:
        lines.append(f"| peak GPU memory GiB (max over steps) | {stock['peak_mem_gib']:.2f} | "
                     f"{ours['peak_mem_gib']:.2f} | |")
    lines.append("")
    saved = ours.get("tokens_saved_frac")
    lines.append(f"shared_prefix forwarded {'—' if saved is None else f'{saved:.1%}'} fewer tokens than the padded "
                 f"rows (`shared_prefix/tokens_saved_frac`, mean over the timed steps)"
                 + (f"; fell back to stock: {'; '.join(ours['fallbacks'])}." if ours.get("fallbacks") else "."))
    cut = [f"{r['trainer']} was interrupted after {len(r['steps'])} of {m['steps']} timed steps"
           for r in (stock, ours) if r.get("interrupted")]
    if cut:
        lines.append("; ".join(cut) + " (a time limit): its medians are over those.")
    return "\n".join(lines) + "\n"


def main(argv: Optional[list[str]] = None) -> int:
    import trl
    import transformers

    default_beta = next(f.default for f in dataclasses.fields(trl.GRPOConfig) if f.name == "beta")
    ap = argparse.ArgumentParser(prog="python -m shared_prefix.bench.trainer_step",
                                 description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", choices=sorted(MODELS), default="tiny")
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", choices=["float32", "bfloat16"], default=None,
                    help="weights' dtype, and bf16 autocast when bfloat16 (default: bfloat16 on cuda, float32 on cpu)")
    ap.add_argument("--prompt-tokens", type=int, default=512, help="P: tokens per prompt (default 512)")
    ap.add_argument("--completion-tokens", type=int, default=64, help="S: tokens per completion (default 64)")
    ap.add_argument("--group", type=int, default=8, help="G: completions per prompt (num_generations; default 8)")
    ap.add_argument("--prompts", type=int, default=2, help="B: prompts per step (default 2)")
    ap.add_argument("--steps", type=int, default=3, help="timed steps per trainer (default 3)")
    ap.add_argument("--warmup", type=int, default=1, help="untimed steps per trainer before them (default 1)")
    ap.add_argument("--beta", type=float, default=default_beta,
                    help=f"KL coefficient; > 0 adds a reference model's log-prob forward (default: trl's, "
                         f"{default_beta})")
    ap.add_argument("--grad-ckpt", action=argparse.BooleanOptionalAction, default=False,
                    help="gradient checkpointing (default: off; TRL's GRPOConfig defaults to on)")
    ap.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1), help="CPU threads (--device cpu)")
    ap.add_argument("--out", default="bench-out")
    args = ap.parse_args(argv)
    args.dtype = args.dtype or ("bfloat16" if args.device == "cuda" else "float32")
    if min(args.prompt_tokens, args.completion_tokens, args.prompts, args.steps) < 1 or args.group < 2:
        ap.error("P, S, B and --steps must be at least 1, G at least 2")
    if args.warmup < 1:
        ap.error("--warmup: at least 1 (the first step pays one-off costs)")
    if args.beta < 0:
        ap.error("--beta: at least 0")
    device = open_device(ap, args.device, args.threads)

    from shared_prefix.trl import SharedPrefixGRPOTrainer  # noqa: F401 (imported here, not in a trainer's steps)

    vocab = MODELS[args.model]["vocab_size"]
    tok = tokenizer(vocab)
    data = dataset(args.prompts * (args.warmup + args.steps), args.prompt_tokens, vocab)
    trainers = {}
    with tempfile.TemporaryDirectory(prefix="trainer_step-") as tmp:
        checkpoint = Path(tmp) / "model"
        save_checkpoint(args.model, getattr(torch, args.dtype), device,
                        args.prompt_tokens + args.completion_tokens, checkpoint)
        for which in TRAINERS:
            print(f"trainer_step: {which} ({args.warmup} + {args.steps} steps)", file=sys.stderr)
            trainers[which] = run_trainer(which, args, checkpoint, tok, data, Path(tmp))
            if trainers[which]["interrupted"]:
                break
    meta = dict(device_name=device_name(device), device=args.device, model=args.model, vocab_size=vocab,
                dtype=args.dtype, grad_ckpt=args.grad_ckpt, prompt_tokens=args.prompt_tokens,
                completion_tokens=args.completion_tokens, group=args.group, prompts=args.prompts, steps=args.steps,
                warmup=args.warmup,
                beta=args.beta, trl_default_beta=default_beta, torch=torch.__version__,
                transformers=transformers.__version__, trl=trl.__version__, commit=git_commit(),
                date=datetime.date.today().isoformat(), python=sys.version.split()[0])
    report = dict(meta=meta, trainers=trainers)
    complete = all("median" in trainers.get(t, {}) for t in TRAINERS)
    if complete:
        stock, ours = (trainers[t] for t in TRAINERS)
        report["speedup"] = {k: speedup(stock["median"][k], ours["median"][k]) for k in stock["median"]
                             if k != "peak_mem_gib"}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "trainer_step.json").write_text(json.dumps(report, indent=1) + "\n")
    if not complete:
        print(f"interrupted: partial results in {out / 'trainer_step.json'}", file=sys.stderr)
        return 130
    table = markdown(report)
    (out / "trainer_step.md").write_text(table)
    print(table)
    print(f"wrote {out / 'trainer_step.json'}, {out / 'trainer_step.md'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
