"""Type stubs for the Rust extension ``shared_prefix._core`` (import torch before it)."""

from typing import Hashable, Optional, Sequence, Tuple, Union

import torch

class CorePlan:
    """A plan on its device: host metadata plus index tensors made with one host→device copy."""

    @property
    def num_tokens(self) -> int: ...
    @property
    def prefix_tokens(self) -> int: ...
    @property
    def completion_tokens(self) -> int: ...
    @property
    def stock_tokens(self) -> int: ...
    @property
    def rows(self) -> int: ...
    @property
    def prompt_width(self) -> int: ...
    @property
    def completion_width(self) -> int: ...
    @property
    def group_sizes(self) -> list[int]: ...
    @property
    def row_group(self) -> list[int]: ...
    @property
    def max_seqlen(self) -> int: ...
    @property
    def min_seqlen(self) -> int: ...
    @property
    def windows(self) -> list[int]:
        """Sliding windows (shorter than max_seqlen) with key tables on the device."""
    @property
    def device(self) -> str: ...
    @property
    def src_index(self) -> torch.Tensor:
        """[T] int64: flat index into cat(prompt.flatten(), completion.flatten()) of each packed token."""
    @property
    def position_ids(self) -> torch.Tensor:
        """[T] int64."""
    @property
    def predictor(self) -> torch.Tensor:
        """[Nc] int64: packed row predicting each completion token (packed order)."""
    @property
    def completion_flat(self) -> torch.Tensor:
        """[Nc] int64: flat [B*Lc] index of each completion token (packed order)."""
    @property
    def completion_slot(self) -> torch.Tensor:
        """[B*Lc] int64: completion-region index of each position, -1 at padding."""
    @property
    def cu_seqlens(self) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """int32 segment tables: prefixes, group completion blocks, completions."""
    @property
    def auto_kernels(self) -> list[Tuple[str, str]]:
        """(call, "cudnn" | "flash") for each full-attention call under the CUDA fp16/bf16 default, in order."""

def make_plan(
    prompt_ids: torch.Tensor,
    prompt_mask: torch.Tensor,
    completion_mask: torch.Tensor,
    group_sizes: Optional[Sequence[int]] = None,
    group_ids: Optional[Union[torch.Tensor, Sequence[Hashable]]] = None,
    windows: Optional[Sequence[int]] = None,
) -> CorePlan: ...
def attention_forward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    plan: CorePlan,
    scale: float,
    kernels: Optional[str] = None,
    window: Optional[int] = None,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Returns (out [T, Hq, D], lse [T, Hq] fp32, or fp64 for fp64 inputs)."""
def attention_backward(
    dout: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    plan: CorePlan,
    scale: float,
    kernels: Optional[str] = None,
    window: Optional[int] = None,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]: ...
def make_compat_plan(
    prefix_lens: Sequence[int],
    suffix_lens: Sequence[int],
    group_sizes: Sequence[int],
    device: str,
    padding_mask: Optional[torch.Tensor] = None,
    left: bool = False,
) -> Tuple[CorePlan, dict, Tuple[int, int, int]]:
    """The original Prefix Grouper's grouped layout: the attention plan, its index tensors (grouped_prefix,
    grouped_suffix, ungrouped_prefix, ungrouped_suffix, sample_group, padding_mask) and (width, max_prefix,
    max_suffix)."""
def mask_positions(mask: torch.Tensor) -> torch.Tensor:
    """Flat row-major positions of a mask's true entries, on the mask's device."""
def set_math_block_bytes(n: int) -> int:
    """Score bytes per block of query rows in the explicit-math kernel (default 256 MiB); returns the previous."""
def set_self_calls(mode: str) -> str:
    """How the prefixes' and the completions' causal attention calls run: "auto" (the default: as the kernels
    prefer), "split" (DESIGN's three calls) or "fused" (calls 1 and 3 as one); returns the previous mode."""
def _forget_shapes() -> None:
    """Forget the shapes earlier plans had (tests)."""
def set_cudnn_bucket(tokens: int) -> int:
    """Padding multiple of the causal self-attention runs of >= 8192 keys on dense kernels, for plans made
    afterwards (0: none); returns the previous value."""
def _set_pad_min_keys(keys: int) -> int:
    """Tests: the shortest run (keys) the bucket padding applies to (default 8192); returns the previous value."""
def set_cudnn_after(plans: int) -> int:
    """Earlier plans of a call's dense shape needed before "auto" gives it to cuDNN (plans made afterwards);
    returns the previous value (default 8)."""
