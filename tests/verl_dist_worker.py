"""Worker for test_verl.py's multi-process test: `torchrun --nproc_per_node 2 verl_dist_worker.py OUT.json`.

Two CPU ranks (gloo), the model under FSDP2 exactly as verl applies it (tied and untied head), each rank its own
micro-batch. Compares the plugin with verl's stock engine path: log-probs and entropies at response positions on
each rank, and every parameter's gradient after FSDP's reduce-scatter (gathered to full tensors).
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
    report = {"world": world}
    for tie in (False, True):
        diff, rel, seen, first = tv.fsdp2_comparison(tie, seed=1 + rank)
        gathered = [None] * world
        dist.all_gather_object(gathered, {"diff": diff, "rel": rel, "first": first,
                                          "sharded": seen.get("before") is tv.DTensor,
                                          "unsharded": seen.get("used") is tv.torch.nn.Parameter})
        report["tied" if tie else "untied"] = {
            "head_was_sharded": [g["sharded"] for g in gathered],
            "unsharded_used": [g["unsharded"] for g in gathered],
            "max_value_diff": [g["diff"] for g in gathered],
            "max_grad_rel": max(g["rel"] for g in gathered),
            "ranks_differ": gathered[0]["first"] != gathered[1]["first"],
        }
    if rank == 0:
        Path(sys.argv[1]).write_text(json.dumps(report))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
