"""The bench and the demo end to end on CPU at a tiny size: every output written, with the fields the issue names,
and the agreement columns meaning what they say (ours equals the baseline; the limit proxy does not)."""

from __future__ import annotations

import json

import pytest
import torch

import shared_prefix as sp
from shared_prefix.bench import baselines, demo, report, variants
from shared_prefix.bench import cli as bench


def test_bench_writes_results(tmp_path):
    out = tmp_path / "bench"
    variants = ("baseline,packed_causal,shared_prefix,shared_prefix_full_head,shared_prefix_split,shared_prefix_fused,"
                "flex,packed_causal_fa2,prefix_grouper")
    assert bench.main(["--config", "48x6x3x2", "--config", "20x5x1x3", "--variants", variants,
                       "--out", str(out), "--threads", "1"]) == 0
    rows = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    by = {(r["config"], r["variant"]): r for r in rows}
    # flex and packed_causal_fa2 are CUDA-only; prefix-grouper is installed in the test environment.
    assert {v for _, v in by} == {"baseline", "packed_causal", "shared_prefix", "shared_prefix_full_head",
                                  "shared_prefix_split", "shared_prefix_fused", "prefix_grouper"}
    for r in rows:
        assert "error" not in r, r
        for key in ("median_s", "peak_mem_bytes", "max_abs_logp_diff", "grad_rel_l2", "grad_cos", "first_step_s"):
            assert r[key] >= 0, (key, r)
        assert r["commit"] and r["device_name"]
    for cfg in ("48x6x3x2", "20x5x1x3"):
        assert by[(cfg, "shared_prefix")]["grad_rel_l2"] < 1e-4
        assert by[(cfg, "shared_prefix")]["max_abs_logp_diff"] < 1e-4
        assert by[(cfg, "prefix_grouper")]["grad_rel_l2"] < 1e-4
        assert by[(cfg, "shared_prefix_full_head")]["grad_rel_l2"] < 1e-4
        assert by[(cfg, "shared_prefix_split")]["grad_rel_l2"] < 1e-4
        assert by[(cfg, "shared_prefix_fused")]["grad_rel_l2"] < 1e-4
    assert by[("48x6x3x2", "baseline")]["tokens"] == 6 * 54 and by[("48x6x3x2", "shared_prefix")]["tokens"] == 2 * 66
    # G=3: the packed causal row lets completions see each other, so its log-probs are wrong by design.
    assert by[("48x6x3x2", "packed_causal")]["max_abs_logp_diff"] > 1e-3
    table = (out / "results.md").read_text()
    assert "| 48x6x3x2 | shared_prefix |" in table
    assert "| median s | first step s |" in table
    assert (out / "results.png").stat().st_size > 0
    # The host-cost proxy: ours at tiny lengths (2 prompts of 4 tokens, 3 completions of 2 each) against one SDPA call.
    host = by[("48x6x3x2", "shared_prefix")]["host"]
    assert host["tokens"] == 2 * (4 + 3 * 2) and host["levels"] == 2
    assert host["ours_ops"] > host["sdpa_ops"] >= 2 and host["ours_us"] > 0 and host["sdpa_us"] > 0
    # CPU flash: one forward and one backward call for SDPA; ours per call of the plan (prefix, cross, completions).
    assert (host["ours_kernels"], host["sdpa_kernels"]) == (6, 2)
    assert "Host cost per attention forward+backward" in table and "| 48x6x3x2 | 20 | 2 |" in table


def test_bench_with_a_shared_system_prompt(tmp_path, monkeypatch):
    """--system: every prompt opens with one shared run; ours with its prefix tree forwards it once (and agrees),
    ours by prompts forwards it once per prompt, the tree's limit proxy forwards as many tokens as ours. The tree
    variants join the default set."""
    out = tmp_path / "bench"
    assert bench.main(["--config", "80x4x2x3", "--system", "70", "--out", str(out), "--threads", "1", "--variants",
                       "baseline,packed_causal_roots,packed_causal_tree,shared_prefix,shared_prefix_prompts"]) == 0
    rows = {r["variant"]: r for r in map(json.loads, (out / "results.jsonl").read_text().splitlines())}
    for name in ("shared_prefix", "shared_prefix_prompts"):
        assert rows[name]["grad_rel_l2"] < 1e-4 and rows[name]["max_abs_logp_diff"] < 1e-4
        assert rows[name]["system"] == 70
    assert rows["baseline"]["tokens"] == 6 * 84 and rows["shared_prefix_prompts"]["tokens"] == 3 * (80 + 8)
    assert (rows["shared_prefix"]["tokens"] == rows["packed_causal_tree"]["tokens"]
            == rows["packed_causal_roots"]["tokens"] == 70 + 3 * (10 + 8))
    table = (out / "results.md").read_text()
    assert "shared system prompt of 70 tokens" in table
    assert "× packed_causal_tree" in table and "× packed_causal_roots" in table
    seen = []
    monkeypatch.setattr(bench, "run_config", lambda model, cfg, args, *a: seen.append(list(args.variants)) or [])
    assert bench.main(["--config", "80x4x2x3", "--system", "70", "--out", str(out), "--threads", "1"]) == 0
    assert {"packed_causal_roots", "packed_causal_tree", "shared_prefix_prompts"} <= set(seen[0])


