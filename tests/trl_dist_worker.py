"""Worker for test_trl.py's multi-rank tests, on 2 CPU ranks (gloo) under torchrun:

    trl_dist_worker.py {grpo,rloo} {stock,ours} MODEL OUT [--engine ddp|zero2|zero3|fsdp1|fsdp2] [--lora] [--ckpt]

Per-device batch 2 with 4 generations per prompt, so every group spans both ranks. The engine is set up as TRL's
users set it, through the trainer config, and built by accelerate from it (``shared_prefix.bench.engines``: plain
torchrun is DDP; DeepSpeed ZeRO-2/ZeRO-3 through ``deepspeed=``; FSDP1/FSDP2 through ``fsdp=``). ``--lora``: a PEFT
LoRA config; ``--ckpt``: gradient checkpointing. Rank 0 saves the trained parameters (gathered), the losses, the
token metric and what the engine made of the parameters.
"""

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))

import trl  # noqa: E402

from shared_prefix.bench import engines  # noqa: E402
from shared_prefix.trl import SharedPrefixGRPOTrainer, SharedPrefixRLOOTrainer  # noqa: E402
from trl_setup import config, dataset, reward_len, tokenizer  # noqa: E402

TRAINERS = {("grpo", "stock"): (trl.GRPOTrainer, trl.GRPOConfig),
            ("grpo", "ours"): (SharedPrefixGRPOTrainer, trl.GRPOConfig),
            ("rloo", "stock"): (trl.RLOOTrainer, trl.RLOOConfig),
            ("rloo", "ours"): (SharedPrefixRLOOTrainer, trl.RLOOConfig)}


def gathered_params(trainer) -> torch.Tensor:
    """Every trained parameter, whole, by name (rank 0 keeps them)."""
    from torch.distributed.fsdp import FullyShardedDataParallel

    model = trainer.model_wrapped
    if isinstance(model, FullyShardedDataParallel):
        # FSDP1's full state dict segfaults in its CPU offload on CPU ranks; the summoned parameters are the same.
        with FullyShardedDataParallel.summon_full_params(model, writeback=False):
            state = {n: p.detach().clone() for n, p in model.named_parameters()}
    else:
        state = trainer.accelerator.get_state_dict(model)  # gathers ZeRO-3 partitions and FSDP2 shards
    return torch.cat([v.detach().float().reshape(-1).cpu() for _, v in sorted(state.items())]) if state else None


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("trainer", choices=["grpo", "rloo"])
    parser.add_argument("mode", choices=["stock", "ours"])
    parser.add_argument("model")
    parser.add_argument("out", type=Path)
    parser.add_argument("--engine", default="ddp", choices=engines.ENGINES)
    parser.add_argument("--lora", action="store_true")
    parser.add_argument("--ckpt", action="store_true")
    a = parser.parse_args()
    cls, config_cls = TRAINERS[(a.trainer, a.mode)]
    engines.prepare_cpu_ranks(a.engine)
    extra = dict(engines.trainer_args(a.engine), gradient_checkpointing=a.ckpt)
    args = config(a.out.parent / f"run-{a.mode}", cls=config_cls, per_device_train_batch_size=2, max_steps=2, **extra)
    kwargs = {}
    if a.lora:
        from peft import LoraConfig

        kwargs["peft_config"] = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "o_proj"],
                                           lora_dropout=0.0, init_lora_weights=False)
        torch.manual_seed(0)  # the same random adapter weights for stock and ours
    t = cls(model=a.model, reward_funcs=reward_len, args=args, train_dataset=dataset(), processing_class=tokenizer(),
            **kwargs)
    t.train()
    seen = engines.sharding(t.model_wrapped)  # the engine wraps the model when training starts
    params = gathered_params(t)
    if t.accelerator.is_main_process:
        history = t.state.log_history
        torch.save({"params": params, "losses": [h["loss"] for h in history if "loss" in h],
                    "saved": [h["shared_prefix/tokens_saved_frac"] for h in history
                              if "shared_prefix/tokens_saved_frac" in h],
                    "fallbacks": sorted(getattr(t, "shared_prefix_fallbacks", None).said) if a.mode == "ours" else [],
                    "sharding": seen, "world": t.accelerator.num_processes}, a.out)
    # Both ranks leave together and take the process group down: a rank exiting with gloo's threads still running
    # can abort ("terminate called without an active exception"), failing the run after training succeeded.
    t.accelerator.wait_for_everyone()
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
