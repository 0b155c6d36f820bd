"""The bench and the demo end to end on CPU at a tiny size: every output written, with the fields the issue names,
and the agreement columns meaning what they say (ours equals the baseline; the limit proxy does not)."""

from __future__ import annotations

import json

import pytest

from shared_prefix import bench, demo


def test_bench_writes_results(tmp_path):
    out = tmp_path / "bench"
    variants = "baseline,packed_causal,shared_prefix,shared_prefix_full_head,flex,prefix_grouper"
    assert bench.main(["--config", "48x6x3x2", "--config", "20x5x1x3", "--variants", variants,
                       "--out", str(out), "--threads", "1"]) == 0
    rows = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    by = {(r["config"], r["variant"]): r for r in rows}
    # flex is CUDA-only; prefix-grouper is installed in the test environment.
    assert {v for _, v in by} == {"baseline", "packed_causal", "shared_prefix", "shared_prefix_full_head",
                                  "prefix_grouper"}
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
    assert by[("48x6x3x2", "baseline")]["tokens"] == 6 * 54 and by[("48x6x3x2", "shared_prefix")]["tokens"] == 2 * 66
    # G=3: the packed causal row lets completions see each other, so its log-probs are wrong by design.
    assert by[("48x6x3x2", "packed_causal")]["max_abs_logp_diff"] > 1e-3
    table = (out / "results.md").read_text()
    assert "| 48x6x3x2 | shared_prefix |" in table
    assert (out / "results.png").stat().st_size > 0


def test_bench_rejects_bad_arguments(tmp_path):
    for argv in (["--config", "12x3x2"], ["--config", "0x3x2x1"], ["--variants", "nope"], ["--steps", "2"]):
        with pytest.raises(SystemExit):
            bench.main(argv + ["--out", str(tmp_path)])


def test_demo_runs(capsys):
    assert demo.main(["--prompts", "2", "--group", "3", "--prompt-len", "40", "--completion-len", "6",
                      "--hidden", "32", "--layers", "2", "--vocab", "128", "--threads", "1"]) == 0
    text = capsys.readouterr().out
    assert "shared_prefix" in text and "stock" in text


def test_measure_methods_keeps_going():
    """A method failing at once is recorded as an error; one failing in the timed rounds keeps its peak and
    agreement; the others are measured and compared with the first."""
    import torch

    from shared_prefix._measure import measure_methods

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
