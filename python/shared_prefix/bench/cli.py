"""``python -m shared_prefix.bench``: presets, options, and the side-by-side run of every variant per config."""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
from pathlib import Path
from typing import Optional

import torch
from tqdm import tqdm

import shared_prefix as sp

import shared_prefix.bench as _package
from shared_prefix.bench.host import host_cost
from shared_prefix.bench.measure import UNTIMED_STEPS, measure_methods
from shared_prefix.bench.report import markdown, plot
from shared_prefix.bench.variants import (MODELS, SAME_AS_OURS_ON_CPU, TREE_PROXIES, TREE_VARIANTS, VARIANTS,
                                          VARY_STEP, Varying, build_model, make_batch, variant_fns, variant_setup)

PRESETS = {
    "cpu-small": dict(device="cpu", model="tiny", dtype="float32", grad_ckpt=False, steps=5,
                      configs=["512x64x8x1", "1024x128x8x2"]),
    "gpu": dict(device="cuda", model="qwen2.5-0.5b", dtype="bfloat16", grad_ckpt=True, steps=5,
                configs=["4096x512x8x1", "8192x256x16x1", "16384x1024x8x1"]),
}
def parse_config(text: str) -> tuple[int, int, int, int]:
    try:
        p, s, g, b = (int(x) for x in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--config: expected PxSxGxB (e.g. 4096x512x8x1), got {text!r}") from None
    if min(p, s, g, b) < 1:
        raise argparse.ArgumentTypeError(f"--config: every field must be ≥ 1, got {text!r}")
    return p, s, g, b


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


def launch_ranks(module: str, argv: list, ranks: int, port: int, threads: int, result: Path) -> list:
    """``python -m module argv`` on ``ranks`` processes under torchrun; each rank writes
    ``{result}.rank{r}.json``. Every rank's results, or one ``{"error": …}`` naming why the launch failed. The
    interpreter's scripts directory goes first on PATH (DeepSpeed builds an op with ninja from there)."""
    import shutil

    bindir = str(Path(sys.executable).parent)
    launcher = shutil.which("torchrun", path=bindir) or shutil.which("torchrun")
    cmd = [launcher, "--nproc_per_node", str(ranks), "--master_port", str(port), "-m", module, *map(str, argv)]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PATH": os.pathsep.join([bindir, os.environ.get("PATH", "")])}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        lines = [line for line in proc.stderr.splitlines() if "Error" in line and "ChildFailedError" not in line]
        return [dict(error=f"exit {proc.returncode}: {lines[-1].strip() if lines else proc.stderr[-1500:]}")]
    return [json.loads(Path(f"{result}.rank{r}.json").read_text()) for r in range(ranks)]


def write_report(out, stem: str, report: dict, table: str) -> None:
    """``{stem}.json`` (the report) and ``{stem}.md`` (its table) in ``out``; the table printed."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{stem}.json").write_text(json.dumps(report, indent=1) + "\n")
    (out / f"{stem}.md").write_text(table)
    print(table)


def open_device(ap: argparse.ArgumentParser, name: str, threads: int) -> torch.device:
    """``--device`` checked (a parser error without CUDA), and ``--threads`` applied on CPU."""
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda: no CUDA device is available")
    if device.type == "cpu":
        torch.set_num_threads(threads)
    return device


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{platform.processor() or platform.machine()} ({torch.get_num_threads()} threads)"


def run_config(model, cfg, args, device, bar):
    """One result row per variant, the variants measured side by side (interleaved timed rounds)."""
    p, s, g, b = cfg
    vocab = model.config.vocab_size
    batch = make_batch(p, s, g, b, vocab, device, system=args.system, branches=args.branches)
    cmask = batch[3]
    adv = torch.randn(b * g, generator=torch.Generator().manual_seed(1)).to(device)
    # Fixed shapes: the steady state of a run repeating them, cuDNN's graphs built in the untimed steps.
    cudnn_plans = None if args.vary else 0

    def setup(name):
        return variant_setup(model, name, cudnn_plans)

    fns = variant_fns(model, batch, g, device, args.variants)
    if args.vary:
        # One batch per step each variant takes: the untimed ones, the profiled one on CUDA, the timed rounds.
        batches = [batch] + [make_batch(p + VARY_STEP * k, s, g, b, vocab, device, seed=k, system=args.system,
                                        branches=args.branches)
                             for k in range(1, UNTIMED_STEPS + 1 + args.steps)]
        fns = {name: Varying(lambda bt, name=name: variant_fns(model, bt, g, device, [name])[name], batches)
               for name in fns}
    results = measure_methods(model, fns, adv, cmask, device, args.steps, bar, setup)
    model.set_attn_implementation("sdpa")
    rows = []
    # Tokens forwarded: every row [prompt, completion] for the baseline; one prompt per group for the others, and
    # each common prefix once for ours with its prefix tree.
    tree_tokens = sp.plan(*batch).num_tokens
    for name, stats in results.items():
        tokens = b * g * (p + s) if name == "baseline" else b * (p + g * s)
        if (name.startswith("shared_prefix") and name != "shared_prefix_prompts") or name in TREE_PROXIES:
            tokens = tree_tokens
        row = dict(config="x".join(map(str, cfg)), variant=name, tokens=tokens, **stats)
        if name == "flex" and "error" not in row:
            row["compile_s"] = max(0.0, row["first_step_s"] - row["median_s"])
        rows.append(row)
    if args.host_cost:
        ours = next((r for r in rows if r["variant"] == "shared_prefix"), None)
        if ours is not None:
            ours["host"] = host_cost(model, cfg, device, system=args.system, branches=args.branches)
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return rows


def main(argv: Optional[list[str]] = None) -> int:
    before = sp.set_prefix_tree()  # --min-node-tokens holds for this run only
    try:
        return _run(argv)
    finally:
        sp.set_prefix_tree(**before)


def _run(argv: Optional[list[str]]) -> int:
    ap = argparse.ArgumentParser(prog="python -m shared_prefix.bench", description=_package.__doc__.split("\n\n")[0])
    ap.add_argument("--preset", choices=sorted(PRESETS), default=None)
    ap.add_argument("--device", choices=["cpu", "cuda"], default=None)
    ap.add_argument("--config", action="append", type=parse_config, help="PxSxGxB; repeatable")
    ap.add_argument("--model", choices=sorted(MODELS), default=None)
    ap.add_argument("--layers", type=int, default=None,
                    help="decoder layers (default: the model shape's; fewer only where memory forces it)")
    ap.add_argument("--dtype", choices=["float32", "bfloat16", "float16", "float64"], default=None)
    ap.add_argument("--grad-ckpt", action=argparse.BooleanOptionalAction, default=None)
    ap.add_argument("--variants", default=None,
                    help="comma-separated subset of " + ",".join(VARIANTS) + " (default: all of them; on CPU without "
                    + " and ".join(SAME_AS_OURS_ON_CPU) + ", which run what shared_prefix runs there; without "
                    + " and ".join(TREE_VARIANTS) + " unless --system or --branches)")
    ap.add_argument("--steps", type=int, default=None,
                    help="timed rounds (one step of each variant per round; median reported; ≥ 3; preset: 5)")
    ap.add_argument("--window", type=int, default=None, help="a sliding window of this many tokens on every layer")
    ap.add_argument("--system", type=int, default=0,
                    help="the first N tokens of every prompt are one shared system prompt (default 0)")
    ap.add_argument("--branches", type=int, default=0,
                    help="tree rollouts: each group's completions branch once at half length, from this many trunks "
                         "(dividing G; default 0: no shared completion tokens)")
    ap.add_argument("--min-node-tokens", type=int, default=None,
                    help="the prefix tree's node threshold for this run (default: shared_prefix.set_prefix_tree's)")
    ap.add_argument("--vary", action="store_true",
                    help=f"a new prompt length every step (P, P + {VARY_STEP}, …), as in training (default: the "
                         "same shapes every step)")
    ap.add_argument("--host-cost", action=argparse.BooleanOptionalAction, default=True,
                    help="measure ATen ops and host µs per attention forward+backward at tiny lengths, ours against "
                         "one SDPA causal call (default: on)")
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
        skip += () if args.system or args.branches else TREE_VARIANTS
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
    if args.system < 0 or any(args.system >= c[0] for c in configs):
        ap.error("--system: at least 0 and shorter than every config's prompt")
    if args.min_node_tokens is not None:
        if args.min_node_tokens < 1:
            ap.error("--min-node-tokens: at least 1")
        sp.set_prefix_tree(min_node_tokens=args.min_node_tokens)
    if args.branches < 0 or (args.branches and any(c[2] % args.branches or c[1] < 2 for c in configs)):
        ap.error("--branches: at least 0, dividing every config's G, with S of at least 2")
    device = open_device(ap, args.device, args.threads)

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.layers is not None and args.layers < 1:
        ap.error("--layers: at least 1")
    model = build_model(args.model, getattr(torch, args.dtype), device, args.grad_ckpt, args.window, args.layers)
    model_name = args.model if args.layers is None else f"{args.model} with {args.layers} layers"
    meta = dict(device_name=device_name(device), model=model_name, window=args.window, system=args.system,
                branches=args.branches, min_node_tokens=sp.set_prefix_tree()["min_node_tokens"],
                dtype=args.dtype,
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