def test_tree_proxy_is_packed_causal_for_one_level():
    """packed_causal_roots is packed_causal's construction at the tree's tokens: sharing whole prompts, each root is
    a group's prompt and its subtree the group's completions, so it computes exactly what packed_causal does."""
    model = variants.build_model("tiny", torch.float64, torch.device("cpu"), grad_ckpt=False)
    pid, pmask, cid, cmask = variants.make_batch(9, 5, 3, 2, model.config.vocab_size, torch.device("cpu"))
    roots = baselines.packed_causal_roots_logprobs(model, pid, pmask, cid, cmask)
    assert torch.allclose(roots, baselines.packed_causal_logprobs(model, pid, cid, 3), rtol=0, atol=1e-12)
    assert not torch.allclose(roots, baselines.stock_logprobs(model, pid, pmask, cid, cmask), atol=1e-3)


def test_bench_with_fewer_layers(tmp_path):
    """--layers: the model shape at another depth, named so in the report."""
    out = tmp_path / "bench"
    assert bench.main(["--config", "12x4x2x1", "--layers", "2", "--variants", "baseline,shared_prefix", "--out",
                       str(out), "--threads", "1", "--no-host-cost"]) == 0
    rows = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert {r["model"] for r in rows} == {"tiny with 2 layers"} and all("host" not in r for r in rows)
    assert variants.build_model("qwen2.5-7b", torch.float32, torch.device("meta"), False,
                                layers=1).config.num_hidden_layers == 1


def test_bench_with_tree_rollouts(tmp_path):
    """--branches: each group's completions branch once at half length; ours shares the trunks (and agrees)."""
    out = tmp_path / "bench"
    before = sp.set_prefix_tree(min_node_tokens=2)  # trunks of 4 tokens here, under the default threshold
    try:
        assert bench.main(["--config", "12x8x4x2", "--branches", "2", "--out", str(out), "--threads", "1",
                           "--variants", "baseline,packed_causal_roots,packed_causal_tree,shared_prefix,shared_prefix_prompts"]) == 0
    finally:
        sp.set_prefix_tree(**before)
    rows = {r["variant"]: r for r in map(json.loads, (out / "results.jsonl").read_text().splitlines())}
    assert rows["shared_prefix"]["grad_rel_l2"] < 1e-4 and rows["shared_prefix"]["max_abs_logp_diff"] < 1e-4
    # Per group: the prompt, 2 trunks of 4 and 4 tails of 4, against the prompt and 4 completions of 8.
    assert rows["shared_prefix_prompts"]["tokens"] == 2 * (12 + 4 * 8)
    assert (rows["shared_prefix"]["tokens"] == rows["packed_causal_tree"]["tokens"]
            == rows["packed_causal_roots"]["tokens"] == 2 * (12 + 2 * 4 + 4 * 4))


def test_bench_with_a_sliding_window(tmp_path):
    """--window: every layer windowed (8 tokens, shorter than every row); ours still equals the baseline, and the
    full-attention-only variants are left out."""
    out = tmp_path / "bench"
    assert bench.main(["--config", "24x12x3x2", "--window", "8", "--variants",
                       "baseline,packed_causal,shared_prefix,prefix_grouper", "--out", str(out), "--threads", "1"]) == 0
    rows = {r["variant"]: r for r in map(json.loads, (out / "results.jsonl").read_text().splitlines())}
    assert set(rows) == {"baseline", "packed_causal", "shared_prefix"} and rows["shared_prefix"]["window"] == 8
    assert rows["shared_prefix"]["grad_rel_l2"] < 1e-4 and rows["shared_prefix"]["max_abs_logp_diff"] < 1e-4
    assert "sliding window 8" in (out / "results.md").read_text()


