"""verl for the tests: CPU ranks (``shared_prefix.bench.verl_cpu``, imported first), verl's trainer config as a
user's command line composes it, verl's LM-head engine over a tiny Qwen2 without its constructor, and the
fixtures of the modules that drive that engine in this process (import them into the module)."""

from __future__ import annotations

import pytest
import torch

import shared_prefix.bench.verl_cpu  # noqa: F401  (before any verl engine module)
from shared_prefix.verl.check import load as trainer_config  # noqa: F401  (verl's ppo_trainer.yaml + overrides)


def engine(tie_word_embeddings: bool = False):
    """verl's ``FSDPEngineWithLMHead`` over a tiny Qwen2 on CPU, unwrapped: the engine's own methods
    (``forward_step``, ``forward_backward_batch``, the input and output hooks) without its constructor, which
    builds FSDP and an optimizer."""
    import verl.utils.torch_functional as verl_F
    import verl.workers.engine.fsdp.transformer_impl as ti
    from transformers import Qwen2Config, Qwen2ForCausalLM
    from verl.workers.config import FSDPEngineConfig

    cfg = Qwen2Config(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=128, tie_word_embeddings=tie_word_embeddings)
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(0)
    eng = object.__new__(ti.FSDPEngineWithLMHead)
    eng.engine_config = FSDPEngineConfig(use_torch_compile=False)
    eng.module = Qwen2ForCausalLM(cfg)
    eng.use_ulysses_sp, eng.ulysses_sequence_parallel_size, eng.ulysses_device_mesh = False, 1, None
    eng.pad_to_length, eng.pad_to_length_bucket = False, 1024
    eng.compute_entropy_from_logits = verl_F.entropy_from_logits
    eng._autocast_dtype = torch.float32
    return eng


@pytest.fixture(scope="module", autouse=True)
def gloo():
    """A one-rank gloo process group in this process (FSDP and verl's engine need one)."""
    from helpers import ensure_gloo

    ensure_gloo()
    yield


@pytest.fixture(autouse=True)
def engine_on_cpu(monkeypatch):
    """The engine's methods run on CPU modules, also on a machine with a GPU (where verl's platform would move
    each micro-batch to it)."""
    import verl.workers.engine.fsdp.transformer_impl as ti

    monkeypatch.setattr(ti, "get_device_id", lambda: "cpu")
    monkeypatch.setattr(ti, "get_device_name", lambda: "cpu")
