"""shared_prefix.compat.PrefixGrouper against the original package (prefix-grouper==0.0.1.post1): every output,
and gradients through concat_input, split_output, convert_padding and forward."""

from __future__ import annotations

import math
import random

import pytest
import torch

prefix_grouper = pytest.importorskip("prefix_grouper")
from shared_prefix.compat import PrefixGrouper  # noqa: E402

Original = prefix_grouper.PrefixGrouper
SEEDS = range(10)


def case(seed):
    rnd = random.Random(seed)
    groups = rnd.randint(1, 4)
    prefix_lens = [rnd.choice([1, 2, rnd.randint(3, 12)]) for _ in range(groups)]
    sizes = [rnd.randint(1, 4) for _ in range(groups)]
    suffix_lens = [rnd.randint(1, 7) for _ in range(sum(sizes))]
    return prefix_lens, sizes, suffix_lens


def masks(lens, width, left):
    cols = torch.arange(width)
    lens = torch.tensor(lens)
    return cols[None] >= (width - lens)[:, None] if left else cols[None] < lens[:, None]


def both(seed, padding_mode="right", left_prefix=True):
    prefix_lens, sizes, suffix_lens = case(seed)
    pm = masks(prefix_lens, max(prefix_lens) + 2, left_prefix)
    sm = masks(suffix_lens, max(suffix_lens) + 1, False)
    ours = PrefixGrouper.from_ungrouped_masks(pm, sm, sizes, padding_mode=padding_mode)
    orig = Original.from_ungrouped_masks(pm, sm, sizes, padding_mode=padding_mode)
    return ours, orig, pm, sm, sizes


def grads_equal(out_a, out_b, leaves_a, leaves_b, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out_b.shape, generator=g, dtype=torch.float64)
    ga = torch.autograd.grad((out_a * w).sum(), leaves_a, allow_unused=True)
    gb = torch.autograd.grad((out_b * w).sum(), leaves_b, allow_unused=True)
    for a, b in zip(ga, gb):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("padding_mode", ["right", "left"])
def test_layout_and_group_info(seed, padding_mode):
    ours, orig, *_ = both(seed, padding_mode)
    assert torch.equal(ours.padding_mask, orig.padding_mask)
    assert len(ours.group_info) == len(orig.group_info)
    for a, b in zip(ours.group_info, orig.group_info):
        assert (a.prefix_len, a.suffix_lens) == (b.prefix_len, b.suffix_lens)
    for name in ("ungrouped_prefix_mask", "ungrouped_suffix_mask", "grouped_prefix_mask", "grouped_suffix_mask"):
        assert torch.equal(getattr(ours, name), getattr(orig, name)), name


def test_mask_padding_mode():
    custom = torch.tensor([[1, 0, 1, 1, 1, 0, 1, 1], [0, 1, 1, 0, 1, 1, 1, 0]], dtype=torch.bool)
    info = [[3, 2, 1], [2, 3]]
    ours, orig = PrefixGrouper(info, padding_mode=custom), Original(info, padding_mode=custom)
    assert torch.equal(ours.padding_mask, orig.padding_mask)
    ids_p = torch.tensor([[5, 6, 7], [8, 9, 0]])
    ids_s = torch.tensor([[1, 2, 0], [3, 0, 0], [4, 4, 4]])
    pm, sm = ids_p > 0, ids_s > 0
    assert torch.equal(ours.concat_input(ids_p, pm, ids_s, sm), orig.concat_input(ids_p, pm, ids_s, sm))
    with pytest.raises(ValueError, match="padding_mode"):
        PrefixGrouper(info, padding_mode=custom[:, :6])


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("left_prefix", [True, False])
def test_concat_input_ids_and_embeddings(seed, left_prefix):
    ours, orig, pm, sm, _ = both(seed, left_prefix=left_prefix)
    g = torch.Generator().manual_seed(seed)
    ids_p = torch.randint(1, 100, pm.shape, generator=g) * pm
    ids_s = torch.randint(1, 100, sm.shape, generator=g) * sm
    assert torch.equal(ours.concat_input(ids_p, pm, ids_s, sm), orig.concat_input(ids_p, pm, ids_s, sm))
    ep = torch.randn(*pm.shape, 5, generator=g, dtype=torch.float64, requires_grad=True)
    es = torch.randn(*sm.shape, 5, generator=g, dtype=torch.float64, requires_grad=True)
    a, b = ours.concat_input(ep, pm, es, sm), orig.concat_input(ep, pm, es, sm)
    assert torch.equal(a, b)
    grads_equal(a, b, [ep, es], [ep, es], seed)


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("include_prefix_last", [0, 1])
@pytest.mark.parametrize("padding_mode", ["right", "left"])
def test_split_output(seed, include_prefix_last, padding_mode):
    ours, orig, *_ = both(seed, padding_mode)
    x = torch.randn(*ours.padding_mask.shape, 3, dtype=torch.float64, requires_grad=True)
    got = ours.split_output(x, include_prefix_last=include_prefix_last)
    want = orig.split_output(x, include_prefix_last=include_prefix_last)
    for a, b in zip(got, want):
        assert a.shape == b.shape and torch.equal(a, b)
    grads_equal(torch.cat([got[0].flatten(), got[2].flatten()]), torch.cat([want[0].flatten(), want[2].flatten()]), [x], [x])