def test_bench_with_varying_shapes(tmp_path, monkeypatch):
    """--vary: each step of every variant runs on the next prompt length (P, P + 8, …), the same sequence for all
    (so the first steps, compared with the baseline, share one batch); ours still equals the baseline, and the
    limit proxy still does not."""
    ran = []
    variant_fns = bench.variant_fns

    def recording(model, batch, g, device, wanted):
        fns = variant_fns(model, batch, g, device, wanted)
        return {name: (lambda fn=fn, name=name: ran.append((name, batch[0].shape[1])) or fn())
                for name, fn in fns.items()}

    monkeypatch.setattr(bench, "variant_fns", recording)
    out = tmp_path / "bench"
    names = ["baseline", "packed_causal", "shared_prefix", "shared_prefix_eager_cudnn", "prefix_grouper"]
    assert bench.main(["--config", "48x6x3x2", "--vary", "--steps", "3", "--variants", ",".join(names),
                       "--out", str(out), "--threads", "1"]) == 0
    rows = {r["variant"]: r for r in map(json.loads, (out / "results.jsonl").read_text().splitlines())}
    assert set(rows) == set(names) and all(r["vary"] for r in rows.values())
    for name in ("shared_prefix", "shared_prefix_eager_cudnn", "prefix_grouper"):
        assert rows[name]["grad_rel_l2"] < 1e-4 and rows[name]["max_abs_logp_diff"] < 1e-4, rows[name]
    assert rows["packed_causal"]["max_abs_logp_diff"] > 1e-3
    # Each variant's k-th step on the k-th batch (2 untimed steps, then 3 timed rounds; CUDA profiles one more).
    for name in names:
        assert [p for n, p in ran if n == name] == [48, 56, 64, 72, 80], name
    assert [n for n, _ in ran[:10]] == [n for n in names for _ in range(2)]  # first steps: method by method
    assert "a new prompt length every step" in (out / "results.md").read_text()


def test_packed_causal_fa2_holds_sdpa_to_flash(tmp_path, monkeypatch):
    """packed_causal_fa2 (CUDA-only, so stood in for here) runs its whole step with SDPA's cuDNN and
    memory-efficient backends off and flash on, and leaves the flags as they were for the other variants."""
    flags = {}
    cuda = torch.backends.cuda

    def now():
        return cuda.flash_sdp_enabled(), cuda.cudnn_sdp_enabled(), cuda.mem_efficient_sdp_enabled()

    def stand_in(model, batch, g, device, wanted):
        pid, _, cid, _ = batch
        out = {}
        for name in wanted:
            def fn(name=name):
                flags.setdefault(name, set()).add(now())
                return baselines.packed_causal_logprobs(model, pid, cid, g)
            out[name] = fn
        return out

    monkeypatch.setattr(bench, "variant_fns", stand_in)
    before = now()
    assert bench.main(["--config", "16x4x2x1", "--steps", "3", "--variants", "packed_causal,packed_causal_fa2",
                       "--out", str(tmp_path), "--threads", "1"]) == 0
    assert flags["packed_causal_fa2"] == {(True, False, False)}
    assert flags["packed_causal"] == {before} and now() == before


def test_bench_default_variants_on_cpu(tmp_path, monkeypatch):
    """Without --variants, CPU runs every variant but those that run exactly what shared_prefix runs there."""
    seen = []
    monkeypatch.setattr(bench, "run_config", lambda model, cfg, args, *a: seen.append(list(args.variants)) or [])
    assert bench.main(["--config", "8x2x1x1", "--out", str(tmp_path), "--threads", "1"]) == 0
    assert seen == [["baseline", "packed_causal", "packed_causal_fa2", "shared_prefix", "shared_prefix_fa2",
                     "shared_prefix_cudnn",
                     "shared_prefix_cudnn_views", "shared_prefix_full_head", "shared_prefix_fused", "flex",
                     "prefix_grouper"]]


