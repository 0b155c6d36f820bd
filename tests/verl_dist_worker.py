"""Worker for test_verl.py's multi-rank tests, on 2 CPU ranks (gloo) under torchrun, or on GPUs (NCCL):

    verl_dist_worker.py {stock,ours} MODEL OUT [verl overrides ...]

verl's actor as its trainer builds it: the Hydra config composed from verl's own ``ppo_trainer.yaml`` with the
overrides a user passes on the command line, ``ActorRolloutRefWorker(config.actor_rollout_ref, role="actor")``
and ``init_model()`` (verl's model build, LoRA, FSDP1/FSDP2 wrapping, offload, optimizer). One rollout batch, as
verl's rollout hands it over (left-padded prompts, right-padded responses, ``uid`` groups), then the trainer's own
sequence for it (``RayPPOTrainer._compute_old_log_prob`` and ``_update_actor``): the old log-probs and entropies,
GRPO advantages (verl's ``compute_grpo_outcome_advantage``), and one actor update (verl's mini-batches,
micro-batches, ``ppo_loss``, gradient clipping and optimizer step). ``ours`` adds the plugin as users switch it
on (``external_lib=shared_prefix.verl``, ``use_prefix_grouper=True``); ``stock`` loads it switched off. Rank 0 saves per rank the old log-probs and
entropies at response positions, the update's metrics, and the trained parameters, whole.

CPU bridges (``verl_cpu``, nothing on a GPU): a CPU platform through verl's platform plugin API. The attention is
sdpa (flash-attention needs a GPU and its package).
"""

import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

import verl_cpu  # noqa: E402  (before any verl engine module)

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

N = 4  # rollout.n
PROMPTS = 4  # per rank: the batch has 8 prompts x 4 responses over 2 ranks


def compose(path: str, mode: str, overrides: list):
    base = [f"actor_rollout_ref.model.path={path}", "+actor_rollout_ref.model.override_config.attn_implementation=sdpa",
            f"actor_rollout_ref.rollout.n={N}", "actor_rollout_ref.actor.ppo_mini_batch_size=4",
            "actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu=8",
            "actor_rollout_ref.rollout.log_prob_micro_batch_size_per_gpu=8",
            "actor_rollout_ref.actor.optim.lr=0.05", "actor_rollout_ref.actor.entropy_coeff=0.01",
            "actor_rollout_ref.actor.data_loader_seed=1", "actor_rollout_ref.rollout.temperature=0.9"]
    # Stock loads the plugin too, switched off: with TRL installed, verl's model build needs its TRL check.
    base += ["actor_rollout_ref.model.external_lib=shared_prefix.verl",
             f"actor_rollout_ref.actor.use_prefix_grouper={mode == 'ours'}"]
    return verl_cpu.trainer_config(base + overrides)


def rollout_batch(rank: int, vocab: int):
    """A rollout batch as verl's agent loop returns it for this rank: PROMPTS groups of N responses (ragged,
    left-padded prompts, right-padded responses of 1-6 tokens), outcome rewards, uids, and the empty multimodal
    dict the agent loop stores for every text-only sample."""
    from verl.protocol import DataProto

    g = torch.Generator().manual_seed(100 + rank)
    B, P, R = PROMPTS * N, 8, 6
    prompts, responses = torch.zeros(B, P, dtype=torch.long), torch.zeros(B, R, dtype=torch.long)
    pm, rm = torch.zeros(B, P, dtype=torch.long), torch.zeros(B, R, dtype=torch.long)
    uids = []
    for gi in range(PROMPTS):
        plen = int(torch.randint(2, P + 1, (1,), generator=g))
        prompt = torch.randint(2, vocab, (plen,), generator=g)
        for j in range(N):
            i = gi * N + j
            r = int(torch.randint(1, R + 1, (1,), generator=g))
            prompts[i, P - plen:], pm[i, P - plen:] = prompt, 1
            responses[i, :r], rm[i, :r] = torch.randint(2, vocab, (r,), generator=g), 1
            uids.append(f"r{rank}g{gi}")
    attn = torch.cat([pm, rm], 1)
    rewards = torch.zeros(B, R)
    rewards[torch.arange(B), rm.sum(1) - 1] = torch.rand(B, generator=g)
    batch = DataProto.from_single_dict(
        {"prompts": prompts, "responses": responses, "input_ids": torch.cat([prompts, responses], 1),
         "attention_mask": attn, "position_ids": (attn.cumsum(1) - 1).clamp(min=0), "response_mask": rm,
         "token_level_rewards": rewards},
        meta_info={"temperature": 0.9})
    batch.non_tensor_batch["uid"] = np.array(uids, dtype=object)
    batch.non_tensor_batch["multi_modal_inputs"] = np.array([{} for _ in uids], dtype=object)  # text-only samples
    return batch


