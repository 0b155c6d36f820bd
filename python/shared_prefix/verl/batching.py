"""Batches that keep each ``uid`` group whole, where verl would scatter its rows (``shared_prefix.batching`` does
the partitioning).

- **Micro-batches under ``use_dynamic_bsz``.** verl's ``rearrange_micro_batches`` partitions rows by token count,
  so a group's rows land in different micro-batches, and counts every row's prompt against
  ``max_token_len_per_gpu``. The FSDP engine's ``prepare_micro_batches`` (the name ``transformer_impl`` imported)
  is wrapped: for the LM-head engine with the plugin on, micro-batches are made of whole groups (sub-groups that
  each share the prompt where a group exceeds the budget), sized by the packed tokens (the prompt once, plus each
  response) against ``max_token_len_per_gpu × sp_size``, balanced by verl's workload estimate of the packed
  forward, and as many on every data-parallel rank (the count is all-reduced, as verl does). The index lists go
  back to verl, which restores the rows' order after the forward.
- **Fixed micro-batches** (``ppo_micro_batch_size_per_gpu``): as many contiguous chunks as verl makes, each cut at
  the group boundary nearest verl's, so that a size that is not a multiple of ``rollout.n`` (verl's
  ``run_qwen2-7b.sh``: 16 with n = 5) keeps groups whole too; a chunk is then up to n - 1 rows longer or
  shorter than the size. Groups must be contiguous in the rank's batch, which the agent loop's order and the
  balancing below give; otherwise verl's own chunks.
- **Data-parallel balancing.** The v1 trainer's ``_balance_batch`` reorders rows across ranks by sequence length,
  splitting groups; the legacy trainer's ``use_prefix_grouper`` path needs the group count to divide the ranks.
  Both are wrapped, when the trainer's ``actor_rollout_ref.actor.use_prefix_grouper`` is set (or the plugin is on):
  the rows go to ranks group by group, balanced by the packed workload, with exactly the stock number of rows per
  rank; a group that no rank has room for is split over the fewest ranks. The same metrics as verl's
  (``global_seqlen/*``) are logged, plus ``shared_prefix/dp_sharing_kept``: the share of the ideal saving (every
  group whole on one rank) that the shards keep.
"""

from __future__ import annotations

import contextvars
from typing import Optional

import torch

from .. import batching as grouping
from .engine import response_lengths
from .settings import enabled, trainer_classes

# The engine whose forward_backward_batch is running, while it runs: its micro-batches are made by groups.
_ENGINE: contextvars.ContextVar = contextvars.ContextVar("shared_prefix_verl_engine", default=None)
SHARING_KEPT_METRIC = "shared_prefix/dp_sharing_kept"


def install(ti, tu) -> None:
    """Wrap ``ti.prepare_micro_batches`` (for ``ti.FSDPEngineWithLMHead``) and the trainers' ``_balance_batch``.
    Idempotent."""
    cls = ti.FSDPEngineWithLMHead
    if not getattr(cls, "_shared_prefix_batching", False):
        stock_batch = cls.forward_backward_batch

        def forward_backward_batch(self, data, loss_function, forward_only=False):
            token = _ENGINE.set(self)
            try:
                return stock_batch(self, data, loss_function, forward_only)
            finally:
                _ENGINE.reset(token)

        cls.forward_backward_batch = forward_backward_batch
        cls._shared_prefix_batching = True
    stock_prepare = ti.prepare_micro_batches
    if not getattr(stock_prepare, "_shared_prefix", False):
        def prepare_micro_batches(data, dp_group=None, num_batches_divided_by=None, same_micro_num_in_dp=True,
                                  min_num_micro_batch=None, use_dynamic_bsz_balance=True):
            kwargs = dict(dp_group=dp_group, num_batches_divided_by=num_batches_divided_by,
                          same_micro_num_in_dp=same_micro_num_in_dp, min_num_micro_batch=min_num_micro_batch,
                          use_dynamic_bsz_balance=use_dynamic_bsz_balance)
            if _ENGINE.get() is None or not enabled() or "uid" not in data.keys():
                return stock_prepare(data, **kwargs)
            if _dynamic(data, tu):
                return group_micro_batches(data, tu, **kwargs)
            chunks = group_chunks([str(k) for k in data["uid"]], int(data["micro_batch_size_per_gpu"]))
            if chunks is None:
                return stock_prepare(data, **kwargs)
            return [tu.index_select_tensor_dict(data, list(range(a, b))) for a, b in chunks], None

        prepare_micro_batches._shared_prefix = True
        ti.prepare_micro_batches = prepare_micro_batches
    _install_balancing()


