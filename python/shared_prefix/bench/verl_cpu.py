"""verl on CPU ranks, for the bench and the tests: a CPU platform registered through verl's own platform plugin
API (``PlatformRegistry``, ``set_platform``), so that verl's engines, workers and wrapping code run unchanged on
gloo. Import this before any verl engine module (some read the device name when imported). With a GPU it does
nothing: verl runs on its own CUDA platform. Not part of the plugin: verl does not support CPU training."""

from __future__ import annotations

import contextlib
from types import ModuleType
from typing import Any, Optional

import torch
from verl.plugin.platform.platform_base import PlatformBase
from verl.plugin.platform.platform_manager import PlatformRegistry, set_platform


class _CPUModule(ModuleType):
    """``torch.cpu`` with the calls verl makes on its device module that ``torch.cpu`` lacks (cache and memory
    bookkeeping, which host memory does not have)."""

    def __getattr__(self, name):
        return getattr(torch.cpu, name)

    @staticmethod
    def empty_cache() -> None:
        pass

    @staticmethod
    def memory_allocated(device=None) -> int:
        return 0

    max_memory_allocated = memory_reserved = max_memory_reserved = memory_allocated

    @staticmethod
    def reset_peak_memory_stats(device=None) -> None:
        pass

    @staticmethod
    def mem_get_info(device=None):
        return 0, 0

    @staticmethod
    def get_device_name(device=None) -> str:
        return "cpu"


@PlatformRegistry.register(platform="cpu")
class PlatformCPU(PlatformBase):
    """The host CPU as verl's device: gloo for collectives, no streams, nothing to synchronize."""

    device_name = "cpu"
    vendor_name = "cpu"
    device_module: ModuleType = _CPUModule("verl_cpu.device")

    def is_available(self) -> bool:
        return True

    def current_device(self) -> str:
        # A device, not an index: callers pass it to FSDP's device_id, .to() and torch.device().
        return "cpu"

    def device_count(self) -> int:
        return 1

    def set_device(self, device_index: int) -> None:
        pass

    def synchronize(self, device_index: Optional[int] = None) -> None:
        pass

    def manual_seed(self, seed: int) -> None:
        torch.manual_seed(seed)

    def manual_seed_all(self, seed: int) -> None:
        torch.manual_seed(seed)

    def set_allocator_settings(self, settings: str) -> None:
        pass

    def empty_cache(self) -> None:
        pass

    def get_device_capability(self, device_index: int = 0):
        return None, None

    def communication_backend_name(self) -> str:
        return "gloo"

    def visible_devices_envvar(self) -> str:
        return "CUDA_VISIBLE_DEVICES"

    @contextlib.contextmanager
    def nvtx_range(self, msg: str):
        yield

    def profiler_start(self) -> None:
        pass

    def profiler_stop(self) -> None:
        pass

    def ray_resource_name(self) -> str:
        return "CPU"

    def ray_noset_envvars(self) -> list:
        return []

    def is_ipc_supported(self) -> bool:
        return False

    def cudart(self) -> Any:
        return None


def _register_fsdp_engines() -> None:
    """verl's FSDP engines, as registered for CUDA, registered for the CPU device too."""
    from verl.workers.engine import EngineRegistry
    from verl.workers.engine.fsdp import transformer_impl as ti

    for model_type, engine in (("language_model", ti.FSDPEngineWithLMHead), ("value_model", ti.FSDPEngineWithValueHead)):
        if "cpu" not in EngineRegistry._engines.get(model_type, {}).get("fsdp", {}):
            EngineRegistry.register(model_type=model_type, backend=["fsdp", "fsdp2"], device="cpu")(engine)


def _sync_cpu_module_states() -> None:
    """verl builds FSDP1 with ``sync_module_states=True`` (rank 0's weights broadcast to the meta-initialized other
    ranks). FSDP1 refuses CPU tensors there, a check made for NCCL; gloo broadcasts them."""
    from torch.distributed.fsdp import _init_utils

    _init_utils._check_module_states_for_sync_module_states = lambda module_states: None


if not torch.cuda.is_available():
    set_platform(PlatformCPU())
    _register_fsdp_engines()
    _sync_cpu_module_states()
