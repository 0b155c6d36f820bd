"""Group-aware batching (``shared_prefix.batching``): units, micro-batches under a token budget, data-parallel
shards of equal rows, and the share of the ideal saving they keep, over random ragged batches."""

from __future__ import annotations

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from shared_prefix import batching as b


def ragged(seed: int, groups: int, n: int, ragged_n: bool = False):
    """Rows of ``groups`` prompt groups of ``n`` rows (about ``n`` when ``ragged_n``), shuffled: prompt lengths,
    completion lengths and group keys."""
    rng = random.Random(seed)
    prompts, completions, keys = [], [], []
    for g in range(groups):
        p = rng.randint(4, 300)
        for _ in range(max(1, n + (rng.randint(-2, 2) if ragged_n else 0))):
            prompts.append(p)
            completions.append(rng.randint(1, 200))
            keys.append(f"g{g}")
    order = list(range(len(keys)))
    rng.shuffle(order)
    return [prompts[i] for i in order], [completions[i] for i in order], [keys[i] for i in order]


def packed(rows, prompts, completions, keys) -> int:
    return b.packed_tokens([rows], prompts, completions, keys)


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 10**6), groups=st.integers(1, 12), n=st.sampled_from([1, 2, 5, 8, 16]),
       budget=st.integers(250, 4000))
def test_units_partition_the_rows_and_fit_the_budget(seed, groups, n, budget):
    prompts, completions, keys = ragged(seed, groups, n, ragged_n=True)
    units = b.make_units(prompts, completions, keys, max_tokens=budget, linear=7)
    rows = [r for u in units for r in u.rows]
    assert sorted(rows) == list(range(len(keys)))
    for u in units:
        assert len({keys[i] for i in u.rows}) == 1 and u.key == keys[u.rows[0]]
        assert u.tokens == packed(u.rows, prompts, completions, keys)
        # A unit exceeds the budget only as one row that alone does.
        assert u.tokens <= budget or len(u.rows) == 1
        assert u.work == 7 * u.tokens + u.prompt**2 + sum(2 * u.prompt * completions[i] + completions[i]**2
                                                          for i in u.rows)
    # Sub-groups exist only where the whole group does not fit.
    for key in set(keys):
        mine = [u for u in units if u.key == key]
        group = [i for i, k in enumerate(keys) if k == key]
        whole = packed(group, prompts, completions, keys)
        assert (len(mine) > 1) == (whole > budget and len(group) > 1)


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 10**6), groups=st.integers(1, 12), n=st.sampled_from([2, 5, 8]),
       budget=st.integers(600, 5000))
def test_micro_batches_fit_the_budget_and_keep_fitting_groups_whole(seed, groups, n, budget):
    prompts, completions, keys = ragged(seed, groups, n, ragged_n=True)
    units = b.make_units(prompts, completions, keys, max_tokens=budget)
    count = b.fewest_micro_batches(units, budget)
    parts = None
    while parts is None:
        if count > len(units):
            assert any(u.tokens > budget for u in units)  # only a row longer than the budget can fail
            return
        parts = b.micro_batches(units, budget, count)
        count += 1
    assert sorted(r for p in parts for r in p) == list(range(len(keys)))
    assert all(p == sorted(p) and p for p in parts)
    assert all(packed(p, prompts, completions, keys) <= budget for p in parts)
    for u in units:  # every unit lands whole in one micro-batch
        assert sum(set(u.rows) <= set(p) for p in parts) == 1
    kept = b.sharing_kept(parts, prompts, completions, keys)
    if all(u.tokens <= budget for u in units) and len(units) == len(set(keys)):
        assert kept == (None if len(units) == len(keys) else 1.0)  # None: no group has two rows


def test_micro_batches_none_when_they_cannot_fit():
    prompts, completions, keys = [10, 10, 10], [50, 50, 50], ["a", "b", "c"]
    units = b.make_units(prompts, completions, keys, max_tokens=100)
    assert b.micro_batches(units, 100, 1) is None  # 180 tokens in one
    assert b.micro_batches(units, 100, 4) is None  # more micro-batches than units
    assert b.micro_batches(units, 59, 3) is None  # a unit alone exceeds the budget
    assert [sorted(p) for p in b.micro_batches(units, 100, 3)] == [[0], [1], [2]]


def test_split_for_count_halves_the_largest_units():
    prompts, completions, keys = [5] * 6, [1, 2, 3, 4, 5, 6], ["a"] * 4 + ["b"] * 2
    units = b.make_units(prompts, completions, keys)
    split = b.split_for_count(units, 3, prompts, completions)
    assert [u.rows for u in split] == [(0, 1), (2, 3), (4, 5)]
    assert [u.rows for u in b.split_for_count(units, 10, prompts, completions)] == [(i,) for i in range(6)]


@pytest.mark.parametrize("n", [5, 8, 16])
@pytest.mark.parametrize("ranks", [2, 8])
def test_shards_have_equal_rows_and_keep_groups_whole(n, ranks):
    prompts, completions, keys = ragged(n * ranks, 16, n)
    units = b.make_units(prompts, completions, keys, linear=24576)
    parts = b.shards(units, ranks, len(keys) // ranks)
    assert [len(p) for p in parts] == [len(keys) // ranks] * ranks
    assert sorted(r for p in parts for r in p) == list(range(len(keys)))
    assert b.sharing_kept(parts, prompts, completions, keys) == 1.0  # 16 equal groups: each whole on a rank
    for p in parts:  # a group's rows are contiguous in its shard
        runs = [keys[p[0]]] + [keys[y] for x, y in zip(p, p[1:]) if keys[x] != keys[y]]
        assert len(runs) == len(set(runs))


def test_shards_split_a_group_only_where_the_rows_force_it():
    # 3 groups of 4 rows over 2 ranks of 6 rows: one group must be split, into 2 pieces.
    prompts, completions, keys = [10] * 12, [5] * 12, [f"g{i // 4}" for i in range(12)]
    units = b.make_units(prompts, completions, keys)
    parts = b.shards(units, 2, 6)
    pieces = {k: sum(any(keys[i] == k for i in p) for p in parts) for k in set(keys)}
    assert sorted(pieces.values()) == [1, 1, 2]
    kept = b.sharing_kept(parts, prompts, completions, keys)
    assert kept == pytest.approx((12 * 15 - 3 * 10 - 60 - 10) / (12 * 15 - 3 * 10 - 60))
    with pytest.raises(ValueError, match="shards"):
        b.shards(units, 5, 2)


def test_sharing_kept_counts_prompts_forwarded_again():
    prompts, completions, keys = [10] * 4, [1] * 4, ["a"] * 4
    assert b.sharing_kept([[0, 1, 2, 3]], prompts, completions, keys) == 1.0
    assert b.sharing_kept([[0, 1], [2, 3]], prompts, completions, keys) == pytest.approx(20 / 30)
    assert b.sharing_kept([[0], [1], [2], [3]], prompts, completions, keys) == 0.0
    assert b.sharing_kept([[0], [1]], [10, 10], [1, 1], ["a", "b"]) is None  # nothing to share
    with pytest.raises(ValueError, match="lengths"):
        b.make_units([1, 2], [1], ["a", "b"])