@pytest.mark.parametrize("padding_mode", ["left", "right"])
def test_convert_padding(padding_mode):
    x_mask = masks([3, 1, 5, 2], 7, True)
    x = torch.randn(4, 7, 2, dtype=torch.float64, requires_grad=True)
    a = PrefixGrouper.convert_padding(x, x_mask, padding_mode)
    b = Original.convert_padding(x, x_mask, padding_mode)
    assert torch.equal(a, b)
    grads_equal(a, b, [x], [x])


def reference_attn(q, k, v, attn_mask, *args, **kwargs):
    """An exact attention for the original's forward: q [b, H, Lq, D], k/v [b, Hkv, Lk, D], key-padding mask
    [b, Lk], causal aligned bottom-right; output [b, Lq, H, D], 0 for rows that see no key."""
    rep = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
    lq, lk = q.shape[2], k.shape[2]
    scores = torch.einsum("bhqd,bhkd->bhqk", q, k) / math.sqrt(q.shape[-1])
    allowed = torch.ones(lq, lk, dtype=torch.bool).tril(lk - lq)[None, None] & attn_mask.bool()[:, None, None, :]
    scores = scores.masked_fill(~allowed, -math.inf)
    sinks = kwargs.get("sinks")
    if sinks is not None:  # GPT-OSS: one more logit per head in every softmax, dropped after it
        column = sinks[None, :, None, None].expand(scores.shape[0], -1, lq, 1)
        probs = torch.cat([scores, column], -1).softmax(-1)[..., :-1]
    else:
        probs = torch.nan_to_num(scores.softmax(-1), nan=0.0)
    return torch.einsum("bhqk,bhkd->bqhd", probs, v)


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("padding_mode", ["right", "left"])
def test_forward_matches_original(seed, padding_mode):
    ours, orig, *_ = both(seed, padding_mode)
    b, seq = ours.padding_mask.shape
    g = torch.Generator().manual_seed(seed)
    hq, hkv = (4, 2) if seed % 2 else (2, 2)
    q = torch.randn(b, hq, seq, 8, generator=g, dtype=torch.float64, requires_grad=True)
    k = torch.randn(b, hkv, seq, 8, generator=g, dtype=torch.float64, requires_grad=True)
    v = torch.randn(b, hkv, seq, 8, generator=g, dtype=torch.float64, requires_grad=True)
    got = ours.forward(reference_attn, q, k, v)
    want = orig.forward(reference_attn, q, k, v)
    assert got.shape == want.shape == (b, seq, hq, 8)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    grads_equal(got, want, [q, k, v], [q, k, v], seed)


@pytest.mark.parametrize("seed", SEEDS[:4])
def test_forward_with_attention_sinks(seed):
    """``sinks=`` (GPT-OSS's per-head sink logits; what our transformers entry passes for ``s_aux``) against the
    original driven with a sink-aware attention function: outputs and the gradients of q, k, v and the sinks."""
    ours, orig, *_ = both(seed)
    b, seq = ours.padding_mask.shape
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, 4, seq, 8, generator=g, dtype=torch.float64, requires_grad=True)
    k = torch.randn(b, 2, seq, 8, generator=g, dtype=torch.float64, requires_grad=True)
    v = torch.randn(b, 2, seq, 8, generator=g, dtype=torch.float64, requires_grad=True)
    sinks = torch.randn(4, generator=g, dtype=torch.float64, requires_grad=True)
    got = ours.forward(None, q, k, v, sinks=sinks)
    want = orig.forward(reference_attn, q, k, v, sinks=sinks)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    assert (got - ours.forward(None, q, k, v)).abs().max() > 1e-3  # the sinks took effect
    grads_equal(got, want, [q, k, v, sinks], [q, k, v, sinks], seed)


