"""verl 0.9.1's batching with the plugin on: micro-batches under ``use_dynamic_bsz`` through the FSDP engine's own
``forward_backward_batch`` / ``prepare_micro_batches``, and the v1 trainer's own ``_balance_batch``, on batches
shaped as verl's agent loop produces them (uids, left-padded prompts, right-padded responses, an empty
multimodal dict per text-only sample). Sharing kept, stock verl's against ours, and exactness against the stock
engine."""

from __future__ import annotations

import random
import types

import pytest
import torch

pytest.importorskip("verl")
import verl_setup  # noqa: E402  (before the engine module, which reads the device when imported)
import verl.workers.engine.fsdp.transformer_impl as ti  # noqa: E402
import verl.workers.engine.utils as engine_utils  # noqa: E402
from verl.utils import tensordict_utils as tu  # noqa: E402
from verl.utils.seqlen_balancing import calculate_workload  # noqa: E402
from verl.workers.utils.padding import left_right_2_no_padding  # noqa: E402

import shared_prefix.verl as spv  # noqa: E402
from shared_prefix import batching  # noqa: E402
from shared_prefix.verl import batching as vb  # noqa: E402
from verl_setup import engine_on_cpu, gloo  # noqa: E402,F401  (fixtures)

VOCAB = 97


@pytest.fixture(autouse=True)
def plugin_off_afterwards():
    yield
    spv.enable(False)


def rollout(groups: int, n: int, seed: int, prompt=(8, 40), response=(1, 24)):
    """A rollout batch as verl's agent loop returns it (``bench.verl_step.rollout_batch``: ``groups`` prompts × ``n``
    responses, ragged, an empty multimodal dict per sample), and per row (uid, prompt, response) lengths."""
    from shared_prefix.bench.verl_step import rollout_batch

    dp = rollout_batch(seed, VOCAB, groups, n, prompt, response)
    r = dp.batch["response_mask"].sum(1).tolist()
    p = (dp.batch["attention_mask"].sum(1) - dp.batch["response_mask"].sum(1)).tolist()
    return dp, [(str(u), pl, rl) for u, pl, rl in zip(dp.non_tensor_batch["uid"], p, r)]


def engine_batch(dp, max_tokens: int):
    """The actor's micro-batching input: no padding, dynamic batch size, as the worker's train_batch sets it."""
    td = left_right_2_no_padding(dp.to_tensordict())
    tu.assign_non_tensor(td, use_remove_padding=True, use_dynamic_bsz=True, max_token_len_per_gpu=max_tokens,
                         calculate_entropy=True, sp_size=1)
    return td


def kept(parts, rows):
    return batching.sharing_kept(parts, [p for _, p, _ in rows], [r for _, _, r in rows], [u for u, _, _ in rows])


def ours_micro_batches(td):
    """The FSDP engine's prepare_micro_batches as its forward_backward_batch calls it, with the plugin on."""
    spv.enable(True)
    token = vb._ENGINE.set(object())
    try:
        return ti.prepare_micro_batches(data=td, dp_group=torch.distributed.group.WORLD, same_micro_num_in_dp=True)
    finally:
        vb._ENGINE.reset(token)


