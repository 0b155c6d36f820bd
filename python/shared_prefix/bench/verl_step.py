"""``python -m shared_prefix.bench.verl_step``: verl's actor step (old log-probs, then the update) with verl's
example GRPO settings, stock against the plugin, on ``--ranks`` ranks.

verl's actor is built as its trainer builds it: verl's own ``ppo_trainer.yaml`` composed with the overrides a user
passes (the preset's, from verl's example scripts, scaled to the bench's lengths), ``ActorRolloutRefWorker
(role="actor")`` and ``init_model()``. Each step is a rollout batch per rank as verl's agent loop hands it over
(``--prompts`` groups of ``n`` responses, ragged prompts and responses, ``uid`` groups, empty multimodal dicts)
and the trainer's own sequence for it (``RayPPOTrainer._compute_old_log_prob``, GRPO advantages,
``_update_actor``). Presets:

- ``fixed``: ``run_qwen2-7b.sh``: n = 5, ``ppo_micro_batch_size_per_gpu`` 16 (its 128 over 8 GPUs), which verl's
  chunks cut through groups of 5;
- ``dynamic``: ``run_qwen2-7b_seq_balance.sh``: n = 5, ``use_dynamic_bsz`` with ``ppo_max_token_len_per_gpu`` at
  its ratio to a group's longest packed length (24000 against 512 + 5 × 1024);
- ``ulysses``: the ``fixed`` preset under Ulysses sequence parallelism (``ulysses_sequence_parallel_size`` =
  ``--ulysses``, flash-attention as verl requires it; on CPU ranks ``verl_cpu``'s exact varlen SDPA), for long
  shared prompts (e.g. ``--prompt-tokens 8192 --group 8 --response-tokens 64``). The ranks of one group hold the
  same batch, as verl's dispatch gives them.

Per preset and trainer: the slowest rank's median step (old log-probs + update) over ``--steps`` timed steps after
one warm-up; the largest rank's peak memory (the GPU's peak allocation over the timed steps, or on CPU the process's
peak resident set, interpreter and libraries included, the same for both trainers); the tokens shared_prefix saved
(its metric); and the sharing kept within the micro-batches: the share of the ideal saving (every group in one
micro-batch) that verl's own micro-batches would keep if packed, against ours. Writes ``verl_step.json`` and
``verl_step.md``. The functions here are also what the multi-rank tests drive.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional

import torch

PRESETS = ("fixed", "dynamic", "ulysses")
PLUGIN = "shared_prefix.verl"


def compose(path: str, plugin_on: bool, overrides: list):
    """verl's trainer config for the actor of ``path`` with ``overrides``; the plugin loaded (it keeps verl's
    model build working beside TRL 1.16) and switched on or off. The attention is sdpa (flash-attention needs its
    package and a GPU), except under Ulysses sequence parallelism, which verl runs with flash-attention only (on
    CPU ranks: ``verl_cpu``'s bridge)."""
    from shared_prefix.verl.check import load

    ulysses = any(o.split("=")[0].endswith("actor.ulysses_sequence_parallel_size") and o.split("=")[1] != "1"
                  for o in overrides)
    attention = "flash_attention_2" if ulysses else "sdpa"
    base = [f"actor_rollout_ref.model.path={path}",
            f"+actor_rollout_ref.model.override_config.attn_implementation={attention}",
            f"actor_rollout_ref.model.external_lib={PLUGIN}",
            f"actor_rollout_ref.actor.use_prefix_grouper={plugin_on}"]
    return load(base + list(overrides))


def build_actor(cfg):
    """verl's actor worker from ``cfg``, built as its trainer builds it."""
    from verl.workers.engine_workers import ActorRolloutRefWorker

    worker = ActorRolloutRefWorker(cfg.actor_rollout_ref, role="actor")
    torch.manual_seed(0)  # LoRA adapters start random: the same for stock and ours
    worker.init_model()
    return worker


def rollout_batch(seed: int, vocab: int, prompts: int, n: int, prompt_len=(2, 8), response_len=(1, 6)):
    """A rollout batch as verl's agent loop returns it for one rank: ``prompts`` groups of ``n`` responses (ragged,
    left-padded prompts, right-padded responses), outcome rewards, uids, and the empty multimodal dict the agent
    loop stores for every text-only sample."""
    import numpy as np
    from verl.protocol import DataProto

    g = torch.Generator().manual_seed(seed)
    rand = lambda lo, hi: int(torch.randint(lo, hi + 1, (1,), generator=g))  # noqa: E731
    B, P, R = prompts * n, prompt_len[1], response_len[1]
    ids_p, ids_r = torch.zeros(B, P, dtype=torch.long), torch.zeros(B, R, dtype=torch.long)
    pm, rm = torch.zeros(B, P, dtype=torch.long), torch.zeros(B, R, dtype=torch.long)
    uids = []
    for gi in range(prompts):
        plen = rand(*prompt_len)
        prompt = torch.randint(2, vocab, (plen,), generator=g)
        for j in range(n):
            i = gi * n + j
            r = rand(*response_len)
            ids_p[i, P - plen:], pm[i, P - plen:] = prompt, 1
            ids_r[i, :r], rm[i, :r] = torch.randint(2, vocab, (r,), generator=g), 1
            uids.append(f"s{seed}g{gi}")
    attn = torch.cat([pm, rm], 1)
    rewards = torch.zeros(B, R)
    rewards[torch.arange(B), rm.sum(1) - 1] = torch.rand(B, generator=g)
    batch = DataProto.from_single_dict(
        {"prompts": ids_p, "responses": ids_r, "input_ids": torch.cat([ids_p, ids_r], 1), "attention_mask": attn,
         "position_ids": (attn.cumsum(1) - 1).clamp(min=0), "response_mask": rm, "token_level_rewards": rewards},
        meta_info={"temperature": 0.9})
    batch.non_tensor_batch["uid"] = np.array(uids, dtype=object)
    batch.non_tensor_batch["multi_modal_inputs"] = np.array([{} for _ in uids], dtype=object)
    return batch


def old_log_prob(worker, batch):
    """``RayPPOTrainer._compute_old_log_prob``'s steps: the batch without padding, the worker's log-probs and
    entropies, back to padded responses; and the worker's metrics. Under Ulysses sequence parallelism verl
    collects them from the first rank of each group, and its dispatch hands them to the group's every rank."""
    from verl.utils import tensordict_utils as tu
    from verl.workers.utils.padding import left_right_2_no_padding, no_padding_2_padding

    td = left_right_2_no_padding(batch.to_tensordict())
    tu.assign_non_tensor(td, calculate_entropy=True, calculate_sum_pi_squared=False, compute_loss=False)
    output = worker.compute_log_prob(td)
    if output is not None:
        output = (no_padding_2_padding(tu.get(output, "log_probs"), td).float(),
                  no_padding_2_padding(tu.get(output, "entropy"), td).float(), tu.get(output, "metrics"))
    return from_group_leader(output, sequence_parallel_size(worker))


def update_actor(worker, batch, cfg):
    """GRPO advantages (verl's ``compute_grpo_outcome_advantage``), then ``RayPPOTrainer._update_actor``'s steps
    and settings (the trainer config's mini-batch, epochs, seed); the update's metrics."""
    from verl.trainer.ppo.core_algos import compute_grpo_outcome_advantage
    from verl.utils import tensordict_utils as tu
    from verl.workers.utils.padding import left_right_2_no_padding

    batch.batch["advantages"], batch.batch["returns"] = compute_grpo_outcome_advantage(
        batch.batch["token_level_rewards"], batch.batch["response_mask"], batch.non_tensor_batch["uid"])
    actor = cfg.actor_rollout_ref.actor
    batch.meta_info["temperature"] = cfg.actor_rollout_ref.rollout.temperature
    td = left_right_2_no_padding(batch.to_tensordict())
    mini = actor.ppo_mini_batch_size * cfg.actor_rollout_ref.rollout.n
    tu.assign_non_tensor(td, calculate_entropy=actor.calculate_entropy or actor.entropy_coeff != 0.0,
                         distillation_use_topk=False, distillation_only=False, global_batch_size=mini,
                         mini_batch_size=mini, epochs=actor.ppo_epochs, seed=actor.data_loader_seed,
                         dataloader_kwargs={"shuffle": actor.shuffle}, compute_loss=True)
    output = worker.update_actor(td)
    return from_group_leader(None if output is None else tu.get(output, "metrics"), sequence_parallel_size(worker))


def sequence_parallel_size(worker) -> int:
    return int(worker.actor.engine.ulysses_sequence_parallel_size)


def from_group_leader(value, sp: int):
    """``value`` as the first rank of this rank's sequence-parallel group (of ``sp`` consecutive ranks) has it."""
    if sp <= 1:
        return value
    import torch.distributed as dist

    every = [None] * dist.get_world_size()
    dist.all_gather_object(every, value)
    return every[dist.get_rank() // sp * sp]


def micro_batch_sharing(batch, cfg, plugin_on: bool) -> Optional[float]:
    """The share of the ideal saving that the update's micro-batches of ``batch`` keep (this rank, one
    mini-batch as the whole batch): verl's own partition, or the plugin's."""
    from verl.utils import tensordict_utils as tu
    from verl.workers.utils.padding import left_right_2_no_padding

    from shared_prefix import batching
    from shared_prefix.verl import batching as vb

    actor = cfg.actor_rollout_ref.actor
    td = left_right_2_no_padding(batch.to_tensordict())
    tu.assign_non_tensor(td, use_dynamic_bsz=bool(actor.use_dynamic_bsz), sp_size=1,
                         max_token_len_per_gpu=actor.ppo_max_token_len_per_gpu,
                         micro_batch_size_per_gpu=actor.ppo_micro_batch_size_per_gpu)
    n = len(td)
    keys = [str(u) for u in td["uid"]]
    if not actor.use_dynamic_bsz:
        size = int(actor.ppo_micro_batch_size_per_gpu)
        chunks = (vb.group_chunks(keys, size) if plugin_on else None) or [(i, min(i + size, n)) for i in range(0, n, size)]
        parts = [list(range(a, b)) for a, b in chunks]
    elif plugin_on:
        parts = vb.group_micro_batches(td, tu)[1]
    else:
        from verl.workers.engine.utils import rearrange_micro_batches

        parts = rearrange_micro_batches(td, max_token_len=int(actor.ppo_max_token_len_per_gpu))[1]
    total = td["input_ids"].offsets().diff()
    responses = vb.response_lengths(td).to(total.device)
    return batching.sharing_kept(parts, (total - responses).tolist(), responses.tolist(), keys)


def whole_params(module) -> torch.Tensor:
    """Every parameter, whole, by name."""
    from torch.distributed.fsdp import FullyShardedDataParallel
    from torch.distributed.tensor import DTensor

    if isinstance(module, FullyShardedDataParallel):
        with FullyShardedDataParallel.summon_full_params(module, writeback=False):
            named = {n: p.detach().clone() for n, p in module.named_parameters()}
    else:
        named = {n: (p.full_tensor() if isinstance(p, DTensor) else p).detach().clone()
                 for n, p in module.named_parameters()}
    return torch.cat([v.float().reshape(-1) for _, v in sorted(named.items())])


def init_ranks() -> int:
    """The process group (NCCL on GPUs, gloo on CPU, verl's CPU platform registered); this rank."""
    import torch.distributed as dist

    import shared_prefix.bench.verl_cpu  # noqa: F401  (before any verl engine module)

    cuda = torch.cuda.is_available()
    dist.init_process_group("nccl" if cuda else "gloo")
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    return dist.get_rank()


# -- the bench -------------------------------------------------------------------------------------------------

def preset_overrides(preset: str, args) -> list:
    """The preset's settings (verl's example scripts), at the bench's lengths."""
    n = args.n
    groups = args.ranks // (args.ulysses if preset == "ulysses" else 1)  # data-parallel ranks, a batch each
    common = [f"actor_rollout_ref.rollout.n={n}",
              f"actor_rollout_ref.actor.ppo_mini_batch_size={args.prompts * groups}",
              "actor_rollout_ref.actor.entropy_coeff=0", "actor_rollout_ref.actor.use_kl_loss=False"]
    if not torch.cuda.is_available():  # CPU ranks train in fp32 (verl's bf16 policy is for GPUs)
        common += [f"+actor_rollout_ref.actor.fsdp_config.mixed_precision.{k}=fp32"
                   for k in ("param_dtype", "reduce_dtype", "buffer_dtype")]
    fixed = ["actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu=16",
             "actor_rollout_ref.rollout.log_prob_micro_batch_size_per_gpu=16"]
    if preset == "fixed":
        return common + fixed
    if preset == "ulysses":
        return common + fixed + [f"actor_rollout_ref.actor.ulysses_sequence_parallel_size={args.ulysses}"]
    longest = args.prompt_tokens + n * args.response_tokens
    budget = max(args.prompt_tokens + args.response_tokens, round(longest * 24000 / (512 + 5 * 1024)))
    return common + ["actor_rollout_ref.actor.use_dynamic_bsz=True",
                     "actor_rollout_ref.rollout.log_prob_use_dynamic_bsz=True",
                     f"actor_rollout_ref.actor.ppo_max_token_len_per_gpu={budget}",
                     f"actor_rollout_ref.rollout.log_prob_max_token_len_per_gpu={budget}"]


def rank_main(args) -> int:
    import torch.distributed as dist

    rank = init_ranks()
    if not torch.cuda.is_available():
        torch.set_num_threads(args.threads)
    on = args.trainer == "shared_prefix"
    cfg = compose(args.checkpoint, on, preset_overrides(args.preset, args))
    worker = build_actor(cfg)
    vocab = worker.actor.engine.model_config.hf_config.vocab_size
    group = rank // sequence_parallel_size(worker)  # the data-parallel rank: one batch per Ulysses group
    times, saved, kept = [], [], []
    for step in range(args.warmup + args.steps):
        if step == args.warmup and torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        batch = rollout_batch(1000 * step + group, vocab, args.prompts, args.n,
                              (args.prompt_tokens // 2, args.prompt_tokens), (1, args.response_tokens))
        kept.append(micro_batch_sharing(batch, cfg, on))
        dist.barrier()
        t0 = time.perf_counter()
        logp, _, _ = old_log_prob(worker, batch)
        batch.batch["old_log_probs"] = logp
        metrics = update_actor(worker, batch, cfg)
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        if step >= args.warmup:
            times.append(time.perf_counter() - t0)
            saved += list(metrics.get("shared_prefix/tokens_saved_frac", []))
    import resource

    peak = (torch.cuda.max_memory_allocated() if torch.cuda.is_available()
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)  # KiB on Linux
    result = dict(rank=rank, step_s=statistics.median(times), steps_s=times, peak_mem_gib=peak / 2**30,
                  tokens_saved_frac=statistics.mean(float(v) for v in saved) if saved else None,
                  sharing_kept=[k for k in kept if k is not None])
    Path(f"{args.result}.rank{rank}.json").write_text(json.dumps(result))
    dist.barrier()
    dist.destroy_process_group()
    return 0


def launch(args, preset: str, trainer: str, checkpoint: Path, work: Path) -> list:
    """One torchrun launch of ``trainer`` with ``preset``; every rank's results."""
    from shared_prefix.bench.cli import launch_ranks

    result = work / f"{preset}-{trainer}"
    argv = ["--rank-worker", "--preset", preset, "--trainer", trainer, "--checkpoint", checkpoint, "--result", result,
            "--ranks", args.ranks, "--prompts", args.prompts, "--group", args.n, "--prompt-tokens", args.prompt_tokens,
            "--response-tokens", args.response_tokens, "--steps", args.steps, "--warmup", args.warmup,
            "--threads", args.threads, "--model", args.model, "--ulysses", args.ulysses]
    return launch_ranks("shared_prefix.bench.verl_step", argv, args.ranks, args.port, args.threads, result)


def summary(ranks: list) -> dict:
    if any("error" in r for r in ranks):
        return dict(error=next(r["error"] for r in ranks if "error" in r))
    kept = [k for r in ranks for k in r["sharing_kept"]]
    saved = [r["tokens_saved_frac"] for r in ranks if r["tokens_saved_frac"] is not None]
    return dict(step_s=max(r["step_s"] for r in ranks), peak_mem_gib=max(r["peak_mem_gib"] for r in ranks),
                ranks=ranks, sharing_kept=statistics.mean(kept) if kept else None,
                tokens_saved_frac=statistics.mean(saved) if saved else None)


def markdown(report: dict) -> str:
    m = report["meta"]
    mem = "peak GPU allocation" if m["backend"] == "nccl" else "peak resident set (process)"
    lines = [f"Device: {m['device_name']}, {m['ranks']} ranks ({m['backend']}); model {m['model']} (random weights); "
             f"torch {m['torch']}, transformers {m['transformers']}, verl {m['verl']}; commit {m['commit']}; "
             f"{m['date']}.", "",
             f"verl's actor step (old log-probs + update) per rank: {m['prompts']} prompts of "
             f"{m['prompt_tokens'] // 2}-{m['prompt_tokens']} tokens × n={m['n']} responses of 1-{m['response_tokens']} "
             f"tokens; median of {m['steps']} timed steps after {m['warmup']} warm-up, the slowest rank's. Memory: "
             f"the largest rank's {mem}. Sharing kept: the share of the ideal saving (every group in one micro-batch) "
             "the update's micro-batches keep.", "",
             "| preset | stock step s | ours step s | speedup | stock GiB | ours GiB | tokens saved | sharing kept, "
             "verl's micro-batches | sharing kept, ours |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for preset, runs in report["presets"].items():
        stock, ours = runs["stock"], runs["shared_prefix"]
        if "error" in stock or "error" in ours:
            lines.append(f"| {preset} | failed: {(stock.get('error') or ours.get('error'))[:100]!r} | | | | | | | |")
            continue
        label = f"ulysses (sp = {m['ulysses']})" if preset == "ulysses" else preset
        pct = lambda v: "—" if v is None else f"{v:.1%}"  # noqa: E731
        lines.append(f"| {label} | {stock['step_s']:.3f} | {ours['step_s']:.3f} | "
                     f"{stock['step_s'] / ours['step_s']:.2f}× | {stock['peak_mem_gib']:.2f} | "
                     f"{ours['peak_mem_gib']:.2f} | {pct(ours['tokens_saved_frac'])} | "
                     f"{pct(stock['sharing_kept'])} | {pct(ours['sharing_kept'])} |")
    return "\n".join(lines) + "\n"


def parser() -> argparse.ArgumentParser:
    from shared_prefix.bench.variants import MODELS

    ap = argparse.ArgumentParser(prog="python -m shared_prefix.bench.verl_step", description=__doc__.split("\n\n")[0])
    ap.add_argument("--presets", default=",".join(PRESETS), help=f"comma-separated, of {', '.join(PRESETS)}")
    ap.add_argument("--ranks", type=int, default=2)
    ap.add_argument("--model", choices=sorted(MODELS), default="tiny")
    ap.add_argument("--prompts", type=int, default=16,
                    help="groups per rank and step (default 16: the fixed preset's micro-batches of 16 divide them)")
    ap.add_argument("--group", dest="n", type=int, default=5, help="responses per prompt (rollout.n; default 5, as the presets)")
    ap.add_argument("--prompt-tokens", type=int, default=256, help="longest prompt (default 256; shortest half)")
    ap.add_argument("--response-tokens", type=int, default=64, help="longest response (default 64)")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--threads", type=int, default=1, help="CPU threads per rank (default 1)")
    ap.add_argument("--ulysses", type=int, default=2, help="the ulysses preset's sequence-parallel size (default 2)")
    ap.add_argument("--port", type=int, default=29450)
    ap.add_argument("--out", default="bench-out")
    ap.add_argument("--rank-worker", action="store_true", help=argparse.SUPPRESS)
    for name in ("--preset", "--trainer", "--checkpoint", "--result"):
        ap.add_argument(name, help=argparse.SUPPRESS)
    return ap


def main(argv: Optional[list] = None) -> int:
    ap = parser()
    args = ap.parse_args(argv)
    if args.rank_worker:
        return rank_main(args)
    chosen = [p.strip() for p in args.presets.split(",") if p.strip()]
    if not chosen or any(p not in PRESETS for p in chosen):
        ap.error(f"--presets: choose from {', '.join(PRESETS)}")
    if args.ranks < 1 or args.prompts < 1 or args.n < 2 or args.steps < 1 or args.warmup < 0:
        ap.error("--ranks, --prompts, --steps at least 1, --group at least 2")
    if "ulysses" in chosen and (args.ulysses < 2 or args.ranks % args.ulysses):
        ap.error("--ulysses: at least 2, and a divisor of --ranks")
    import transformers
    import verl

    from shared_prefix.bench import trainer_step as ts
    from shared_prefix.bench.cli import device_name, git_commit, write_report
    from shared_prefix.bench.variants import MODELS

    cuda = torch.cuda.is_available()
    report = dict(presets={})
    with tempfile.TemporaryDirectory(prefix="verl_step-") as tmp:
        checkpoint = Path(tmp) / "model"
        ts.save_checkpoint(args.model, torch.float32, torch.device("cpu"), args.prompt_tokens + args.response_tokens,
                           checkpoint)
        ts.tokenizer(MODELS[args.model]["vocab_size"]).save_pretrained(checkpoint)
        for preset in chosen:
            report["presets"][preset] = {}
            for trainer in ("stock", "shared_prefix"):
                print(f"verl_step: {preset}, {trainer} ({args.ranks} ranks)", file=sys.stderr)
                report["presets"][preset][trainer] = summary(launch(args, preset, trainer, checkpoint, Path(tmp)))
    name = (device_name(torch.device("cuda")) if cuda else f"{os.uname().machine} ({args.threads} thread(s) per rank)")
    report["meta"] = dict(device_name=name, ranks=args.ranks, backend="nccl" if cuda else "gloo", model=args.model,
                          prompts=args.prompts, n=args.n, prompt_tokens=args.prompt_tokens,
                          response_tokens=args.response_tokens, steps=args.steps, warmup=args.warmup,
                          ulysses=args.ulysses,
                          torch=torch.__version__, transformers=transformers.__version__, verl=verl.__version__,
                          commit=git_commit(), date=datetime.date.today().isoformat())
    write_report(args.out, "verl_step", report, markdown(report))
    return 1 if any("error" in t for r in report["presets"].values() for t in r.values()) else 0


if __name__ == "__main__":
    raise SystemExit(main())
