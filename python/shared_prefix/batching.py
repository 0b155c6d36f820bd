"""Group-aware batching: micro-batches and data-parallel shards that keep each prompt group whole, sized and
balanced by what the packed forward really computes. Framework-free (plain integers); the verl plugin maps its
batches onto it.

A *group* is the rows that share one prompt (verl's ``uid``). Packed, it costs its prompt once plus each
completion: ``packed tokens = prompt + Σ completion``, against ``Σ (prompt + completion)`` for the stock rows. Its
attention work, in the units of ``seqlen²`` that per-row estimates use, is ``prompt² + Σ (2·prompt·c + c²)``: each
completion attends over the whole prompt and causally over itself, the prompt over itself once. The estimate of a
unit's work is ``linear · packed tokens + attention`` (``linear`` weighs the per-token matmuls against attention;
verl's ``calculate_workload`` uses 24576).

A group larger than a token budget is split into *sub-groups* of consecutive rows that each fit and each still
share the prompt, never into single rows unless one completion alone is all that fits.
"""

from __future__ import annotations

import dataclasses
import heapq
import math
from typing import Hashable, Optional, Sequence


@dataclasses.dataclass(frozen=True)
class Unit:
    """Rows forwarded together sharing one prompt: a group, or a sub-group of one."""

    rows: tuple
    key: Hashable
    prompt: int
    tokens: int
    work: int


def make_units(prompt_lens: Sequence[int], completion_lens: Sequence[int], keys: Sequence[Hashable], *,
               max_tokens: Optional[int] = None, linear: int = 0) -> list:
    """The groups of a batch (rows with equal ``keys``, in order of first appearance), split into sub-groups of
    consecutive rows where a group's packed tokens exceed ``max_tokens``. Rows of a group may be anywhere in the
    batch. A group's prompt is its longest row prompt (they are equal for a real group)."""
    n = len(keys)
    if not (len(prompt_lens) == len(completion_lens) == n):
        raise ValueError(f"prompt_lens, completion_lens, keys: lengths {len(prompt_lens)}, {len(completion_lens)}, "
                         f"{n} differ")
    members: dict = {}
    for i, key in enumerate(keys):
        members.setdefault(key, []).append(i)
    units = []
    for key, rows in members.items():
        prompt = max(int(prompt_lens[i]) for i in rows)
        part: list = []
        tokens = prompt
        for i in rows:
            c = int(completion_lens[i])
            if max_tokens is not None and part and tokens + c > max_tokens:
                units.append(_unit(part, key, prompt, completion_lens, linear))
                part, tokens = [], prompt
            part.append(i)
            tokens += c
        units.append(_unit(part, key, prompt, completion_lens, linear))
    return units


def _unit(rows: list, key, prompt: int, completion_lens, linear: int) -> Unit:
    cs = [int(completion_lens[i]) for i in rows]
    tokens = prompt + sum(cs)
    attention = prompt * prompt + sum(2 * prompt * c + c * c for c in cs)
    return Unit(tuple(rows), key, prompt, tokens, linear * tokens + attention)


def stock_tokens(units: Sequence[Unit], completion_lens: Sequence[int]) -> int:
    """Tokens the stock rows of ``units`` forward: each row's prompt and completion."""
    return sum(u.prompt * len(u.rows) + sum(int(completion_lens[i]) for i in u.rows) for u in units)


def packed_tokens(parts: Sequence[Sequence[int]], prompt_lens: Sequence[int], completion_lens: Sequence[int],
                  keys: Sequence[Hashable]) -> int:
    """Tokens the packed forwards of ``parts`` (lists of rows, each packed on its own) forward: per part, each
    group's prompt once and every completion."""
    total = 0
    for part in parts:
        prompts: dict = {}
        for i in part:
            prompts[keys[i]] = max(prompts.get(keys[i], 0), int(prompt_lens[i]))
            total += int(completion_lens[i])
        total += sum(prompts.values())
    return total


def sharing_kept(parts: Sequence[Sequence[int]], prompt_lens: Sequence[int], completion_lens: Sequence[int],
                 keys: Sequence[Hashable]) -> Optional[float]:
    """The share of the ideal saving (every group packed whole) that packing ``parts`` separately keeps: 1 when no
    group is split, less the more prompts are forwarded again; None when nothing can be saved."""
    units = make_units(prompt_lens, completion_lens, keys)
    stock = stock_tokens(units, completion_lens)
    ideal = packed_tokens([range(len(keys))], prompt_lens, completion_lens, keys)
    kept = packed_tokens(parts, prompt_lens, completion_lens, keys)
    return (stock - kept) / (stock - ideal) if stock > ideal else None