def old_log_prob(worker, batch):
    """``RayPPOTrainer._compute_old_log_prob``'s steps: the batch without padding, the worker's log-probs and
    entropies, back to padded responses."""
    from verl.utils import tensordict_utils as tu
    from verl.workers.utils.padding import left_right_2_no_padding, no_padding_2_padding

    td = left_right_2_no_padding(batch.to_tensordict())
    tu.assign_non_tensor(td, calculate_entropy=True, calculate_sum_pi_squared=False, compute_loss=False)
    output = worker.compute_log_prob(td)
    return (no_padding_2_padding(tu.get(output, "log_probs"), td).float(),
            no_padding_2_padding(tu.get(output, "entropy"), td).float(), tu.get(output, "metrics"))


def update_actor(worker, batch, cfg):
    """``RayPPOTrainer._update_actor``'s steps and settings (the trainer config's mini-batch, epochs, seed)."""
    from verl.utils import tensordict_utils as tu
    from verl.workers.utils.padding import left_right_2_no_padding

    actor = cfg.actor_rollout_ref.actor
    batch.meta_info["temperature"] = cfg.actor_rollout_ref.rollout.temperature
    td = left_right_2_no_padding(batch.to_tensordict())
    mini = actor.ppo_mini_batch_size * cfg.actor_rollout_ref.rollout.n
    tu.assign_non_tensor(td, calculate_entropy=actor.calculate_entropy or actor.entropy_coeff != 0.0,
                         distillation_use_topk=False, distillation_only=False, global_batch_size=mini,
                         mini_batch_size=mini, epochs=actor.ppo_epochs, seed=actor.data_loader_seed,
                         dataloader_kwargs={"shuffle": actor.shuffle}, compute_loss=True)
    return tu.get(worker.update_actor(td), "metrics")


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


def sharding(module) -> str:
    from torch.distributed.fsdp import FullyShardedDataParallel
    from torch.distributed.tensor import DTensor

    if isinstance(module, FullyShardedDataParallel):
        return "fsdp1"
    return "fsdp2" if any(isinstance(p, DTensor) for p in module.parameters()) else "whole"


def plain(value):
    """A metric as Python floats (verl's are numpy scalars, tensors or lists of them)."""
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    try:
        return float(value)
    except (TypeError, ValueError):
        return str(value)


def main():
    mode, path, out, overrides = sys.argv[1], sys.argv[2], Path(sys.argv[3]), sys.argv[4:]
    dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    rank = dist.get_rank()
    cfg = compose(path, mode, overrides)

    from verl.trainer.ppo.core_algos import compute_grpo_outcome_advantage
    from verl.workers.engine_workers import ActorRolloutRefWorker

    worker = ActorRolloutRefWorker(cfg.actor_rollout_ref, role="actor")
    torch.manual_seed(0)  # LoRA adapters start random: the same for stock and ours
    worker.init_model()
    engine = worker.actor.engine
    batch = rollout_batch(rank, engine.model_config.hf_config.vocab_size)
    logp, entropy, infer_metrics = old_log_prob(worker, batch)
    batch.batch["old_log_probs"] = logp
    batch.batch["advantages"], batch.batch["returns"] = compute_grpo_outcome_advantage(
        batch.batch["token_level_rewards"], batch.batch["response_mask"], batch.non_tensor_batch["uid"])
    metrics = update_actor(worker, batch, cfg)
    params = whole_params(engine.module)
    mask = batch.batch["response_mask"].bool()
    mine = {"logp": logp[mask].tolist(), "entropy": entropy[mask].tolist()}
    ranks = [None] * dist.get_world_size()
    dist.all_gather_object(ranks, mine)
    params = params.cpu()
    from shared_prefix import verl as spv

    if rank == 0:
        torch.save({"ranks": ranks, "params": params, "sharding": sharding(engine.module),
                    "lora": any("lora" in n for n, _ in engine.module.named_parameters()),
                    "metrics": {k: plain(v) for k, v in metrics.items()}, "fallbacks": sorted(spv.fallbacks.said)}, out)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