def test_bench_rejects_bad_arguments(tmp_path, capsys):
    """Each bad argument stops the bench with argparse's usage error (exit 2) naming that argument."""
    for argv, named in ((["--config", "12x3x2"], "--config"), (["--config", "0x3x2x1"], "--config"),
                        (["--variants", "nope"], "--variants"), (["--steps", "2"], "--steps"),
                        (["--window", "0"], "--window"), (["--config", "12x3x2x1", "--system", "12"], "--system"),
                        (["--system", "-1"], "--system"), (["--config", "12x3x2x1", "--branches", "3"], "--branches"),
                        (["--config", "12x1x2x1", "--branches", "2"], "--branches")):
        with pytest.raises(SystemExit) as stopped:
            bench.main(argv + ["--out", str(tmp_path)])
        assert stopped.value.code == 2, argv
        assert named in capsys.readouterr().err, argv


def test_demo_runs(capsys):
    """The demo's table: both methods, ours forwarding fewer tokens with log-probs and gradients equal to stock."""
    assert demo.main(["--prompts", "2", "--group", "3", "--prompt-len", "40", "--completion-len", "6",
                      "--hidden", "32", "--layers", "2", "--vocab", "128", "--threads", "1"]) == 0
    import re

    rows = {m[1]: m[2].split() for m in re.finditer(r"^(stock \(TRL-style rows\)|shared_prefix) +([\d,]+ .*)$",
                                                    capsys.readouterr().out, re.M)}
    assert set(rows) == {"stock (TRL-style rows)", "shared_prefix"}
    stock, ours = rows["stock (TRL-style rows)"], rows["shared_prefix"]  # tokens, Δlogp, grad, time, mem, speedup
    assert int(ours[0].replace(",", "")) < int(stock[0].replace(",", ""))
    assert float(ours[1]) <= 1e-5 and float(ours[2]) <= 1e-5 and stock[-1] == "1.00×"


def test_measure_methods_keeps_going():
    """A method failing at once is recorded as an error; one failing in the timed rounds keeps its peak and
    agreement; the others are measured and compared with the first."""
    import torch

    from shared_prefix.bench.measure import measure_methods

    lin = torch.nn.Linear(4, 3).double()
    x = torch.randn(5, 4, dtype=torch.float64)
    calls = {"late": 0}

    def good():
        return torch.log_softmax(lin(x), -1)

    def broken():
        raise RuntimeError("no kernel\nsecond line")

    def late():
        calls["late"] += 1
        if calls["late"] > 3:
            raise MemoryError("out of memory")
        return good()

    res = measure_methods(lin, {"ref": good, "broken": broken, "late": late, "same": good},
                          torch.ones(5, dtype=torch.float64), torch.ones(5, 3), torch.device("cpu"), steps=3)
    assert res["broken"] == {"error": "RuntimeError: no kernel"}
    assert res["late"]["error"].startswith("MemoryError") and "median_s" not in res["late"]
    assert res["late"]["peak_mem_bytes"] >= 0 and res["late"]["max_abs_logp_diff"] == 0.0
    assert res["same"]["median_s"] > 0 and res["same"]["grad_rel_l2"] == 0.0 and "error" not in res["same"]


def _interrupt_on_call(n: int, fn):
    """``fn`` that raises KeyboardInterrupt (what SIGINT from ``timeout -s INT`` raises) on its n-th call."""
    calls = [0]

    def wrapped(*args, **kwargs):
        calls[0] += 1
        if calls[0] == n:
            raise KeyboardInterrupt
        return fn(*args, **kwargs)

    return wrapped


def test_measure_methods_interrupted():
    """An interrupt in the timed rounds keeps every method's completed rounds (median over them); without
    keep_going it propagates."""
    import torch

    from shared_prefix.bench.measure import measure_methods

    lin = torch.nn.Linear(4, 3).double()
    x = torch.randn(5, 4, dtype=torch.float64)

    def good():
        return torch.log_softmax(lin(x), -1)

    def methods():  # the 4th call of "b" is its second timed round (after its first step and peak probe)
        return {"a": good, "b": _interrupt_on_call(4, good), "c": good}

    args = (torch.ones(5, dtype=torch.float64), torch.ones(5, 3), torch.device("cpu"))
    res = measure_methods(lin, methods(), *args, steps=5)
    assert [res[k]["rounds"] for k in "abc"] == [2, 1, 1]
    assert all(res[k]["interrupted"] and res[k]["median_s"] > 0 and "error" not in res[k] for k in "abc")
    with pytest.raises(KeyboardInterrupt):
        measure_methods(lin, methods(), *args, steps=5, keep_going=False)


