"""``python -m shared_prefix.bench.sharded``: a whole GRPO trainer step under each sharding engine, stock
``trl.GRPOTrainer`` against ``shared_prefix.trl.SharedPrefixGRPOTrainer``, on ``--ranks`` ranks of one machine.

For every engine of ``--engines`` (``bench.engines``: DDP, DeepSpeed ZeRO-2/ZeRO-3, FSDP1, FSDP2, each set up
through the trainer config as TRL's users set it) and both trainers, one ``torchrun`` launch trains ``--warmup`` +
``--steps`` steps from the same local checkpoint, data and seed (the trainer step of ``bench.trainer_step``: its
model shapes, tokenizer, data, reward and ``GRPOConfig``, with ``B`` prompts × ``G`` completions per rank). NCCL on
GPUs (one per rank), gloo on CPU. Each rank reports its step times (``on_step_begin`` to ``on_step_end``, the
median over the timed steps) and its peak memory: the GPU's peak allocation over the timed steps on CUDA, the
process's peak resident set on CPU (which includes the interpreter and libraries, the same for both trainers).
The table gives per engine the slowest rank's median step (a step ends when its slowest rank does), the largest
per-rank peak, the speedup, the tokens shared_prefix saved and what the engine made of the weights. Writes
``sharded.json`` and ``sharded.md`` to ``--out``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Optional

import torch

from shared_prefix.bench import engines
from shared_prefix.bench.cli import git_commit, launch_ranks, write_report
from shared_prefix.bench.variants import MODELS

TRAINERS = ("stock", "shared_prefix")


def rank_main(args) -> int:
    """One rank of one launch: train, then write this rank's results to ``args.result``."""
    import trl
    from transformers import PrinterCallback

    from shared_prefix.bench import trainer_step as ts
    from shared_prefix.trl import METRIC, SharedPrefixGRPOTrainer

    engines.prepare_cpu_ranks(args.engine)
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    device = torch.device("cuda" if cuda else "cpu")
    if not cuda:
        torch.set_num_threads(args.threads)
    vocab = MODELS[args.model]["vocab_size"]
    config = ts.grpo_config(args, Path(args.workdir) / args.trainer, **engines.trainer_args(args.engine))
    timer = ts.StepTimer(device)
    cls = SharedPrefixGRPOTrainer if args.trainer == "shared_prefix" else trl.GRPOTrainer
    trainer = cls(model=args.checkpoint, reward_funcs=ts.reward, args=config,
                  train_dataset=ts.dataset(args.prompts * args.nproc * (args.warmup + args.steps),
                                           args.prompt_tokens, vocab),
                  processing_class=ts.tokenizer(vocab), callbacks=[timer])
    trainer.remove_callback(PrinterCallback)
    trainer.train()
    steps = timer.steps[args.warmup:]
    result = dict(rank=int(os.environ.get("RANK", 0)), step_s=statistics.median(s["total"] for s in steps),
                  steps_s=[s["total"] for s in steps], sharding=engines.sharding(trainer.model_wrapped))
    if cuda:
        result["peak_mem_gib"] = max(s["peak_mem_gib"] for s in steps)
    else:
        result["peak_rss_gib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux
    if args.trainer == "shared_prefix":
        saved = [h[METRIC] for h in trainer.state.log_history if METRIC in h and h.get("step", 0) > args.warmup]
        result["tokens_saved_frac"] = statistics.mean(saved) if saved else None
        result["fallbacks"] = sorted(trainer.shared_prefix_fallbacks.said)
    Path(f"{args.result}.rank{result['rank']}.json").write_text(json.dumps(result))
    trainer.accelerator.wait_for_everyone()
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    return 0


def launch(args, engine: str, trainer: str, checkpoint: Path, work: Path) -> list:
    """One torchrun launch of ``trainer`` under ``engine``; every rank's results."""
    result = work / f"{engine}-{trainer}"
    argv = ["--rank-worker", "--engine", engine, "--trainer", trainer, "--checkpoint", checkpoint, "--workdir", work,
            "--result", result, "--model", args.model, "--prompt-tokens", args.prompt_tokens, "--completion-tokens",
            args.completion_tokens, "--group", args.group, "--prompts", args.prompts, "--steps", args.steps,
            "--warmup", args.warmup, "--beta", args.beta, "--threads", args.threads, "--dtype", args.dtype,
            "--ranks", args.nproc, "--grad-ckpt" if args.grad_ckpt else "--no-grad-ckpt"]
    return launch_ranks("shared_prefix.bench.sharded", argv, args.nproc, args.port, args.threads, result)


def summary(ranks: list) -> dict:
    """The launch's slowest rank's median step and its largest per-rank peak."""
    if any("error" in r for r in ranks):
        return dict(error=next(r["error"] for r in ranks if "error" in r))
    out = dict(step_s=max(r["step_s"] for r in ranks), sharding=ranks[0]["sharding"], ranks=ranks)
    for key in ("peak_mem_gib", "peak_rss_gib", "tokens_saved_frac"):
        values = [r[key] for r in ranks if r.get(key) is not None]
        if values:
            out[key] = max(values) if key != "tokens_saved_frac" else statistics.mean(values)
    out["fallbacks"] = sorted({f for r in ranks for f in r.get("fallbacks", [])})
    return out


def markdown(report: dict) -> str:
    m = report["meta"]
    mem = "peak GPU memory GiB" if m["device"] == "cuda" else "peak RSS GiB (process)"
    key = "peak_mem_gib" if m["device"] == "cuda" else "peak_rss_gib"
    lines = [f"Device: {m['device_name']}, {m['nproc']} ranks ({m['backend']}); model {m['model']} (random weights), "
             f"{m['dtype']}, grad checkpointing {'on' if m['grad_ckpt'] else 'off'}; torch {m['torch']}, "
             f"transformers {m['transformers']}, trl {m['trl']}, deepspeed {m['deepspeed']}; commit {m['commit']}; "
             f"{m['date']}.", "",
             f"One GRPO trainer step per rank: B={m['prompts']} prompts of P={m['prompt_tokens']} tokens × "
             f"G={m['group']} completions of S={m['completion_tokens']} tokens, beta={m['beta']}; median of "
             f"{m['steps']} timed steps after {m['warmup']} warm-up step(s), the slowest rank's; memory: the largest "
             "rank's peak.", "",
             f"| engine | weights | stock step s | ours step s | speedup | stock {mem} | ours {mem} | tokens saved |",
             "|---|---|---:|---:|---:|---:|---:|---:|"]
    for engine, runs in report["engines"].items():
        stock, ours = runs["stock"], runs["shared_prefix"]
        if "error" in stock or "error" in ours:
            lines.append(f"| {engine} | failed: {(stock.get('error') or ours.get('error'))[:120]!r} | | | | | | |")
            continue
        speed = stock["step_s"] / ours["step_s"] if ours["step_s"] > 0 else float("nan")
        saved = ours.get("tokens_saved_frac")
        lines.append(f"| {engine} | {ours['sharding']} | {stock['step_s']:.3f} | {ours['step_s']:.3f} | "
                     f"{speed:.2f}× | {stock.get(key, float('nan')):.2f} | {ours.get(key, float('nan')):.2f} | "
                     f"{'—' if saved is None else f'{saved:.1%}'} |")
    fallbacks = {e: r["shared_prefix"]["fallbacks"] for e, r in report["engines"].items()
                 if r["shared_prefix"].get("fallbacks")}
    if fallbacks:
        lines += ["", "Fell back to stock: " + "; ".join(f"{e}: {', '.join(f)}" for e, f in fallbacks.items())]
    return "\n".join(lines) + "\n"


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m shared_prefix.bench.sharded", description=__doc__.split("\n\n")[0])
    ap.add_argument("--engines", default=",".join(engines.ENGINES),
                    help=f"comma-separated, of {', '.join(engines.ENGINES)} (default: all)")
    ap.add_argument("--ranks", dest="nproc", type=int, default=2, help="ranks (default 2; one GPU each on CUDA)")
    ap.add_argument("--model", choices=sorted(MODELS), default="tiny")
    ap.add_argument("--dtype", choices=["float32", "bfloat16"], default=None,
                    help="weights' dtype, and bf16 autocast when bfloat16 (default: bfloat16 on cuda, float32 on cpu)")
    ap.add_argument("--prompt-tokens", type=int, default=512, help="P: tokens per prompt (default 512)")
    ap.add_argument("--completion-tokens", type=int, default=64, help="S: tokens per completion (default 64)")
    ap.add_argument("--group", type=int, default=8, help="G: completions per prompt (default 8)")
    ap.add_argument("--prompts", type=int, default=1, help="B: prompts per rank and step (default 1)")
    ap.add_argument("--steps", type=int, default=3, help="timed steps per trainer (default 3)")
    ap.add_argument("--warmup", type=int, default=1, help="untimed steps per trainer before them (default 1)")
    ap.add_argument("--beta", type=float, default=0.0, help="KL coefficient (default 0, trl's default)")
    ap.add_argument("--grad-ckpt", action=argparse.BooleanOptionalAction, default=False)
    ap.add_argument("--threads", type=int, default=1, help="CPU threads per rank (default 1)")
    ap.add_argument("--port", type=int, default=29400, help="torchrun's master port (default 29400)")
    ap.add_argument("--out", default="bench-out")
    # One rank of one launch (what the launcher runs under torchrun).
    ap.add_argument("--rank-worker", action="store_true", help=argparse.SUPPRESS)
    for name in ("--engine", "--trainer", "--checkpoint", "--workdir", "--result"):
        ap.add_argument(name, help=argparse.SUPPRESS)
    return ap


def main(argv: Optional[list[str]] = None) -> int:
    ap = parser()
    args = ap.parse_args(argv)
    cuda = torch.cuda.is_available()
    args.device = "cuda" if cuda else "cpu"
    args.dtype = args.dtype or ("bfloat16" if cuda else "float32")
    if args.rank_worker:
        return rank_main(args)
    chosen = [e.strip() for e in args.engines.split(",") if e.strip()]
    bad = [e for e in chosen if e not in engines.ENGINES]
    if bad or not chosen:
        ap.error(f"--engines: unknown {', '.join(bad) or '(none given)'}; choose from {', '.join(engines.ENGINES)}")
    if args.nproc < 2:
        ap.error("--ranks: at least 2 (a sharding engine needs several ranks)")
    if cuda and torch.cuda.device_count() < args.nproc:
        ap.error(f"--ranks {args.nproc}: this machine has {torch.cuda.device_count()} GPU(s), one per rank needed")
    if min(args.prompt_tokens, args.completion_tokens, args.prompts, args.steps, args.warmup) < 1 or args.group < 2:
        ap.error("P, S, B, --steps and --warmup must be at least 1, G at least 2")
    import deepspeed
    import transformers
    import trl

    from shared_prefix.bench import trainer_step as ts
    from shared_prefix.bench.cli import device_name

    report = dict(engines={})
    with tempfile.TemporaryDirectory(prefix="sharded-") as tmp:
        checkpoint = Path(tmp) / "model"
        ts.save_checkpoint(args.model, getattr(torch, args.dtype), torch.device("cpu"),
                           args.prompt_tokens + args.completion_tokens, checkpoint)
        for engine in chosen:
            report["engines"][engine] = {}
            for trainer in TRAINERS:
                print(f"sharded: {engine}, {trainer} ({args.nproc} ranks)", file=sys.stderr)
                report["engines"][engine][trainer] = summary(launch(args, engine, trainer, checkpoint, Path(tmp)))
    name = (device_name(torch.device("cuda")) if cuda
            else f"{platform.processor() or platform.machine()} ({args.threads} thread(s) per rank)")
    report["meta"] = dict(device=args.device, device_name=name, nproc=args.nproc,
                          backend="nccl" if cuda else "gloo", model=args.model, dtype=args.dtype,
                          grad_ckpt=args.grad_ckpt, prompt_tokens=args.prompt_tokens,
                          completion_tokens=args.completion_tokens, group=args.group, prompts=args.prompts,
                          steps=args.steps, warmup=args.warmup, beta=args.beta, threads=args.threads,
                          torch=torch.__version__, transformers=transformers.__version__, trl=trl.__version__,
                          deepspeed=deepspeed.__version__, commit=git_commit(),
                          date=datetime.date.today().isoformat())
    write_report(args.out, "sharded", report, markdown(report))
    failed = [e for e, r in report["engines"].items() if any("error" in t for t in r.values())]
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