def micro_batches(units: Sequence[Unit], max_tokens: int, count: int) -> Optional[list]:
    """``count`` micro-batches (lists of units' rows, each sorted) whose packed tokens each fit ``max_tokens``,
    balanced by work: the units in decreasing work, each to the lightest micro-batch it fits in. None when they do
    not fit in ``count`` (or a unit alone exceeds ``max_tokens``, or there are fewer units than ``count``)."""
    if count < 1 or count > len(units) or any(u.tokens > max_tokens for u in units):
        return None
    heap = [(0, 0, i) for i in range(count)]  # (work, tokens, index): the lightest first
    parts: list = [[] for _ in range(count)]
    tokens = [0] * count
    for u in sorted(units, key=lambda u: (-u.work, u.rows[0])):
        skipped = []
        while heap:
            work, tok, i = heapq.heappop(heap)
            if tok + u.tokens <= max_tokens:
                parts[i].extend(u.rows)
                tokens[i] = tok + u.tokens
                heapq.heappush(heap, (work + u.work, tokens[i], i))
                break
            skipped.append((work, tok, i))
        else:
            return None
        for item in skipped:
            heapq.heappush(heap, item)
    if any(not p for p in parts):
        return None
    return [sorted(p) for p in parts]


def fewest_micro_batches(units: Sequence[Unit], max_tokens: int) -> int:
    """A lower bound on the micro-batches ``units`` need within ``max_tokens`` each: their packed tokens over the
    budget, rounded up (at least 1)."""
    return max(1, math.ceil(sum(u.tokens for u in units) / max_tokens))


def split_for_count(units: Sequence[Unit], count: int, prompt_lens, completion_lens, linear: int = 0) -> list:
    """``units`` with the largest ones halved (into sub-groups of consecutive rows) until there are at least
    ``count`` of them, for a rank that must make as many micro-batches as its peers from fewer groups. Rows stay
    in their units' order; a single row is never split."""
    units = list(units)
    while len(units) < count:
        i = max(range(len(units)), key=lambda j: (len(units[j].rows), units[j].work))
        u = units[i]
        if len(u.rows) < 2:
            break
        half = len(u.rows) // 2
        units[i: i + 1] = [_unit(list(u.rows[:half]), u.key, u.prompt, completion_lens, linear),
                           _unit(list(u.rows[half:]), u.key, u.prompt, completion_lens, linear)]
    return units


def shards(units: Sequence[Unit], count: int, rows_per_shard: int) -> list:
    """``count`` data-parallel shards of exactly ``rows_per_shard`` rows each, balanced by work, keeping groups
    whole where the row counts allow: the units in decreasing work, each to the lightest shard with room for it
    (a unit no shard has room for is split over the lightest shards with room, in row order); then swaps of
    equally many rows between the heaviest shard and another, while one lowers the heaviest. Each shard's rows
    come back group by group (a group's rows contiguous, in order of first appearance), so that contiguous mini-
    and micro-batches keep them together."""
    if count * rows_per_shard != sum(len(u.rows) for u in units):
        raise ValueError(f"shards: {count} × {rows_per_shard} rows differ from the batch's "
                         f"{sum(len(u.rows) for u in units)}")
    work = [0] * count
    free = [rows_per_shard] * count
    parts: list = [[] for _ in range(count)]  # per shard: [rows, work] of its pieces
    for u in sorted(units, key=lambda u: (-u.work, u.rows[0])):
        room = [i for i in range(count) if free[i] >= len(u.rows)]
        if room:
            i = min(room, key=lambda j: (work[j], j))
            parts[i].append([u.rows, u.work])
            work[i] += u.work
            free[i] -= len(u.rows)
            continue
        rows = list(u.rows)  # no shard has room for the whole unit: fill the lightest shards with room
        per_row = u.work / len(rows)
        while rows:
            i = min((j for j in range(count) if free[j] > 0), key=lambda j: (work[j], j))
            take, rows = rows[: free[i]], rows[free[i]:]
            piece = round(per_row * len(take))
            parts[i].append([tuple(take), piece])
            work[i] += piece
            free[i] -= len(take)
    _swap_down(parts, work)
    return [[r for rows, _ in sorted(p, key=lambda piece: piece[0][0]) for r in rows] for p in parts]


def _swap_down(parts: list, work: list, rounds: Optional[int] = None) -> None:
    """Lower the heaviest shard's work by swapping one of its pieces with an equally long, lighter piece of
    another shard (the swap that lowers the pair's maximum most), until no swap helps."""
    for _ in range(rounds if rounds is not None else 4 * sum(len(p) for p in parts)):
        h = max(range(len(work)), key=lambda i: (work[i], -i))
        best = None  # (new max of the pair, shard, piece in h, piece in o)
        for o in range(len(work)):
            if o == h:
                continue
            for a, (rows_a, wa) in enumerate(parts[h]):
                for b, (rows_b, wb) in enumerate(parts[o]):
                    if len(rows_a) != len(rows_b) or wb >= wa:
                        continue
                    pair = max(work[h] - wa + wb, work[o] - wb + wa)
                    if pair < work[h] and (best is None or pair < best[0]):
                        best = (pair, o, a, b)
        if best is None:
            return
        _, o, a, b = best
        wa, wb = parts[h][a][1], parts[o][b][1]
        parts[h][a], parts[o][b] = parts[o][b], parts[h][a]
        work[h] += wb - wa
        work[o] += wa - wb