def _dynamic(data, tu) -> bool:
    return bool(tu.get_non_tensor_data(data=data, key="use_dynamic_bsz", default=True))


def _linear_workload() -> int:
    """The per-token weight of verl's ``calculate_workload`` (``a·seqlen + seqlen²``)."""
    from verl.utils.seqlen_balancing import calculate_workload

    return int(calculate_workload(torch.tensor([1], dtype=torch.int64))[0]) - 1


def group_chunks(keys: list, size: int) -> Optional[list]:
    """verl's fixed micro-batches (``len(keys) / size`` contiguous chunks, as many on every rank) cut at group
    boundaries: ``(start, end)`` per chunk, each boundary the group boundary nearest verl's. The rows keep their
    order, so verl's outputs need no reordering, and the loss, normalized over the whole batch, is unchanged. None
    where groups are not contiguous, or fewer than the chunks (verl's own chunks then)."""
    count = len(keys) // size if size > 0 and len(keys) % size == 0 else 0
    starts = [0] + [i for i in range(1, len(keys)) if keys[i] != keys[i - 1]]
    if count < 1 or len(starts) != len(set(keys)) or len(starts) < count:
        return None
    cuts = []
    for j in range(1, count):  # the group boundary nearest j·size, after the last cut, leaving one per later chunk
        lo = starts.index(cuts[-1]) + 1 if cuts else 1
        hi = len(starts) - (count - j)
        cuts.append(min(starts[lo: hi + 1], key=lambda b: (abs(b - j * size), b)))
    bounds = [0, *cuts, len(keys)]
    return list(zip(bounds[:-1], bounds[1:]))


