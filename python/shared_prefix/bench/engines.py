"""The sharding engines a TRL run can use, set up as TRL's users set them up: through the trainer config, with
accelerate building the engine from it. Shared by the sharded trainer-step bench (``bench.sharded``) and the
multi-rank tests.

- ``ddp``: plain ``torchrun`` (DistributedDataParallel);
- ``zero2`` / ``zero3``: ``deepspeed=`` a DeepSpeed config as TRL's accelerate example configs write it (its
  batch, accumulation, clipping and precision left to the trainer, ``"auto"``); ZeRO-3 partitions every parameter
  (``stage3_param_persistence_threshold`` 0: small models would otherwise keep their weights whole);
- ``fsdp1`` / ``fsdp2``: ``fsdp="full_shard auto_wrap"`` with ``fsdp_config={"version": N}`` (transformers wraps
  the model's ``_no_split_modules``, the decoder layers).

On CPU ranks (gloo, no accelerator) accelerate cannot set up two of them, and :func:`prepare_cpu_ranks` bridges
that before the config is built; on GPUs it does nothing.
"""

from __future__ import annotations

import os

import torch

ENGINES = ("ddp", "zero2", "zero3", "fsdp1", "fsdp2")


def trainer_args(engine: str) -> dict:
    """The ``TrainingArguments`` (``GRPOConfig``) fields that select ``engine``."""
    if engine not in ENGINES:
        raise ValueError(f"engine: expected one of {', '.join(ENGINES)}, got {engine!r}")
    cpu = not torch.cuda.is_available()
    if engine in ("zero2", "zero3"):
        zero = {"stage": int(engine[-1])}
        if engine == "zero3":
            zero.update(stage3_param_persistence_threshold=0, stage3_gather_16bit_weights_on_model_save=True)
        ds = {"zero_optimization": zero, "train_micro_batch_size_per_gpu": "auto", "train_batch_size": "auto",
              "gradient_accumulation_steps": "auto", "gradient_clipping": "auto",
              "bf16": {"enabled": "auto"}, "fp16": {"enabled": "auto"}, "zero_allow_untested_optimizer": True}
        args = {"deepspeed": ds}
        if cpu:  # the state prepare_cpu_ranks configured: DeepSpeed over gloo
            args.update(use_cpu=False, accelerator_config={"use_configured_state": True})
        return args
    if engine in ("fsdp1", "fsdp2"):
        fsdp = {"version": int(engine[-1])}
        if cpu:
            # sync_module_states broadcasts rank 0's weights, which accelerate refuses on CPU; every rank loads
            # the same checkpoint anyway.
            fsdp["sync_module_states"] = False
        return {"fsdp": "full_shard auto_wrap", "fsdp_config": fsdp}
    return {}


def prepare_cpu_ranks(engine: str) -> None:
    """Set accelerate up for ``engine`` on CPU ranks, where it cannot do so itself; a no-op with CUDA. Call it once
    per process, before the trainer config is built.

    - DeepSpeed: without an accelerator TrainingArguments starts DeepSpeed's process group over gloo but counts one
      process (accelerate sees no backend), and ``use_cpu`` would skip DeepSpeed altogether; so the state is
      configured here, over gloo, and the config uses it (``use_configured_state``).
    - FSDP: accelerate switches an FSDP plugin on only for accelerator devices (MULTI_GPU and the like); here the
      plugin the config built is switched on exactly as accelerate does on a GPU, with the device plain ``cpu``
      (FSDP1 compares it with its compute device, which has no index on CPU). The wrapping itself
      (``fsdp2_prepare_model``, FSDP1's constructor with the plugin's settings) stays accelerate's.
    """
    if torch.cuda.is_available() or engine not in ENGINES:
        return
    from accelerate.state import AcceleratorState, PartialState
    from accelerate.utils import DistributedType

    if engine.startswith("zero"):
        os.environ["ACCELERATE_USE_DEEPSPEED"] = "true"
        try:
            PartialState(backend="gloo")
        finally:
            del os.environ["ACCELERATE_USE_DEEPSPEED"]
    elif engine.startswith("fsdp") and not getattr(AcceleratorState.__init__, "_cpu_fsdp", False):
        init = AcceleratorState.__init__

        def __init__(self, *args, fsdp_plugin=None, **kwargs):
            init(self, *args, fsdp_plugin=fsdp_plugin, **kwargs)
            if fsdp_plugin is not None and self.distributed_type == DistributedType.MULTI_CPU:
                self.fsdp_plugin = fsdp_plugin
                self.distributed_type = PartialState._shared_state["distributed_type"] = DistributedType.FSDP
                self.device = PartialState._shared_state["device"] = torch.device("cpu")

        __init__._cpu_fsdp = True
        AcceleratorState.__init__ = __init__


def sharding(model: torch.nn.Module) -> str:
    """What the engine made of the parameters: ``"zero3"`` (partitioned: each rank holds a part), ``"fsdp1"``
    (flat parameters), ``"fsdp2"`` (DTensors), or ``"whole"``."""
    from torch.distributed.fsdp import FullyShardedDataParallel
    from torch.distributed.tensor import DTensor

    params = list(model.parameters())
    if any(hasattr(p, "ds_numel") and p.ds_numel != p.numel() for p in params):
        return "zero3"
    if any(isinstance(m, FullyShardedDataParallel) for m in model.modules()):
        return "fsdp1"
    if any(isinstance(p, DTensor) for p in params):
        return "fsdp2"
    return "whole"