def test_forward_refuses_keywords_that_change_attention():
    """The original hands every keyword to its attn_func (verl's monkey patch passes the layer's: sliding_window,
    softcap, dropout, s_aux); ours computes the attention itself, so a keyword asking for other attention is refused
    (a sliding_window of 3 was ignored: 0.11 max |Δ logp| on a Mistral through verl's patch), and ``s_aux`` is read
    as the sinks. Harmless ones (a window as long as every row, causal=True, dropout 0) pass."""
    ours, *_ = both(3)
    b, seq = ours.padding_mask.shape
    g = torch.Generator().manual_seed(0)
    q, k = (torch.randn(b, h, seq, 8, generator=g, dtype=torch.float64) for h in (4, 2))
    plain = ours.forward(None, q, k, k)
    longest = ours._plan.max_seqlen
    for bad, match in ((dict(sliding_window=2), "sliding_window=2"), (dict(softcap=0.5), "softcapping"),
                       (dict(dropout=0.5), "dropout"), (dict(causal=False), "non-causal"),
                       (dict(is_causal=False), "non-causal"), (dict(window_size=(1, 0)), "window_size"),
                       (dict(alibi_slopes=torch.ones(4)), "ALiBi")):
        with pytest.raises(NotImplementedError, match=match):
            ours.forward(None, q, k, k, **bad)
    for fine in (dict(sliding_window=longest), dict(causal=True, dropout=0.0, softcap=None),
                 dict(window_size=(-1, -1)), dict(window_size=(longest - 1, 0))):
        assert torch.equal(ours.forward(None, q, k, k, **fine), plain)
    sinks = torch.randn(4, generator=g, dtype=torch.float64)
    assert torch.equal(ours.forward(None, q, k, k, s_aux=sinks), ours.forward(None, q, k, k, sinks=sinks))


def test_forward_needs_no_transformers():
    """The compat layer's attention stands on the core alone: a process where transformers cannot be imported
    builds a grouper, runs forward, and its refusals still raise."""
    import subprocess
    import sys

    script = (
        "import sys; sys.modules['transformers'] = None\n"
        "import torch\n"
        "from shared_prefix.compat import PrefixGrouper\n"
        "pg = PrefixGrouper([[3, 2, 1], [2, 4]])\n"
        "q = torch.randn(2, 2, pg.x_shape[1], 8, dtype=torch.float64)\n"
        "assert pg.forward(None, q, q, q).shape == (2, pg.x_shape[1], 2, 8)\n"
        "try:\n"
        "    pg.forward(None, q, q, q, softcap=1.0)\n"
        "except NotImplementedError:\n"
        "    print('ok')\n"
    )
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr[-2000:]


def test_lengths_and_masks_as_the_original_takes_them():
    """group_info of NumPy ints, 0-d tensors or another grouper's Info objects, and float attention masks, give
    the same grouper as plain ints and bool masks; a group without prefix tokens is refused by name (the
    executor needs every completion to see a prompt)."""
    import numpy as np

    info = [[3, 2, 1], [2, 4]]
    ref = PrefixGrouper(info)
    for same in ([[np.int64(n) for n in g] for g in info], [[torch.tensor(n) for n in g] for g in info],
                 ref.group_info):
        pg = PrefixGrouper(same)
        assert [[i.prefix_len, *i.suffix_lens] for i in pg.group_info] == info
        assert torch.equal(pg.padding_mask, ref.padding_mask)
    pm, sm = masks([3, 2], 4, True), masks([2, 1, 4], 4, False)
    as_bool = PrefixGrouper.from_ungrouped_masks(pm, sm, [2, 1])
    as_float = PrefixGrouper.from_ungrouped_masks(pm.double(), sm.float(), [2, 1])
    assert torch.equal(as_float.padding_mask, as_bool.padding_mask)
    with pytest.raises(ValueError, match="prefix_mask: row 1 has no valid token"):
        PrefixGrouper.from_ungrouped_masks(masks([3, 0], 4, True), sm, [2, 1])
    with pytest.raises(ValueError, match="group_info: lengths must be non-negative ints"):
        PrefixGrouper([[3, torch.tensor(1.5)]])