def group_micro_batches(data, tu, dp_group=None, num_batches_divided_by=None, same_micro_num_in_dp=True,
                        min_num_micro_batch=None, use_dynamic_bsz_balance=True):
    """verl's ``prepare_micro_batches`` contract for the dynamic path, by groups: ``(micro_batches, index
    lists)``, the index lists a partition of the rows."""
    import torch.distributed as dist

    sp = int(tu.get_non_tensor_data(data=data, key="sp_size", default=1))
    max_tokens = int(data["max_token_len_per_gpu"]) * sp
    total = data["input_ids"].offsets().diff()
    responses = response_lengths(data).to(total.device)
    prompts, responses = (total - responses).tolist(), responses.tolist()
    keys = [str(k) for k in data["uid"]]
    linear = _linear_workload()
    units = grouping.make_units(prompts, responses, keys, max_tokens=max_tokens, linear=linear)
    count = max(grouping.fewest_micro_batches(units, max_tokens), min_num_micro_batch or 1)
    sync = dist.is_initialized() and same_micro_num_in_dp and dp_group is not None

    def agreed(value: int, op) -> int:
        if not sync:
            return value
        t = torch.tensor([value], device=_collective_device(dp_group))
        dist.all_reduce(t, op=op, group=dp_group)
        return int(t.item())

    step = num_batches_divided_by or 1
    while True:
        count = agreed(count, dist.ReduceOp.MAX)
        if num_batches_divided_by:
            count = -(-count // step) * step
        if count > len(keys) and agreed(len(keys), dist.ReduceOp.MIN) < count:
            raise ValueError(f"shared_prefix.verl: {count} micro-batches are needed but a rank has only "
                             f"{len(keys)} samples; raise max_token_len_per_gpu")
        parts = grouping.micro_batches(grouping.split_for_count(units, count, prompts, responses, linear),
                                       max_tokens, count)
        if agreed(int(parts is not None), dist.ReduceOp.MIN):
            break
        count += step
    if use_dynamic_bsz_balance:  # as verl orders them: the heaviest in the middle, the lightest at both ends
        work = [_work(p, prompts, responses, keys, linear) for p in parts]
        order = sorted(range(len(parts)), key=lambda i: (-work[i], i))
        parts = [parts[i] for i in order[::2][::-1] + order[1::2]]
    return [tu.index_select_tensor_dict(data, part) for part in parts], parts


def _work(rows, prompts, responses, keys, linear) -> int:
    return sum(u.work for u in grouping.make_units([prompts[i] for i in rows], [responses[i] for i in rows],
                                                   [keys[i] for i in rows], linear=linear))


def _collective_device(group) -> torch.device:
    import torch.distributed as dist

    backend = dist.get_backend(group)
    return torch.device("cuda", torch.cuda.current_device()) if "nccl" in str(backend) else torch.device("cpu")


# -- data-parallel balancing ---------------------------------------------------------------------------------------

def shard_rows(prompts: list, responses: list, keys: list, ranks: int) -> tuple:
    """The rows' order for ``ranks`` equal data-parallel shards that keep groups whole, balanced by packed
    workload, and the share of the ideal saving they keep (1 when every group is whole on one rank)."""
    units = grouping.make_units(prompts, responses, keys, linear=_linear_workload())
    rows = len(keys)
    if rows % ranks:
        raise ValueError(f"shared_prefix.verl: {rows} samples do not divide into {ranks} data-parallel ranks")
    parts = grouping.shards(units, ranks, rows // ranks)
    kept = grouping.sharing_kept(parts, prompts, responses, keys)
    return parts, (1.0 if kept is None else kept)


def _install_balancing() -> None:
    for module, cls in trainer_classes():
        balance = _balance_v1 if cls.__name__ == "PPOTrainer" else _balance_legacy
        stock = cls._balance_batch
        if getattr(stock, "_shared_prefix", False):
            continue

        def _balance_batch(self, batch, metrics, logging_prefix="global_seqlen", keep_minibatch=False,
                           _stock=stock, _balance=balance, _module=module):
            if not _wanted(self) or (_balance is _balance_legacy and "uid" not in batch.non_tensor_batch):
                return _stock(self, batch, metrics, logging_prefix=logging_prefix, keep_minibatch=keep_minibatch)
            return _balance(self, _module, batch, metrics, logging_prefix)

        _balance_batch._shared_prefix = True
        _balance_batch.__wrapped__ = stock
        cls._balance_batch = _balance_batch


def _wanted(trainer) -> bool:
    actor = trainer.config.actor_rollout_ref.actor
    return bool(actor.get("use_prefix_grouper", False)) or enabled()


def _balance_v1(trainer, tb, batch, metrics, prefix: str):
    """The v1 trainer's balancing by groups: its dispatch info, padding and metrics, whole groups per rank."""
    role, group = "actor", trainer.actor_rollout_wg
    if role not in group._dispatch_info:
        group._dispatch_info[role] = group._query_dispatch_info(role)
    ranks = max(group._dispatch_info[role]) + 1
    batch = tb.upsample_batch_to_divisible_size(batch, trainer._get_required_batch_multiple(ranks),
                                                trainer.tokenizer.eos_token_id)
    prompts = [int(tag["prompt_len"]) for tag in batch.tags]
    responses = [int(tag["response_len"]) for tag in batch.tags]
    keys = [key.rsplit("_", 2)[0] for key in batch.keys]  # keys are f"{uid}_{session}_{i}"
    seqlens = [int(tag["seq_len"]) for tag in batch.tags]
    parts, kept = shard_rows(prompts, responses, keys, ranks)
    batch.reorder([i for part in parts for i in part])
    metrics.update(tb.log_seqlen_unbalance(seqlen_list=seqlens, partitions=parts, prefix=prefix))
    metrics[SHARING_KEPT_METRIC] = kept
    return batch


def _balance_legacy(trainer, rt, batch, metrics, prefix: str):
    """The legacy trainer's balancing by groups, for any group count (its own needs them to divide the ranks)."""
    mask = batch.batch["attention_mask"]
    seqlens = mask.view(mask.shape[0], -1).sum(-1)
    responses = mask[:, -batch.batch["responses"].shape[1]:].sum(-1)
    keys = [str(u) for u in batch.non_tensor_batch["uid"]]
    parts, kept = shard_rows((seqlens - responses).tolist(), responses.tolist(), keys,
                             trainer._get_dp_size(trainer.actor_rollout_wg, "actor"))
    batch.reorder(torch.tensor([i for part in parts for i in part]))
    metrics.update(rt.log_seqlen_unbalance(seqlen_list=seqlens.tolist(), partitions=parts, prefix=prefix))
    metrics[SHARING_KEPT_METRIC] = kept
    return batch