def test_measure_methods_interrupted_between_steps(monkeypatch):
    """An interrupt while a method's agreement is computed (right after its first step): the methods before it end
    with no timed round, it and the rest as not run, so the bench's table can be written."""
    import torch

    from shared_prefix.bench import measure as _measure

    lin = torch.nn.Linear(4, 3).double()
    x = torch.randn(5, 4, dtype=torch.float64)
    monkeypatch.setattr(_measure, "agreement", _interrupt_on_call(2, _measure.agreement))
    res = _measure.measure_methods(lin, {"a": lambda: torch.log_softmax(lin(x), -1), "b": lambda: lin(x)},
                                   torch.ones(5, dtype=torch.float64), torch.ones(5, 3), torch.device("cpu"), steps=3)
    assert res["a"]["rounds"] == 0 and res["a"]["error"] == "interrupted before a timed round"
    assert res["b"]["error"] == "interrupted before it ran"
    assert all(r["interrupted"] for r in res.values())
    rows = [dict(config="1x1x1x1", variant=k, **v) for k, v in res.items()]
    meta = dict(device_name="cpu", model="m", dtype="float64", grad_ckpt=False, torch="t", commit="c", date="d",
                steps=3)
    assert "| 1x1x1x1 | b | — |" in report.markdown(rows, meta)


def test_markdown_gpu_busy_columns():
    """CUDA rows carry the profiled GPU busy time: the table gains its columns, with the ratio to packed_causal's;
    a row without it (a failed profile) shows dashes; CPU-only rows keep the plain table."""
    meta = dict(device_name="gpu", model="m", dtype="bfloat16", grad_ckpt=True, torch="t", commit="c", date="d",
                steps=3)
    common = dict(peak_mem_bytes=2**30, max_abs_logp_diff=0.0, grad_rel_l2=0.0, grad_cos=1.0)
    rows = [dict(config="1x1x1x1", variant="baseline", median_s=1.0, gpu_busy_s=0.8, gpu_attn_s=0.2, **common),
            dict(config="1x1x1x1", variant="packed_causal", median_s=0.5, gpu_busy_s=0.4, gpu_attn_s=0.1, **common),
            dict(config="1x1x1x1", variant="shared_prefix", median_s=0.5, gpu_busy_s=0.3, gpu_attn_s=0.05, **common),
            dict(config="1x1x1x1", variant="flex", median_s=0.6, gpu_busy_error="RuntimeError: x", **common)]
    table = report.markdown(rows, meta)
    assert "GPU busy s (attention)" in table
    assert "| 0.300 (0.050) | 0.75× |" in table
    assert "| 1.000000 | — | — |" in table
    assert "GPU busy" not in report.markdown([{k: v for k, v in r.items() if not k.startswith("gpu")} for r in rows],
                                            meta)
    rows[1]["gpu_busy_s"] = 0.0  # a reference without a busy time: no ratio, no ZeroDivisionError
    assert "| 0.300 (0.050) | — |" in report.markdown(rows, meta)


def test_bench_keeps_partial_results_when_interrupted(tmp_path, monkeypatch):
    """SIGINT in the second config's rounds: rows of the first config and the completed rounds of the second are
    written (jsonl, table, plot), the remaining configs are skipped and the exit status is 130."""
    out = tmp_path / "bench"
    # baseline runs 2 untimed + 3 timed steps in the first config; its 8th call is the second config's first round.
    monkeypatch.setattr(variants, "stock_logprobs", _interrupt_on_call(8, variants.stock_logprobs))
    argv = ["--config", "24x4x2x1", "--config", "20x5x2x2", "--config", "16x3x2x1", "--steps", "3",
            "--variants", "baseline,shared_prefix", "--out", str(out), "--threads", "1"]
    assert bench.main(argv) == 130
    rows = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert [(r["config"], r["variant"]) for r in rows] == [
        ("24x4x2x1", "baseline"), ("24x4x2x1", "shared_prefix"), ("20x5x2x2", "baseline"),
        ("20x5x2x2", "shared_prefix")]
    assert [r["rounds"] for r in rows[:2]] == [3, 3] and not any(r.get("interrupted") for r in rows[:2])
    assert rows[2]["interrupted"] and rows[2]["error"] == "interrupted before a timed round"
    assert rows[3]["interrupted"] and "error" in rows[3]
    assert "interrupted" in (out / "results.md").read_text() and (out / "results.png").stat().st_size > 0