def test_bad_inputs():
    with pytest.raises(ValueError, match="group_info"):
        PrefixGrouper([[3]])
    with pytest.raises(ValueError, match="padding_mode"):
        PrefixGrouper([[3, 1]], padding_mode="middle")
    pm, sm = masks([2, 3], 4, True), masks([1, 2, 2], 3, False)
    with pytest.raises(ValueError, match="group_sizes"):
        PrefixGrouper.from_ungrouped_masks(pm, sm, [1, 1])
    with pytest.raises(ValueError, match="group_sizes"):
        PrefixGrouper.from_ungrouped_masks(pm, sm, 2)
    pg = PrefixGrouper.from_ungrouped_masks(pm, sm, [2, 1])
    with pytest.raises(ValueError, match=r"suffix_mask: valid tokens per row \[1, 1, 1\] differ"):
        pg.concat_input(torch.ones(2, 4), pm, torch.ones(3, 3), masks([1, 1, 1], 3, False))
    with pytest.raises(ValueError, match="include_prefix_last"):
        pg.split_output(torch.zeros(pg.padding_mask.shape), include_prefix_last=-1)
    # Same totals, rows off by a token: tokens would move between groups.
    shifted = masks([3, 2], 4, True)
    with pytest.raises(ValueError, match=r"prefix_mask: valid tokens per row \[3, 2\] differ"):
        pg.concat_input(torch.ones(2, 4), shifted, torch.ones(3, 3), sm)
    q = torch.randn(*pg.x_shape[:1], 2, pg.x_shape[1], 8)
    with pytest.raises(ValueError, match="q: expected"):
        pg.forward(None, q[0], q, q)
    with pytest.raises(ValueError, match="k: expected"):
        pg.forward(None, q, q[:, :, :-1], q)
    with pytest.raises(ValueError, match="padding_mode"):
        PrefixGrouper.convert_padding(torch.ones(2, 4), pm, padding_mode=torch.ones(4, dtype=torch.bool))
    for info in ([[2**64 - 1, 2]], [[1, 2**63, 2**63]], [[2**31, 1]]):  # would wrap or overflow the int32 tables
        with pytest.raises(ValueError, match="group_info"):
            PrefixGrouper(info)


def test_transformers_registration_matches_stock_rows():
    """Code written for the original's transformers integration (register_attention, prefix_grouper=pg) runs on
    ours and gives each row's stock log-probs."""
    from shared_prefix.compat import register_attention
    from helpers import make_batch, stock_logprobs, tiny_model

    model = tiny_model("qwen2")
    rows, *_ = make_batch(seed=3, groups=((9, (5, 3, 1)), (4, (2,)), (6, (4, 4))))
    # The original's inputs: one prefix row per group, one suffix row per sample, consecutive groups.
    order = sorted(range(len(rows)), key=lambda i: (rows[i][0].shape[0], rows[i][0].tolist()))
    rows = [rows[i] for i in order]
    groups, sizes = [], []
    for p, _ in rows:
        if groups and torch.equal(groups[-1], p):
            sizes[-1] += 1
        else:
            groups.append(p)
            sizes.append(1)
    lp = max(p.shape[0] for p in groups)
    ls = max(c.shape[0] for _, c in rows)
    pm = masks([p.shape[0] for p in groups], lp, True)
    sm = masks([c.shape[0] for _, c in rows], ls, False)
    pid = torch.zeros(pm.shape, dtype=torch.long).masked_scatter(pm, torch.cat(groups))
    sid = torch.zeros(sm.shape, dtype=torch.long).masked_scatter(sm, torch.cat([c for _, c in rows]))

    pg = PrefixGrouper.from_ungrouped_masks(pm, sm, sizes)
    input_ids = pg.concat_input(pid, pm, sid, sm)
    p_len = torch.tensor([p.shape[0] for p in groups]).repeat_interleave(torch.tensor(sizes))
    position_ids = pg.concat_input(pm.long().cumsum(1) - 1, pm, sm.long().cumsum(1) - 1 + p_len[:, None], sm)
    register_attention()
    model.set_attn_implementation("prefix_grouper_attention")
    hidden = model.model(input_ids=input_ids, position_ids=position_ids, attention_mask=pg.padding_mask,
                         prefix_grouper=pg, prefix_grouper_attn_func="flash_attention_2").last_hidden_state
    model.set_attn_implementation("sdpa")
    _, _, suffix_h, suffix_mask = pg.split_output(hidden, include_prefix_last=1)
    logp = torch.log_softmax(model.lm_head(suffix_h[:, :-1]).double(), -1).gather(-1, sid[..., None])[..., 0] * sm
    ref, _ = stock_logprobs(model, rows, ls, 1.0)
    assert (logp - ref).abs().max().item() <= 1e-9
