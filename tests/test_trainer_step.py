"""The trainer-step benches (``python -m shared_prefix.bench.trainer_step`` on one device, ``bench.sharded`` on
several ranks per engine): both trainers run, every bucket is timed and the buckets add up to the step, and the
shared-prefix trainer really took its path (no fallback to stock)."""

from __future__ import annotations

import json
import os

import pytest

pytest.importorskip("trl")
pytest.importorskip("datasets")

from shared_prefix.bench.trainer_step import BUCKETS, TRAINERS, main  # noqa: E402

P, S, G, B, STEPS = 16, 8, 4, 2, 2


def test_trainer_step_cpu_tiny(tmp_path):
    # beta > 0: TRL computes the reference model's log-probs without grad, so every bucket has calls to time.
    assert main(["--device", "cpu", "--model", "tiny", "--prompt-tokens", str(P), "--completion-tokens", str(S),
                 "--group", str(G), "--prompts", str(B), "--steps", str(STEPS), "--beta", "0.04",
                 "--out", str(tmp_path)]) == 0
    report = json.loads((tmp_path / "trainer_step.json").read_text())
    assert set(report["trainers"]) == set(TRAINERS)
    for name, result in report["trainers"].items():
        assert len(result["steps"]) == STEPS, name
        assert result["beta"] == 0.04
        assert result["completion_mean_length"] == S  # completions forced to S tokens
        for step in [*result["steps"], result["median"]]:
            # Every bucket was hit: generation, the reference log-probs, the loss forward, backward, and the rest
            # (the optimizer step, at least); the loss's log-probs are part of its forward.
            assert all(step[b] > 0 for b in BUCKETS) and step["loss_logprobs"] > 0, (name, step)
            assert step["loss_logprobs"] <= step["loss_forward"]
            # Disjoint buckets: the timed ones fit within the step, leaving the rest (which is clamped at 0, so
            # overlapping timers would show here, not in the sum), and with it they add up to the step.
            assert sum(step[b] for b in BUCKETS[:-1]) < step["total"], (name, step)
            assert sum(step[b] for b in BUCKETS) == pytest.approx(step["total"], rel=1e-6, abs=1e-9), (name, step)
    assert set(report["speedup"]) >= {*BUCKETS, "loss_logprobs", "total"}
    ours = report["trainers"]["shared_prefix"]
    assert ours["trainer"] == "SharedPrefixGRPOTrainer" and report["trainers"]["stock"]["trainer"] == "GRPOTrainer"
    # Its packed forward ran on every log-prob call: each prompt forwarded once per group, nothing fell back.
    assert ours["fallbacks"] == []
    assert ours["tokens_saved_frac"] == pytest.approx(1 - (P + G * S) / (G * (P + S)))
    meta = report["meta"]
    assert meta["steps"] == STEPS and meta["commit"] and meta["trl"] and meta["transformers"] and meta["torch"]
    table = (tmp_path / "trainer_step.md").read_text()
    assert "SharedPrefixGRPOTrainer" in table and "**total step**" in table
    assert not any(r["interrupted"] for r in report["trainers"].values()) and "interrupted" not in table


def test_trainer_step_interrupted_keeps_what_it_measured(tmp_path, monkeypatch):
    """A time limit's SIGINT in the second trainer's steps: the first trainer's results and the second's completed
    steps are written, and the table says so."""
    import transformers

    from shared_prefix.trl import SharedPrefixGRPOTrainer

    steps_done = []

    class Stop(transformers.TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            steps_done.append(state.global_step)
            if state.global_step == 3:  # warm-up and one timed step of ours, then the interrupt
                raise KeyboardInterrupt

    real_init = SharedPrefixGRPOTrainer.__init__

    def init(self, *args, **kwargs):
        real_init(self, *args, **kwargs)
        self.add_callback(Stop())

    monkeypatch.setattr(SharedPrefixGRPOTrainer, "__init__", init)
    assert main(["--device", "cpu", "--model", "tiny", "--prompt-tokens", str(P), "--completion-tokens", str(S),
                 "--group", str(G), "--prompts", str(B), "--steps", "3", "--out", str(tmp_path)]) == 0
    report = json.loads((tmp_path / "trainer_step.json").read_text())
    stock, ours = (report["trainers"][t] for t in TRAINERS)
    assert not stock["interrupted"] and len(stock["steps"]) == 3
    assert ours["interrupted"] and len(ours["steps"]) == 2
    assert "SharedPrefixGRPOTrainer was interrupted after 2 of 3 timed steps" in (tmp_path / "trainer_step.md").read_text()


def test_sharded_trainer_step_cpu_tiny(tmp_path):
    """The sharded bench on 2 CPU ranks for one engine: both trainers ran under it (the weights partitioned as
    ZeRO-3 keeps them), per-rank step times and peaks were reported, ours saved tokens without a fallback."""
    pytest.importorskip("deepspeed")
    from shared_prefix.bench import sharded

    assert sharded.main(["--engines", "zero3", "--prompt-tokens", "32", "--completion-tokens", "4", "--group", "4",
                         "--steps", "1", "--port", str(29700 + os.getpid() % 200), "--out", str(tmp_path)]) == 0
    report = json.loads((tmp_path / "sharded.json").read_text())
    runs = report["engines"]["zero3"]
    for trainer in sharded.TRAINERS:
        r = runs[trainer]
        assert r["sharding"] == "zero3" and len(r["ranks"]) == 2, r
        assert all(x["step_s"] > 0 and x["peak_rss_gib"] > 0 for x in r["ranks"])
        assert r["step_s"] == max(x["step_s"] for x in r["ranks"])
    assert runs["shared_prefix"]["tokens_saved_frac"] > 0 and not runs["shared_prefix"]["fallbacks"]
    table = (tmp_path / "sharded.md").read_text()
    assert "| zero3 | zero3 |" in table and report["meta"]["deepspeed"]
