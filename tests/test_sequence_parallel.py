"""Sequence parallelism (Ulysses) over the packed stream (``shared_prefix.hf.sequence_parallel``): how a plan's
stream is split over the ranks and its head results gathered back (in one process), the packed forward on 2 and 4
CPU ranks against each row run alone through the stock model (fp64, gradients included), and the refusals.
verl's own Ulysses against ours is in test_verl.py."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import shared_prefix as sp
from helpers import make_batch, torchrun
from shared_prefix.hf import PackedForward, SequenceParallel, UnsupportedModelError
from shared_prefix.hf.sequence_parallel import StreamSlice, head_refusal, split_refusal

GROUPS = ((9, (5, 3, 1)), (4, (2, 1, 0)), (17, (6, 6)))


def no_exchange(x, *args):
    raise AssertionError("no collective in this test")


def slices(plan, size, gathered):
    """Every rank's StreamSlice of ``plan``; their gather returns ``gathered[0]`` (filled in by the caller)."""
    return [StreamSlice(plan, SequenceParallel(size, r, no_exchange, no_exchange, lambda x: gathered[0]))
            for r in range(size)]


@pytest.mark.parametrize("size", [2, 3, 4, 7])
@pytest.mark.parametrize("max_depth", [1, None])
def test_slices_cover_the_padded_stream_and_gather_every_predictor_row_in_plan_order(size, max_depth):
    """The slices are the stream padded at its tail to a multiple of ``size`` (padding ids 0, positions from 0 as
    verl pads); each rank's predictor rows are those inside its slice, at their positions there; the gathered
    blocks give every rank the head results in the plan's order, including the rows that share a predictor (the
    last token of a shared prefix)."""
    _, pid, pmask, cid, cmask = make_batch(groups=GROUPS)
    plan = sp.plan(pid, pmask, cid, cmask, max_depth=max_depth)
    hidden = torch.randn(plan.num_tokens, 3, dtype=torch.float64)
    gathered = [None]
    parts = slices(plan, size, gathered)
    pad = parts[0].padded - plan.num_tokens
    assert 0 <= pad < size and parts[0].padded % size == 0
    inputs = [p.inputs() for p in parts]
    ids = torch.cat([i["input_ids"] for i in inputs], 1)
    positions = torch.cat([i["position_ids"] for i in inputs], 1)
    assert torch.equal(ids[:, : plan.num_tokens], plan.input_ids) and not ids[:, plan.num_tokens:].any()
    assert torch.equal(positions[:, : plan.num_tokens], plan.position_ids)
    assert positions[0, plan.num_tokens:].tolist() == list(range(pad))
    assert all(i["attention_mask"].all() and i["input_ids"].shape == (1, parts[0].length) for i in inputs)
    blocks = []
    for p in parts:
        local = hidden[p.start: p.start + p.length]  # this rank's slice of the stream
        assert p.keep.numel() == 0 or (0 <= p.keep.min() and p.keep.max() < p.length)
        values = local.index_select(0, p.keep)  # what its head computes
        blocks.append(torch.nn.functional.pad(values, (0, 0, 0, p.block - values.shape[0])))
    gathered[0] = torch.cat(blocks)
    assert sum(p.entries.numel() for p in parts) == plan.predictor_index.numel()
    for r, p in enumerate(parts):
        values = hidden[p.start: p.start + p.length].index_select(0, p.keep)
        assert torch.equal(p.gather(values), plan.predictor_rows(hidden)), r
    if max_depth is None:  # shared prefixes: some position predicts several rows' tokens
        assert plan.predictor_index.unique().numel() < plan.predictor_index.numel()


@pytest.mark.parametrize("ranks", [2, 4])
def test_packed_forward_on_sequence_parallel_ranks_equals_each_row_alone(tmp_path, ranks):
    """2 and 4 ranks of one group (4 query, 2 key/value heads: at 4 ranks each key/value head is repeated for 2),
    Qwen2 and a sliding-window Mistral, fp64: log-probs and entropies as each row alone, every parameter's gradient
    (averaged over the ranks) within 1e-6; prompts cross the slices' boundaries, the stream is padded at 4 ranks,
    and one rank there holds no predictor row."""
    out = tmp_path / "errors.pt"
    torchrun(Path(__file__).with_name("sequence_parallel_worker.py"), out, ranks=ranks)
    every = torch.load(out, weights_only=False)
    assert len(every) == ranks
    for rank in every:
        for name, e in rank.items():
            assert e["logp"] <= 1e-9 and e["entropy"] <= 1e-9 and e["grad"] <= 1e-6 and e["same_params"], (name, e)
            assert e["prompt_crosses"], name
    if ranks == 4:
        assert all(r["qwen2"]["pad"] > 0 for r in every) and any(r["qwen2"]["rows"] == 0 for r in every)


def test_head_counts_that_do_not_split_are_refused():
    assert split_refusal(4, 2, 2) is None and split_refusal(4, 2, 4) is None  # the second: 2 repeated for 4
    assert "3 attention heads" in split_refusal(3, 3, 2)
    assert "3 key/value heads" in split_refusal(6, 3, 2)
    assert split_refusal(8, 1, 8) is None  # MQA: one key/value head, repeated for every rank
    from transformers import Qwen2Config, Qwen2ForCausalLM

    cfg = Qwen2Config(vocab_size=61, hidden_size=24, intermediate_size=32, num_hidden_layers=1,
                      num_attention_heads=6, num_key_value_heads=3, head_dim=4)
    assert head_refusal(cfg, 2) is not None and head_refusal(cfg, 3) is None
    _, pid, pmask, cid, cmask = make_batch(groups=GROUPS)
    group = SequenceParallel(2, 0, no_exchange, no_exchange, no_exchange)
    with pytest.raises(UnsupportedModelError, match="3 key/value heads"):
        PackedForward.prepare(Qwen2ForCausalLM(cfg), pid, pmask, cid, cmask, sequence_parallel=group)


@pytest.mark.parametrize("size, rank, match", [(0, 0, "size"), (2, 2, "rank"), (2, -1, "rank"), (True, 0, "size"),
                                               (2.0, 0, "size")])
def test_bad_group_arguments_name_the_argument(size, rank, match):
    with pytest.raises(ValueError, match=match):
        SequenceParallel(size, rank, no_exchange, no_exchange, no_exchange)


def test_packed_forward_takes_only_a_sequence_parallel_group():
    from helpers import tiny_model

    _, pid, pmask, cid, cmask = make_batch(groups=GROUPS)
    model = tiny_model("qwen2")
    with pytest.raises(TypeError, match="sequence_parallel"):
        PackedForward(model, sp.plan(pid, pmask, cid, cmask), sequence_parallel=2)
    one = SequenceParallel(1, 0, no_exchange, no_exchange, no_exchange)  # a group of one: the plain forward
    assert PackedForward(model, sp.plan(pid, pmask, cid, cmask), sequence_parallel=one).stream is None
