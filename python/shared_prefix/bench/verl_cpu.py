"""verl on CPU ranks, for the bench and the tests: a CPU platform registered through verl's own platform plugin
API (``PlatformRegistry``, ``set_platform``), so that verl's engines, workers and wrapping code run unchanged on
gloo. Import this before any verl engine module (some read the device name when imported). With a GPU it does
nothing: verl runs on its own CUDA platform. Not part of the plugin: verl does not support CPU training.

For verl's stock Ulysses sequence parallelism, two gaps of CPU ranks are bridged under verl's own code:

- gloo has no list-form ``all_to_all`` (which ``verl.utils.ulysses.all_to_all_tensor`` calls): the same exchange
  over ``all_to_all_single``;
- CPU has no flash-attention, the only attention verl's Ulysses wraps: ``attn_implementation="flash_attention_2"``
  loads on CPU, and the varlen attention that verl's wrapper calls between its exchanges is SDPA per packed
  sequence (split where ``position_ids`` restart at 0), exact."""

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


def _gloo_all_to_all(local_input, scatter_dim, gather_dim, group=None, async_op=False):
    """``verl.utils.ulysses.all_to_all_tensor`` over ``all_to_all_single``: equal chunks of ``scatter_dim`` to the
    ranks in order, the received ones concatenated along ``gather_dim``."""
    import torch.distributed as dist
    from verl.utils import ulysses

    group = ulysses.get_ulysses_sequence_parallel_group() if group is None else group
    size = dist.get_world_size(group)
    x = local_input.movedim(scatter_dim, 0)
    x = x.reshape(size, x.shape[0] // size, *x.shape[1:]).contiguous()
    received = torch.empty_like(x)
    dist.all_to_all_single(received, x, group=group)
    out = torch.cat([received[r].movedim(0, scatter_dim) for r in range(size)], dim=gather_dim).contiguous()
    return (lambda: out) if async_op else out


def _cpu_varlen_attention(query, key, value, attention_mask, query_length, *args, position_ids=None,
                          is_causal=True, softmax_scale=None, sliding_window=None, softcap=None, s_aux=None,
                          dropout=0.0, **kwargs):
    """What flash-attention's varlen forward computes for a packed ``[1, S, H, D]`` stream: causal attention within
    each sequence (``position_ids`` restart at 0), GQA key/value heads shared, on CPU."""
    if attention_mask is not None or position_ids is None or query.shape[0] != 1:
        raise NotImplementedError("the CPU varlen attention takes one packed stream with position_ids, no mask")
    if sliding_window is not None or softcap is not None or s_aux is not None or dropout or not is_causal:
        raise NotImplementedError("the CPU varlen attention has no windows, softcap, sinks or dropout")
    positions = position_ids.reshape(-1)
    starts = (positions == 0).nonzero().reshape(-1).tolist() + [positions.numel()]
    out = []
    for a, b in zip(starts[:-1], starts[1:]):
        q, k, v = (t[0, a:b].transpose(0, 1)[None] for t in (query, key, value))
        o = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, scale=softmax_scale,
                                                             enable_gqa=True)
        out.append(o[0].transpose(0, 1))
    return torch.cat(out)[None]


def _flash_attention_on_cpu() -> None:
    """``attn_implementation="flash_attention_2"`` on CPU: the load-time checks pass, and verl's Ulysses wrapper
    (installed by verl's ``apply_monkey_patch``) runs around :func:`_cpu_varlen_attention`."""
    from transformers import PreTrainedModel
    from verl.models.transformers import monkey_patch

    check = PreTrainedModel._check_and_adjust_attn_implementation

    def adjust(self, attn_implementation, *args, **kwargs):
        if attn_implementation == "flash_attention_2":
            return attn_implementation
        return check(self, attn_implementation, *args, **kwargs)

    PreTrainedModel._check_and_adjust_attn_implementation = adjust
    monkey_patch._flash_attention_forward = _cpu_varlen_attention


if not torch.cuda.is_available():
    set_platform(PlatformCPU())
    _register_fsdp_engines()
    _sync_cpu_module_states()
    from verl.utils import ulysses as _ulysses

    _ulysses.all_to_all_tensor = _gloo_all_to_all
    _flash_attention_on_cpu()
