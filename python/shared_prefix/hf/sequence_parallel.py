"""Sequence parallelism (DeepSpeed-Ulysses) over the packed stream.

Under Ulysses the ranks of a sequence-parallel group each run the decoder on one contiguous slice of one stream,
padded at its tail to a multiple of the group size. Attention is where tokens meet: each layer exchanges its
``q``/``k``/``v`` by all-to-all from (this rank's slice, every head) to (the whole stream, 1/size of the heads),
runs, and exchanges its output back. Here the stream is the plan's packed stream and the attention run between the
exchanges is the plan's, so every rank attends for its heads over the whole plan. The LM head runs on each rank's
own slice, on the plan's predictor rows inside it; their log-probs are then gathered over the group into the
plan's order.

The collectives come from the framework (:class:`SequenceParallel`: verl's Ulysses helpers), so that their
gradients, including the scaling its gradient reduction expects, are the framework's own.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Optional

import torch

from .._plan import Plan
from .._refusals import UnsupportedModelError

# (x, seq_dim, head_dim) -> x exchanged over the group.
Exchange = Callable[[torch.Tensor, int, int], torch.Tensor]


@dataclasses.dataclass(frozen=True)
class SequenceParallel:
    """A sequence-parallel group as the packed forward uses it: ``size`` ranks, this one ``rank``, and the
    framework's differentiable collectives over it.

    - ``to_heads(x, seq_dim, head_dim)``: this rank's slice with every head → the whole stream with this rank's
      ``1/size`` of the heads (all-to-all);
    - ``to_sequence(x, seq_dim, head_dim)``: the inverse;
    - ``gather(x)``: ``[n, ...]`` on every rank → ``[size * n, ...]`` in rank order (all-gather), with the gradient
      the framework's reduction expects.
    """

    size: int
    rank: int
    to_heads: Exchange
    to_sequence: Exchange
    gather: Callable[[torch.Tensor], torch.Tensor]

    def __post_init__(self):
        if isinstance(self.size, bool) or not isinstance(self.size, int) or self.size < 1:
            raise ValueError(f"size: expected a positive int (ranks in the group), got {self.size!r}")
        if isinstance(self.rank, bool) or not isinstance(self.rank, int) or not 0 <= self.rank < self.size:
            raise ValueError(f"rank: expected an int in [0, {self.size}), got {self.rank!r}")


def head_refusal(cfg, size: int) -> Optional[str]:
    """Why a model's attention heads (its config's) do not split over ``size`` sequence-parallel ranks."""
    heads = getattr(cfg, "num_attention_heads", None)
    if not isinstance(heads, int):
        return None
    return split_refusal(heads, getattr(cfg, "num_key_value_heads", None) or heads, size)


def split_refusal(heads: int, kv_heads: int, size: int) -> Optional[str]:
    """Why ``heads`` query and ``kv_heads`` key/value heads do not split over ``size`` sequence-parallel ranks: the
    query heads must divide evenly, and the key/value heads too, or divide ``size`` (each is then repeated for the
    ranks its query heads go to, as Ulysses does)."""
    if heads % size:
        return f"{heads} attention heads do not split over {size} sequence-parallel ranks"
    if kv_heads % size and size % kv_heads:
        return f"{kv_heads} key/value heads neither split over {size} sequence-parallel ranks nor divide {size}"
    return None


class StreamSlice:
    """One rank's share of a plan's packed stream under :class:`SequenceParallel`: the tokens
    ``[start, start + length)`` of the stream padded to ``padded`` tokens, and the plan's predictor rows (entries of
    ``Plan.predictor_index``) inside it. Computed once per micro-batch, on the plan's device (one host read)."""

    def __init__(self, plan: Plan, group: SequenceParallel):
        self.plan, self.group = plan, group
        n, size = plan.num_tokens, group.size
        self.padded = -(-n // size) * size
        self.length = self.padded // size
        self.start = group.rank * self.length
        predictor = plan.predictor_index
        owner = torch.div(predictor, self.length, rounding_mode="floor")
        counts = torch.bincount(owner, minlength=size)
        # Every rank's block of the gather holds as many entries as the fullest rank's.
        self.block = int(counts.max())
        mine = (owner == group.rank).nonzero().squeeze(1)
        #: This rank's predictor entries (ascending), and their positions in its slice (``logits_to_keep``).
        self.entries = mine
        self.keep = predictor.index_select(0, mine) - self.start
        # Where each entry lands in the gathered blocks: its rank's block, then its place among that rank's entries.
        by_rank = torch.argsort(owner, stable=True)
        first = torch.cumsum(counts, 0) - counts
        place = torch.empty_like(owner)
        place[by_rank] = torch.arange(owner.numel(), device=owner.device) - first.index_select(0, owner[by_rank])
        self.gather_index = owner * self.block + place

    # -- the model's inputs -------------------------------------------------------------------------------------
    def tokens(self, x: torch.Tensor, pad: torch.Tensor) -> torch.Tensor:
        """This rank's slice of a ``[1, T]`` per-token tensor, the stream padded at its tail with ``pad``."""
        return torch.cat([x, pad.to(x.dtype).unsqueeze(0)], 1)[:, self.start: self.start + self.length]

    def inputs(self) -> dict:
        """``input_ids``, ``position_ids`` and ``attention_mask`` of this rank's slice (the padding's positions
        count from 0, as verl pads)."""
        p, pad = self.plan, self.padded - self.plan.num_tokens
        ids = self.tokens(p.input_ids, p.input_ids.new_zeros(pad))
        positions = self.tokens(p.position_ids, torch.arange(pad, device=p.position_ids.device))
        return {"input_ids": ids, "position_ids": positions, "attention_mask": torch.ones_like(ids, dtype=torch.bool)}

    # -- attention ----------------------------------------------------------------------------------------------
    def attention(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, sinks: Optional[torch.Tensor],
                  run: Callable) -> torch.Tensor:
        """``run(q, k, v, sinks)`` (packed ``[T, H', D]`` tensors of the whole stream, this rank's ``H'`` heads)
        between the exchanges, for a layer's ``[1, H, length, D]`` query/key/value of this slice; returns the
        ``[length, H, Dv]`` output of the slice."""
        g, n = self.group, self.plan.num_tokens
        heads, kv = query.shape[1], key.shape[1]
        why = split_refusal(heads, kv, g.size)
        if why is not None:
            raise UnsupportedModelError(f"shared_prefix: {why}")
        # [1, length, H, D]: the projections' own layout (HF's [1, H, length, D] is its transposed view).
        query, key, value = (t.transpose(1, 2) for t in (query, key, value))
        if kv < g.size:  # each key/value head repeated for the ranks its query heads go to
            key, value = (t.repeat_interleave(g.size // kv, dim=2) for t in (key, value))
        # -> [1, padded, H / size, D], contiguous -> the plan's [T, H / size, D] (a view).
        q, k, v = (g.to_heads(t, 1, 2)[0, :n] for t in (query, key, value))
        if sinks is not None:
            per = heads // g.size
            sinks = sinks[g.rank * per: (g.rank + 1) * per]
        out = run(q, k, v, sinks)
        out = torch.nn.functional.pad(out, (0, 0, 0, 0, 0, self.padded - n))
        return g.to_sequence(out.unsqueeze(0), 1, 2)[0]  # [1, padded, H / size, Dv] -> [length, H, Dv]

    # -- the LM head's results ----------------------------------------------------------------------------------
    def gather(self, values: torch.Tensor) -> torch.Tensor:
        """This rank's head results ``[len(entries), k]`` → every entry's ``[Nc, k]`` in the plan's order."""
        blocks = torch.nn.functional.pad(values, (0, 0, 0, self.block - values.shape[0]))
        return self.group.gather(blocks).index_select(0, self.gather_index)
