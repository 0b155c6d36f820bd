"""Type stubs for the Rust extension ``shared_prefix._core`` (import torch before it). The fields of a plan are
declared and documented once, on :class:`shared_prefix.Plan`; ``make_plan`` hands them over as a dict. A plan
crosses as its handle (``Plan.handle``: one int64 CPU tensor whose storage owns the Rust plan). Importing the
module defines the torch ops ``torch.ops.shared_prefix.attention_forward`` / ``attention_backward``
(:mod:`shared_prefix._ops`).
``tests/test_core_stub.py`` fails when these names or parameters differ from the built extension's."""

from typing import Any, Hashable, Optional, Sequence, Tuple, Union

import torch

TORCH_VERSION: str

def make_plan(
    prompt_ids: torch.Tensor,
    prompt_mask: torch.Tensor,
    completion_ids: torch.Tensor,
    completion_mask: torch.Tensor,
    group_sizes: Optional[Sequence[int]] = None,
    group_ids: Optional[Union[torch.Tensor, Sequence[Hashable]]] = None,
    windows: Optional[Sequence[int]] = None,
    tree: Optional[Tuple[int, int]] = None,
) -> Tuple[torch.Tensor, dict[str, Any]]: ...
def make_compat_plan(
    prefix_lens: Sequence[int],
    suffix_lens: Sequence[int],
    group_sizes: Sequence[int],
    device: str,
    padding_mask: Optional[torch.Tensor] = None,
    left: bool = False,
) -> Tuple[torch.Tensor, dict[str, Any], dict[str, torch.Tensor], Tuple[int, int, int]]:
    """The original Prefix Grouper's grouped layout: the plan, its fields, its index tensors (grouped_prefix,
    grouped_suffix, ungrouped_prefix, ungrouped_suffix, sample_group, padding_mask) and (width, max_prefix,
    max_suffix)."""
def mask_positions(mask: torch.Tensor) -> torch.Tensor:
    """Flat row-major positions of a mask's true entries, on the mask's device."""
def auto_kernels(plan: torch.Tensor) -> list[Tuple[str, str]]:
    """(call, "cudnn" | "flash") for each full-attention call under the CUDA fp16/bf16 default, in order."""

# The kernel policy's process-wide settings; each returns the previous value.
def set_self_calls(mode: str) -> str: ...
def set_cudnn_after(plans: int) -> int: ...
def set_cudnn_bucket(tokens: int) -> int: ...
def set_math_block_bytes(n: int) -> int: ...
def _set_pad_min_keys(keys: int) -> int: ...
def _forget_shapes() -> None: ...
