"""Worker for test_verl.py's multi-rank tests, on 2 CPU ranks (gloo) under torchrun, or on GPUs (NCCL):

    verl_dist_worker.py {stock,ours} MODEL OUT [verl overrides ...] [prompt_len=LO,HI]

verl's actor as its trainer builds it: the Hydra config composed from verl's own ``ppo_trainer.yaml`` with the
overrides a user passes on the command line, ``ActorRolloutRefWorker(config.actor_rollout_ref, role="actor")``
and ``init_model()`` (verl's model build, LoRA, FSDP1/FSDP2 wrapping, offload, optimizer). One rollout batch, as
verl's rollout hands it over (left-padded prompts, right-padded responses, ``uid`` groups), then the trainer's own
sequence for it (``RayPPOTrainer._compute_old_log_prob`` and ``_update_actor``): the old log-probs and entropies,
GRPO advantages (verl's ``compute_grpo_outcome_advantage``), and one actor update (verl's mini-batches,
micro-batches, ``ppo_loss``, gradient clipping and optimizer step): the steps of ``shared_prefix.bench.verl_step``.
``ours`` adds the plugin as users switch it on (``external_lib=shared_prefix.verl``, ``use_prefix_grouper=True``);
``stock`` loads it switched off. Rank 0 saves per rank the old log-probs and entropies at response positions, the
update's metrics, and the trained parameters, whole.

CPU bridge (``shared_prefix.bench.verl_cpu``, nothing on a GPU): a CPU platform through verl's platform plugin API.
The attention is sdpa (flash-attention needs a GPU and its package), except under Ulysses sequence parallelism,
which verl runs around flash-attention only: on CPU ranks ``verl_cpu``'s exact varlen SDPA stands in for it, and
its all-to-all runs over gloo's ``all_to_all_single``. The ranks of one sequence-parallel group get the same batch,
as verl's dispatch gives them; ``ours`` also saves what each of its packed forwards' slices held.
"""

import sys
from pathlib import Path

import torch
import torch.distributed as dist

from helpers import stream_slice_facts
from shared_prefix.bench import engines
from shared_prefix.bench import verl_step as vs

N = 4  # rollout.n
PROMPTS = 4  # per rank: the batch has 8 prompts x 4 responses over 2 ranks
BASE = [f"actor_rollout_ref.rollout.n={N}", "actor_rollout_ref.actor.ppo_mini_batch_size=4",
        "actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu=8",
        "actor_rollout_ref.rollout.log_prob_micro_batch_size_per_gpu=8",
        "actor_rollout_ref.actor.optim.lr=0.05", "actor_rollout_ref.actor.entropy_coeff=0.01",
        "actor_rollout_ref.actor.data_loader_seed=1", "actor_rollout_ref.rollout.temperature=0.9"]


def plain(value):
    """A metric as Python floats (verl's are numpy scalars, tensors or lists of them)."""
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    try:
        return float(value)
    except (TypeError, ValueError):
        return str(value)


def record_slices() -> list:
    """What each packed forward's slice of the stream held, as they run: the stream's tokens, the padding, whether
    a prompt crosses a slice boundary, the shortest response, and this rank's predictor rows."""
    from shared_prefix.hf import pipeline

    seen = []
    init = pipeline.PackedForward.__init__

    def recording(self, *args, **kwargs):
        init(self, *args, **kwargs)
        if self.stream is not None:
            seen.append(stream_slice_facts(self))

    pipeline.PackedForward.__init__ = recording
    return seen


def main():
    mode, path, out, overrides = sys.argv[1], sys.argv[2], Path(sys.argv[3]), sys.argv[4:]
    prompt_len = (2, 8)  # the rollout's prompt lengths (not a verl setting)
    for o in [o for o in overrides if o.startswith("prompt_len=")]:
        prompt_len = tuple(int(v) for v in o.split("=")[1].split(","))
        overrides.remove(o)
    rank = vs.init_ranks()
    cfg = vs.compose(path, mode == "ours", BASE + overrides)
    sp = int(cfg.actor_rollout_ref.actor.ulysses_sequence_parallel_size)
    slices = record_slices()
    worker = vs.build_actor(cfg)
    engine = worker.actor.engine
    batch = vs.rollout_batch(100 + rank // sp, engine.model_config.hf_config.vocab_size, PROMPTS, N, prompt_len)
    logp, entropy, _ = vs.old_log_prob(worker, batch)
    batch.batch["old_log_probs"] = logp
    metrics = vs.update_actor(worker, batch, cfg)
    params = vs.whole_params(engine.module).cpu()
    mask = batch.batch["response_mask"].bool()
    ranks = [None] * dist.get_world_size()
    dist.all_gather_object(ranks, {"logp": logp[mask].tolist(), "entropy": entropy[mask].tolist(), "slices": slices})
    from shared_prefix import verl as spv

    if rank == 0:
        torch.save({"ranks": ranks, "params": params, "sharding": engines.sharding(engine.module),
                    "sequence_parallel": int(engine.ulysses_sequence_parallel_size) if engine.use_ulysses_sp else 1,
                    "lora": any("lora" in n for n, _ in engine.module.named_parameters()),
                    "metrics": {k: plain(v) for k, v in metrics.items()}, "fallbacks": sorted(spv.fallbacks.said)}, out)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
