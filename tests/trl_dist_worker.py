"""Worker for test_trl.py's multi-process test: `torchrun --nproc_per_node 2 trl_dist_worker.py {stock,ours} MODEL OUT`.

Two CPU ranks (gloo); per-device batch 2 with 4 generations per prompt, so every group spans both ranks.
"""

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))

import trl  # noqa: E402

from shared_prefix.trl import SharedPrefixGRPOTrainer  # noqa: E402
from test_trl import config, dataset, reward_len, tokenizer  # noqa: E402


def main():
    mode, model_path, out = sys.argv[1], sys.argv[2], Path(sys.argv[3])
    cls = SharedPrefixGRPOTrainer if mode == "ours" else trl.GRPOTrainer
    args = config(out.parent / f"run-{mode}", per_device_train_batch_size=2, max_steps=2)
    t = cls(model=model_path, reward_funcs=reward_len, args=args, train_dataset=dataset(),
            processing_class=tokenizer())
    t.train()
    if t.accelerator.is_main_process:
        params = torch.cat([p.detach().reshape(-1) for p in t.accelerator.unwrap_model(t.model).parameters()])
        losses = [h["loss"] for h in t.state.log_history if "loss" in h]
        saved = [h[k] for h in t.state.log_history for k in h if k == "shared_prefix/tokens_saved_frac"]
        torch.save({"params": params, "losses": losses, "saved": saved, "world": t.accelerator.num_processes}, out)
    # Both ranks leave together and take the process group down: a rank exiting with gloo's threads still running
    # can abort ("terminate called without an active exception"), failing the run after training succeeded.
    t.accelerator.wait_for_everyone()
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