@pytest.mark.parametrize("n", [5, 8, 16])
def test_dynamic_micro_batches_keep_groups_within_the_packed_budget(n):
    """16 groups, the budget about a quarter of the packed tokens: ours makes micro-batches of whole groups that
    fit the budget in packed tokens (where verl's stock partition counts every row's prompt and splits groups),
    and the index lists partition the rows, as verl's order restoration needs."""
    dp, rows = rollout(16, n, seed=n)
    packed_all = batching.packed_tokens([range(len(rows))], [p for _, p, _ in rows], [r for _, _, r in rows],
                                        [u for u, _, _ in rows])
    budget = max(packed_all // 4, max(p + sum(r for u2, _, r in rows if u2 == u) for u, p, _ in rows))
    td = engine_batch(dp, budget)
    stock_mbs, stock_idx = engine_utils.prepare_micro_batches(data=td, dp_group=None)
    mbs, idx = ours_micro_batches(td)
    assert sorted(i for part in idx for i in part) == list(range(len(rows)))
    prompts, responses, keys = [p for _, p, _ in rows], [r for _, _, r in rows], [u for u, _, _ in rows]
    for mb, part in zip(mbs, idx):
        assert mb["input_ids"].offsets().diff().tolist() == [prompts[i] + responses[i] for i in part]
        assert batching.packed_tokens([part], prompts, responses, keys) <= budget
    assert kept(idx, rows) == 1.0
    assert kept(stock_idx, rows) < 0.9, kept(stock_idx, rows)  # what verl's own partition keeps here
    assert len(mbs) <= len(stock_mbs)  # packed tokens need no more micro-batches than every row's prompt
    # Balanced as verl balances: the heaviest micro-batch's packed workload within 1.5x of the mean.
    work = [sum(u.work for u in batching.make_units([prompts[i] for i in part], [responses[i] for i in part],
                                                      [keys[i] for i in part], linear=vb._linear_workload()))
            for part in idx]
    assert max(work) <= 1.5 * sum(work) / len(work), work


def test_a_group_larger_than_the_budget_splits_into_sub_groups():
    """One group of 16 responses that cannot fit one micro-batch: sub-groups that each share the prompt and fit,
    never single rows."""
    dp, rows = rollout(2, 16, seed=3, prompt=(30, 40), response=(20, 24))
    td = engine_batch(dp, 200)
    mbs, idx = ours_micro_batches(td)
    prompts, responses, keys = [p for _, p, _ in rows], [r for _, _, r in rows], [u for u, _, _ in rows]
    assert all(batching.packed_tokens([part], prompts, responses, keys) <= 200 for part in idx)
    assert all(len(part) >= 2 for part in idx)  # sub-groups, not single rows
    assert sorted(i for part in idx for i in part) == list(range(len(rows)))
    assert 0.5 < kept(idx, rows) < 1.0


def test_fixed_micro_batches_are_cut_at_group_boundaries():
    """Without dynamic batch size: as many contiguous micro-batches as verl's, each cut at the group boundary
    nearest verl's, so groups of 5 stay whole with a micro-batch size of 16 (verl's run_qwen2-7b.sh); verl's own
    chunks where groups are fewer than the chunks."""
    dp, rows = rollout(16, 5, seed=1)
    td = engine_batch(dp, 1000)
    tu.assign_non_tensor(td, use_dynamic_bsz=False, micro_batch_size_per_gpu=16)
    mbs, idx = ours_micro_batches(td)
    sizes = [len(mb) for mb in mbs]
    assert idx is None and len(mbs) == 5 and sum(sizes) == 80 and all(s % 5 == 0 for s in sizes)
    stock_mbs, _ = engine_utils.prepare_micro_batches(data=td, dp_group=None)
    assert [len(mb) for mb in stock_mbs] == [16] * 5
    bounds = [0] + list(torch.tensor(sizes).cumsum(0).tolist())
    assert kept([list(range(a, b)) for a, b in zip(bounds, bounds[1:])], rows) == 1.0
    assert kept([list(range(a, a + 16)) for a in range(0, 80, 16)], rows) < 0.95
    dp, rows = rollout(2, 8, seed=2)  # 2 groups, 4 chunks of 4: verl's own
    td = engine_batch(dp, 1000)
    tu.assign_non_tensor(td, use_dynamic_bsz=False, micro_batch_size_per_gpu=4)
    assert [len(mb) for mb in ours_micro_batches(td)[0]] == [4, 4, 4, 4]


@pytest.mark.parametrize("dynamic", [True, False], ids=["dynamic-bsz", "fixed-micro-batches"])
def test_training_step_equals_stock(dynamic):
    """The engine's forward_backward_batch, ours against verl's stock micro-batches (dynamic: by tokens; fixed: 4
    rows each, against groups of 3): log-probs and entropies back in the batch's row order, and every gradient,
    equal; every micro-batch packed (the text-only batch carries empty multimodal dicts)."""
    dp, rows = rollout(8, 3, seed=7) if not dynamic else rollout(6, 5, seed=7)
    results = {}
    for mode in ("stock", "ours"):
        engine = verl_setup.engine()
        spv.enable(mode == "ours")
        td = engine_batch(dp, 160)
        if not dynamic:
            tu.assign_non_tensor(td, use_dynamic_bsz=False, micro_batch_size_per_gpu=4)
        tu.assign_non_tensor(td, global_batch_size=len(rows), dp_size=1)
        def loss_fn(model_output, data, dp_group=None):
            # Fixed weights at response positions (each a function of its row and token, whatever the batching).
            lp, ent = model_output["log_probs"].values(), model_output["entropy"].values()
            ids, offsets = data["input_ids"].values(), data["input_ids"].offsets()
            w = torch.zeros_like(lp)
            for start, end, r in zip(offsets[:-1].tolist(), offsets[1:].tolist(), vb.response_lengths(data).tolist()):
                at = torch.arange(end - r - 1, end - 1)
                w[at] = torch.sin(0.1 * ids[at + 1].to(lp.dtype) + 0.01 * torch.arange(r, dtype=lp.dtype))
            return (lp * w).sum() + 0.1 * (ent * w).sum(), {}

        engine.module.zero_grad(set_to_none=True)
        tu.assign_non_tensor(td, return_model_output=True)
        out = engine.forward_backward_batch(td, loss_fn, forward_only=False)
        grads = {k: p.grad.clone() for k, p in engine.module.named_parameters()}
        results[mode] = (out, grads)
    (stock, g_stock), (ours, g_ours) = results["stock"], results["ours"]
    starts = torch.tensor([0] + [p + r for _, p, r in rows]).cumsum(0)
    # The positions verl's losses read: those predicting response tokens (ours leaves the prompt's at 0).
    pos = torch.cat([torch.arange(int(s0) + p - 1, int(s0) + p - 1 + r) for s0, (_, p, r) in zip(starts, rows)])
    for key in ("log_probs", "entropy"):
        a = ours["model_output"][key]
        s = stock["model_output"][key]
        assert torch.equal(a.offsets(), s.offsets()) and torch.equal(a.offsets(), starts)
        assert (a.values()[pos] - s.values()[pos]).abs().max().item() <= 1e-5, key
    for k in g_stock:
        assert ((g_ours[k] - g_stock[k]).norm() / g_stock[k].norm().clamp_min(1e-12)).item() <= 1e-5, k
    saved = ours["metrics"]["shared_prefix/tokens_saved_frac"]
    assert saved and all(v > 0 for v in saved)


# -- data-parallel balancing: the v1 trainer's own _balance_batch ----------------------------------------------

def v1_batch(groups: int, n: int, seed: int):
    """The v1 trainer's KVBatchMeta after the agent loop: keys f"{uid}_{session}_{i}", tags with the lengths."""
    from transfer_queue.metadata import KVBatchMeta

    rng = random.Random(seed)
    keys, tags = [], []
    for gi in range(groups):
        plen = rng.randint(16, 512)
        uid = f"{rng.getrandbits(64):016x}"
        for j in range(n):
            r = rng.randint(8, 1024)
            keys.append(f"{uid}_{j}_0")
            tags.append({"status": "success", "prompt_len": plen, "response_len": r, "seq_len": plen + r,
                         "global_steps": 1})
    return KVBatchMeta(keys=keys, tags=tags, partition_id="train")


def v1_trainer(ranks: int, n: int, prefix_grouper: bool):
    """A v1 PPOTrainer's state as ``_balance_batch`` reads it (verl's own config; the actor's dispatch info)."""
    from verl.trainer.ppo.v1 import trainer_base as tb

    cfg = verl_setup.trainer_config([f"actor_rollout_ref.rollout.n={n}", "actor_rollout_ref.actor.ppo_mini_batch_size=16",
                                   f"actor_rollout_ref.actor.use_prefix_grouper={prefix_grouper}"])
    trainer = types.SimpleNamespace(config=cfg, use_critic=False, global_steps=1,
                                    actor_rollout_wg=types.SimpleNamespace(_dispatch_info={"actor": list(range(ranks))}),
                                    tokenizer=types.SimpleNamespace(eos_token_id=1))
    trainer._get_required_batch_multiple = types.MethodType(tb.PPOTrainer._get_required_batch_multiple, trainer)
    return trainer, tb


def shares(batch, ranks):
    """The rows of each rank after balancing: the dispatcher splits the reordered batch into equal chunks."""
    per = len(batch.keys) // ranks
    return [list(range(r * per, (r + 1) * per)) for r in range(ranks)]


def load(batch, parts, packed: bool):
    """max/mean over ranks of the workload: verl's per-row estimate, or the packed forward's."""
    prompts = [t["prompt_len"] for t in batch.tags]
    responses = [t["response_len"] for t in batch.tags]
    keys = [k.rsplit("_", 2)[0] for k in batch.keys]
    if packed:
        work = [sum(u.work for u in batching.make_units([prompts[i] for i in p], [responses[i] for i in p],
                                                          [keys[i] for i in p], linear=vb._linear_workload()))
                for p in parts]
    else:
        seq = torch.tensor([t["seq_len"] for t in batch.tags])
        work = [int(calculate_workload(seq[p]).sum()) for p in parts]
    return max(work) / (sum(work) / len(work))


@pytest.mark.parametrize("prompts", [16, 64])
@pytest.mark.parametrize("n", [5, 8, 16])
@pytest.mark.parametrize("ranks", [2, 8])
def test_v1_balance_batch_keeps_groups_and_balances(prompts, n, ranks):
    """verl's own balancing splits groups across ranks; with use_prefix_grouper the plugin's keeps every group
    whole here (≥ 95% of the ideal sharing required), with the max/mean over ranks of the packed workload within
    0.5 points of verl's own balancing's (its per-row estimate over its shards). With 16 prompts over 8 ranks, two
    whole groups per rank cannot balance finer: ours is then the optimal pairing (largest with smallest)."""
    results = {}
    for ours in (False, True):
        trainer, tb = v1_trainer(ranks, n, prefix_grouper=ours)
        batch = v1_batch(prompts, n, seed=n * 31 + ranks + prompts)
        metrics = {}
        batch = tb.PPOTrainer._balance_batch(trainer, batch, metrics)
        parts = shares(batch, ranks)
        lengths = [t["prompt_len"] for t in batch.tags], [t["response_len"] for t in batch.tags]
        keys = [k.rsplit("_", 2)[0] for k in batch.keys]
        results[ours] = dict(kept=batching.sharing_kept(parts, *lengths, keys), metrics=metrics,
                             load=load(batch, parts, packed=ours))
        if ours:
            work = sorted(u.work for u in batching.make_units(*lengths, keys, linear=vb._linear_workload()))
            pairs = [a + b for a, b in zip(work, reversed(work))][: len(work) // 2]
            best_pairing = max(pairs) / (sum(pairs) / len(pairs))
    stock, ours = results[False], results[True]
    assert ours["kept"] >= 0.95 and stock["kept"] < 0.95, (stock["kept"], ours["kept"])
    assert ours["metrics"][vb.SHARING_KEPT_METRIC] == pytest.approx(ours["kept"])
    assert "global_seqlen/balanced_max" in ours["metrics"]  # verl's own balance metrics, as stock logs them
    if prompts // ranks == 2:
        assert ours["load"] == pytest.approx(best_pairing), (ours["load"], best_pairing)
    else:
        assert ours["load"] <= stock["load"] + 0.005, (stock["load"], ours["load"])


# -- the start-up check ----------------------------------------------------------------------------------------

ON = ["actor_rollout_ref.model.external_lib=shared_prefix.verl", "actor_rollout_ref.actor.use_prefix_grouper=True"]


def settings_named(overrides):
    from shared_prefix.verl import check

    return {f.setting: f for f in check.findings(verl_setup.trainer_config(overrides))}


def test_check_names_every_setting_that_costs_sharing():
    from verl.trainer.ppo.v1 import trainer_base as tb

    assert not settings_named(ON + ["actor_rollout_ref.rollout.n=8", "actor_rollout_ref.actor.use_dynamic_bsz=True",
                                    "actor_rollout_ref.rollout.log_prob_use_dynamic_bsz=True"])
    off = settings_named(["actor_rollout_ref.rollout.n=8"])  # verl's defaults: the plugin neither loaded nor on
    assert set(off) == {"actor_rollout_ref.model.external_lib", "actor_rollout_ref.actor.use_prefix_grouper"}
    costly = settings_named(ON + ["actor_rollout_ref.rollout.n=5", "actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu=4",
                                  "actor_rollout_ref.rollout.log_prob_micro_batch_size_per_gpu=8",
                                  "actor_rollout_ref.actor.ulysses_sequence_parallel_size=2",
                                  "actor_rollout_ref.actor.shuffle=True"])
    # Ulysses sequence parallelism shares prompts: not a setting that costs sharing.
    assert set(costly) == {"actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu", "actor_rollout_ref.actor.shuffle"}
    assert "at least 5" in costly["actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu"].change
    budget = settings_named(ON + ["actor_rollout_ref.rollout.n=16", "actor_rollout_ref.actor.use_dynamic_bsz=True",
                                  "actor_rollout_ref.rollout.log_prob_use_dynamic_bsz=True",
                                  "actor_rollout_ref.actor.ppo_max_token_len_per_gpu=4096"])
    assert "raise it to 8704" in budget["actor_rollout_ref.actor.ppo_max_token_len_per_gpu"].change  # 512 + 16 × 512
    assert getattr(tb.PPOTrainer.fit, "_shared_prefix", False)  # the report is logged when a trainer starts


def test_check_from_the_command_line(tmp_path):
    """``python -m shared_prefix.verl check`` on overrides, and on a whole config as Hydra saves it."""
    import subprocess
    import sys

    from omegaconf import OmegaConf

    def check(*args):
        proc = subprocess.run([sys.executable, "-m", "shared_prefix.verl", "check", *args], capture_output=True,
                              text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-2000:]
        return proc.stdout

    out = check("actor_rollout_ref.rollout.n=5", "actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu=4", *ON)
    assert "ppo_micro_batch_size_per_gpu=4" in out and "at least 5" in out and "external_lib" not in out
    saved = tmp_path / "config.yaml"
    OmegaConf.save(verl_setup.trainer_config(ON + ["actor_rollout_ref.rollout.n=8"]), saved)
    assert "every setting keeps prompt sharing on" in check(str(saved))


def test_verl_step_bench_cpu_tiny(tmp_path):
    """The verl actor-step bench on 2 CPU ranks, the dynamic-bsz and the Ulysses presets: both actors ran and
    reported their peak memory, ours saved tokens and kept every group whole in its micro-batches, where verl's own
    dynamic micro-batches would not."""
    import json
    import os

    from shared_prefix.bench import verl_step

    # 16 prompts: the Ulysses preset's fixed micro-batches of 16 rows divide its 16 × 5 rows.
    assert verl_step.main(["--presets", "dynamic,ulysses", "--prompts", "16", "--prompt-tokens", "24",
                           "--response-tokens", "8", "--steps", "1", "--port", str(29800 + os.getpid() % 150),
                           "--out", str(tmp_path)]) == 0
    presets = json.loads((tmp_path / "verl_step.json").read_text())["presets"]
    for preset, runs in presets.items():
        stock, ours = runs["stock"], runs["shared_prefix"]
        assert len(stock["ranks"]) == len(ours["ranks"]) == 2 and stock["step_s"] > 0 and ours["step_s"] > 0
        assert stock["peak_mem_gib"] > 0 and ours["peak_mem_gib"] > 0
        assert ours["tokens_saved_frac"] > 0 and stock["tokens_saved_frac"] is None
        assert ours["sharing_kept"] == 1.0
    assert presets["dynamic"]["stock"]["sharing_kept"] < 1.0
    table = (tmp_path / "verl_step.md").read_text()
    assert "| dynamic |" in table and "| ulysses (sp = 2) |" in table


def test_legacy_balance_batch_for_any_group_count():
    """The legacy trainer (``trainer.use_v1=False``): its own use_prefix_grouper path needs the uid groups to
    divide the ranks (6 groups over 4 ranks: ValueError); the plugin's gives each rank as many rows, whole groups
    where the rows allow (one group split over two ranks), and verl's balance metrics."""
    from verl.trainer.ppo import ray_trainer as rt

    dp, rows = rollout(6, 4, seed=11)
    cfg = verl_setup.trainer_config(["actor_rollout_ref.rollout.n=4", "actor_rollout_ref.actor.use_prefix_grouper=True",
                                     "trainer.use_v1=False"])
    trainer = types.SimpleNamespace(config=cfg, use_prefix_grouper=True,
                                    actor_rollout_wg=types.SimpleNamespace(_dispatch_info={"actor": [0, 1, 2, 3]}))
    trainer._get_dp_size = types.MethodType(rt.RayPPOTrainer._get_dp_size, trainer)
    stock = rt.RayPPOTrainer._balance_batch.__wrapped__
    with pytest.raises(ValueError, match="num_uid_groups"):
        stock(trainer, dp, {})
    metrics = {}
    rt.RayPPOTrainer._balance_batch(trainer, dp, metrics)
    keys = [str(u) for u in dp.non_tensor_batch["uid"]]
    parts = [list(range(r * 6, (r + 1) * 6)) for r in range(4)]
    pieces = sorted(sum(any(keys[i] == k for i in p) for p in parts) for k in set(keys))
    assert pieces == [1, 1, 1, 1, 2, 2]  # 24 rows, 6 per rank: two groups must span two ranks
    p = (dp.batch["attention_mask"].sum(1) - dp.batch["response_mask"].sum(1)).tolist()
    r = dp.batch["response_mask"].sum(1).tolist()
    assert metrics[vb.SHARING_KEPT_METRIC] == pytest.approx(batching.sharing_kept(parts, p, r, keys))
    assert "global_seqlen/balanced_max" in metrics
