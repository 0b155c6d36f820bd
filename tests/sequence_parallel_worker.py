"""Worker for test_sequence_parallel.py, on CPU ranks (gloo) under torchrun:

    sequence_parallel_worker.py OUT

All ranks form one sequence-parallel group over one ragged grouped batch. The packed forward runs on each rank's
slice (``PackedForward.prepare(..., sequence_parallel=...)``), its exchanges torch's differentiable collectives
(``torch.distributed.nn.functional``), no framework's. Against the stock model on each row alone (fp64): the
log-probs, entropies and every parameter's gradient averaged over the ranks, as data-parallel engines reduce them.
Rank 0 saves the worst errors per model.
"""

import sys

import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dfn

from helpers import make_batch, param_grads, stock_logprobs, stream_slice_facts, tiny_model
from shared_prefix.hf import PackedForward, SequenceParallel

# Prompts of 4-17 tokens, completions of 1-6 (an empty one too): prompts cross the slices' boundaries.
GROUPS = ((9, (5, 3, 1)), (4, (2, 1, 0)), (17, (6, 6)))
MODELS = {"qwen2": {}, "mistral-window-5": {"sliding_window": 5}}


def exchange(size: int, split_dim: int, cat_dim: int):
    """x's ``split_dim`` in ``size`` chunks, chunk r to rank r; the chunks received concatenated along ``cat_dim``
    in rank order (differentiable)."""

    def run(x):
        moved = x.movedim(split_dim, 0)
        chunks = moved.reshape(size, moved.shape[0] // size, *moved.shape[1:]).contiguous()
        received = dfn.all_to_all_single(torch.empty_like(chunks), chunks)
        return torch.cat([received[r].movedim(0, split_dim) for r in range(size)], dim=cat_dim)

    return run


def group() -> SequenceParallel:
    size = dist.get_world_size()
    return SequenceParallel(
        size=size, rank=dist.get_rank(),
        to_heads=lambda x, seq, head: exchange(size, head, seq)(x),
        to_sequence=lambda x, seq, head: exchange(size, seq, head)(x),
        gather=lambda x: torch.cat(dfn.all_gather(x)))


def errors(name: str, extra: dict) -> dict:
    model = tiny_model(name.split("-")[0], **extra)
    rows, pid, pmask, cid, cmask = make_batch(groups=GROUPS)
    w = torch.randn(cid.shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    ref, ref_ent = stock_logprobs(model, rows, cid.shape[1], 0.7)
    ref_grads = param_grads(model, (ref * w).sum() + 0.1 * (ref_ent * w).sum())
    forward = PackedForward.prepare(model, pid, pmask, cid, cmask, sequence_parallel=group())
    lp, ent = forward.run(temperature=0.7, entropy=True)
    grads = param_grads(model, (lp * w).sum() + 0.1 * (ent * w).sum())
    for g in grads.values():
        dist.all_reduce(g, op=dist.ReduceOp.AVG)
    return {"logp": (lp - ref).abs().max().item(), "entropy": (ent - ref_ent).abs().max().item(),
            "grad": max(((grads[n] - ref_grads[n]).norm() / ref_grads[n].norm()).item() for n in ref_grads),
            "same_params": grads.keys() == ref_grads.keys(), **stream_slice_facts(forward)}


def main():
    dist.init_process_group("gloo")
    results = {name: errors(name, extra) for name, extra in MODELS.items()}
    every = [None] * dist.get_world_size()
    dist.all_gather_object(every, results)
    if dist.get_rank() == 0:
        torch.save(every, sys.argv[1])
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
