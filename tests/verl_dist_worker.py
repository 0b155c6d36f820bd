"""Worker for test_verl.py's multi-process test: `torchrun --nproc_per_node 2 verl_dist_worker.py OUT.json`.

Two CPU ranks (gloo), the model under FSDP2 as verl wraps it, each rank its own micro-batch. Compares the plugin
with verl's stock engine path: log-probs and entropies at response positions on each rank, and every parameter's
gradient after FSDP's reduce-scatter (gathered to full tensors).
"""

import json
import sys
from pathlib import Path

import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).parent))

import test_verl as tv  # noqa: E402


def main():
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    tv.ti.get_device_id = lambda: "cpu"
    tv.ti.get_device_name = lambda: "cpu"
    engine = tv.make_engine()
    tv._fully_shard_like_verl(engine.module)
    td, rmask = tv.micro_batch(True, seed=1 + rank)
    resp = rmask.sum(1)
    stock, g_stock = tv.run(engine, td, enabled=False, resp_lens=resp)
    ours, g_ours = tv.run(engine, td, enabled=True, resp_lens=resp)
    tv.spv.enable(False)
    pos = tv.response_positions(stock["log_probs"].offsets(), resp)
    diff = max((ours[k].values()[pos] - stock[k].values()[pos]).abs().max().item() for k in ("log_probs", "entropy"))
    rel = 0.0
    for n in g_stock:
        a, b = g_ours[n].full_tensor(), g_stock[n].full_tensor()
        rel = max(rel, ((a - b).norm() / b.norm().clamp_min(1e-12)).item())
    # tv.run asserts that ours really ran; record it per rank, with each rank's values to show the data differ.
    gathered = [None] * world
    first = stock["log_probs"].values()[pos][:4].tolist()
    dist.all_gather_object(gathered, {"diff": diff, "ran": True, "first": first})
    if rank == 0:
        Path(sys.argv[1]).write_text(json.dumps({
            "world": world,
            "ours_ran": [g["ran"] for g in gathered],
            "max_value_diff": [g["diff"] for g in gathered],
            "max_grad_rel": rel,
            "ranks_differ": gathered[0]["first"] != gathered[1]["first"],
        }))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
