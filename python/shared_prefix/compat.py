"""The original Prefix Grouper API on our planner and executor: change one import, keep the code.

    from shared_prefix.compat import PrefixGrouper   # instead of: from prefix_grouper import PrefixGrouper

It mirrors ``prefix-grouper==0.0.1.post1``: the grouped layout (one row ``[prefix, suffix_1 … suffix_k]`` per
group, padded ``"left"``, ``"right"`` or by a mask), ``concat_input``, ``split_output``, ``convert_padding``,
``padding_mask``, ``group_info`` and ``forward``. Every index comes from the Rust planner; ``forward`` runs our exact
shared-prefix attention (it ignores ``attn_func``).
"""

from __future__ import annotations

import operator
from typing import Any, List, Optional, Union

import torch

from . import _core
from ._attention import attention
from ._plan import Plan
from ._refusals import attention_refusal, window_cuts

ATTENTION_NAME = "prefix_grouper_attention"

PaddingMode = Union[str, torch.Tensor]
_MAX_TOKENS = 2**31 - 1


class Info:
    """One group: ``prefix_len`` and the ``suffix_lens`` of its samples."""

    def __init__(self, prefix_len: int, suffix_lens: List[int]):
        self.prefix_len = int(prefix_len)
        self.suffix_lens = [int(s) for s in suffix_lens]

    @property
    def num_samples(self) -> int:
        return len(self.suffix_lens)

    @property
    def total_len(self) -> int:
        return self.prefix_len + sum(self.suffix_lens)

    def __getitem__(self, i):
        return [self.prefix_len, *self.suffix_lens][i]

    def __len__(self) -> int:
        return 1 + len(self.suffix_lens)

    def __repr__(self) -> str:
        return f"Info(prefix_len={self.prefix_len}, suffix_lens={self.suffix_lens})"


def _length(n: Any, group_info: Any) -> int:
    """A length as the original takes it: any integer (Python, NumPy or a 0-d integer tensor), not a bool."""
    try:
        value = operator.index(n) if not isinstance(n, bool) else -1
    except TypeError:
        value = -1
    if value < 0:
        raise ValueError(f"group_info: lengths must be non-negative ints, got {group_info!r}")
    return value


# Keywords of attention functions (transformers' and flash-attn's) that would change the attention computed. The
# original hands every keyword to its attn_func; ours computes exact causal softmax attention itself, so a keyword
# asking for something else is refused rather than ignored.
def _forward_refusal(plan: Plan, kwargs: dict) -> Optional[str]:
    window = kwargs.get("sliding_window")
    if window_cuts(window, plan):
        return (f"sliding_window={window} is shorter than the longest sequence ({plan.max_seqlen} tokens); the compat "
                "layer's plans hold no window tables (shared_prefix.completion_logprobs, TRL and verl take windows)")
    why, _ = attention_refusal(plan, softcap=kwargs.get("softcap"),
                               dropout=kwargs.get("dropout", kwargs.get("dropout_p", 0.0)))
    if why is not None:
        return why  # softcapping, dropout > 0
    if any(kwargs.get(name) is False for name in ("causal", "is_causal")):
        return "non-causal attention (causal=False) is not supported"
    left = (kwargs.get("window_size") or (-1, -1))[0]  # flash-attn's (left, right); right is moot when causal
    if left >= 0 and window_cuts(left + 1, plan):
        return f"window_size={kwargs['window_size']} is not supported"
    if kwargs.get("alibi_slopes") is not None:
        return "ALiBi slopes are not supported"
    return None


def _positions(mask: torch.Tensor) -> torch.Tensor:
    return _core.mask_positions(mask)


def _scatter_rows(values: torch.Tensor, positions: torch.Tensor, rows: int, width: int) -> torch.Tensor:
    """``[rows, width, ...]`` zeros with ``values [N, ...]`` at flat ``positions`` (differentiable)."""
    out = values.new_zeros((rows * width, *values.shape[1:]))
    return out.index_copy(0, positions, values).view(rows, width, *values.shape[1:])


class PrefixGrouper:
    """Drop-in for ``prefix_grouper.PrefixGrouper``; see the module docstring."""

    def __init__(self, group_info: Optional[List[List[int]]] = None, device=None, padding_mode: PaddingMode = "right"):
        if group_info is not None:
            self.init(group_info, device, padding_mode)

    def init(self, group_info: List[List[int]], device=None, padding_mode: PaddingMode = "right") -> None:
        if not isinstance(group_info, (list, tuple)) or not group_info:
            raise ValueError("group_info: expected a non-empty list of [prefix_len, *suffix_lens]")
        # As the original: lists or tuples of lengths, or Info objects (another grouper's group_info).
        group_info = [[g.prefix_len, *g.suffix_lens] if isinstance(g, Info) else g for g in group_info]
        if any(not isinstance(g, (list, tuple)) or len(g) < 2 for g in group_info):
            raise ValueError("group_info: every group needs a prefix length and at least one suffix length")
        group_info = [[_length(n, group_info) for n in g] for g in group_info]
        # The grouped layout's segment tables are int32: a group's sequence and the whole stream must fit.
        if sum(sum(g) for g in group_info) > _MAX_TOKENS:
            raise ValueError(f"group_info: more than {_MAX_TOKENS} tokens in all (the segment tables are int32)")
        self.group_info = [Info(g[0], list(g[1:])) for g in group_info]
        if isinstance(padding_mode, torch.Tensor):
            mask, left = padding_mode, False
            device = device if device is not None else padding_mode.device
        elif padding_mode in ("left", "right"):
            mask, left = None, padding_mode == "left"
        else:
            raise ValueError(f"padding_mode: expected 'left', 'right' or a mask tensor, got {padding_mode!r}")
        self._args = (
            [g.prefix_len for g in self.group_info],
            [s for g in self.group_info for s in g.suffix_lens],
            [g.num_samples for g in self.group_info],
        )
        self._padding = (mask, left)
        self._layouts: dict = {}
        self.device = torch.device(device if device is not None else "cpu")
        self._use(self.device)

    def _use(self, device: torch.device) -> None:
        """Select (planning once per device) the layout for tensors on ``device``; like the original, inputs may
        live on another device than the one given at construction."""
        device = torch.device(device)
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        if device not in self._layouts:
            mask, left = self._padding
            handle, info, idx, dims = _core.make_compat_plan(*self._args, str(device), mask, left)
            packed = torch.cat([idx["grouped_prefix"], idx["grouped_suffix"]])
            self._layouts[device] = (Plan(handle, info), idx, packed, dims)
        self._plan, self._idx, self._packed, (self._width, self._max_prefix, self._max_suffix) = self._layouts[device]

    @classmethod
    def from_ungrouped_masks(
        cls,
        prefix_mask: torch.Tensor,
        suffix_mask: torch.Tensor,
        group_sizes: Union[int, List[int]],
        device=None,
        padding_mode: PaddingMode = "right",
    ) -> "PrefixGrouper":
        """Build from one prefix mask row per group and one suffix mask row per sample."""
        if prefix_mask.dim() != 2 or suffix_mask.dim() != 2:
            raise ValueError("prefix_mask, suffix_mask: masks must be 2-D [rows, seq]")
        groups, samples = prefix_mask.shape[0], suffix_mask.shape[0]
        if isinstance(group_sizes, int) and not isinstance(group_sizes, bool):
            if group_sizes * groups != samples:
                raise ValueError(f"group_sizes: {group_sizes} x {groups} prefixes != {samples} suffix rows")
            group_sizes = [group_sizes] * groups
        elif isinstance(group_sizes, (list, tuple)):
            if len(group_sizes) != groups or sum(group_sizes) != samples:
                raise ValueError(
                    f"group_sizes: expected {groups} sizes summing to {samples}, got {list(group_sizes)}"
                )
        else:
            raise ValueError(f"group_sizes: expected an int or a list of ints, got {type(group_sizes).__name__}")
        # Token counts of any mask dtype (float 1/0 attention masks too).
        prefix_lens = (prefix_mask != 0).sum(1).tolist()
        suffix_lens = (suffix_mask != 0).sum(1).tolist()
        if 0 in prefix_lens:
            raise ValueError(f"prefix_mask: row {prefix_lens.index(0)} has no valid token (every group needs a prefix "
                             "of at least one token)")
        info, at = [], 0
        for p, g in zip(prefix_lens, group_sizes):
            info.append([p, *suffix_lens[at : at + g]])
            at += g
        return cls(info, device=device if device is not None else prefix_mask.device, padding_mode=padding_mode)

    # -- layout ------------------------------------------------------------------------------------------------
    def _mask(self, positions: torch.Tensor, rows: int, width: int) -> torch.Tensor:
        return torch.zeros(rows * width, dtype=torch.bool, device=positions.device).index_fill(0, positions, True).view(
            rows, width
        )

    @property
    def padding_mask(self) -> torch.Tensor:
        """``[groups, seq]`` bool: True at real tokens of the grouped layout."""
        return self._idx["padding_mask"]

    @property
    def x_shape(self) -> torch.Size:
        return self.padding_mask.shape

    @property
    def prefix_lens(self) -> torch.Tensor:
        return torch.tensor([g.prefix_len for g in self.group_info], device=self.device)

    @property
    def num_samples(self) -> torch.Tensor:
        return torch.tensor([g.num_samples for g in self.group_info], device=self.device)

    @property
    def ungrouped_prefix_mask(self) -> torch.Tensor:
        return self._mask(self._idx["ungrouped_prefix"], len(self.group_info), self._max_prefix)

    @property
    def ungrouped_suffix_mask(self) -> torch.Tensor:
        return self._mask(self._idx["ungrouped_suffix"], self._idx["sample_group"].shape[0], self._max_suffix)

    @property
    def grouped_prefix_mask(self) -> torch.Tensor:
        return self._mask(self._idx["grouped_prefix"], len(self.group_info), self._width)

    @property
    def grouped_suffix_mask(self) -> torch.Tensor:
        return self._mask(self._idx["grouped_suffix"], len(self.group_info), self._width)

    # -- data movement -----------------------------------------------------------------------------------------
    def concat_input(
        self, prefix: torch.Tensor, prefix_mask: torch.Tensor, suffix: torch.Tensor, suffix_mask: torch.Tensor
    ) -> torch.Tensor:
        """Grouped ``[groups, seq, ...]`` from prefixes ``[groups, Lp, ...]`` and suffixes ``[samples, Ls, ...]``
        (ids or embeddings; valid tokens chosen by the masks, any padding). Differentiable."""
        if prefix.dim() < 2 or prefix.dim() != suffix.dim():
            raise ValueError(
                f"prefix, suffix: expected [b, seq, ...] with equal ndim, got {prefix.dim()}, {suffix.dim()}")
        if prefix_mask.shape != prefix.shape[:2] or suffix_mask.shape != suffix.shape[:2]:
            raise ValueError("prefix_mask, suffix_mask: must match the first two dims of prefix and suffix")
        self._use(prefix.device)
        # Per row, not only in total: equal totals with rows off by some tokens would move tokens between groups.
        for name, mask, want in (("prefix_mask", prefix_mask, [g.prefix_len for g in self.group_info]),
                                 ("suffix_mask", suffix_mask, [n for g in self.group_info for n in g.suffix_lens])):
            got = mask.sum(1).tolist()
            if got != want:
                raise ValueError(f"{name}: valid tokens per row {got} differ from group_info's {want}")
        src_p, src_s = _positions(prefix_mask.to(prefix.device)), _positions(suffix_mask.to(prefix.device))
        rest = prefix.shape[2:]
        values = torch.cat(
            [
                prefix.reshape(-1, *rest).index_select(0, src_p),
                suffix.reshape(-1, *rest).index_select(0, src_s).to(prefix.dtype),
            ]
        )
        return _scatter_rows(values, self._packed, len(self.group_info), self._width)

    def split_output(self, output: torch.Tensor, include_prefix_last: int = 0):
        """``(prefix_output, prefix_mask, suffix_output, suffix_mask)``: prefixes ``[groups, P, ...]`` left-padded,
        suffixes ``[samples, S, ...]`` right-padded. With ``include_prefix_last = k`` the last k prefix positions
        move to the front of every suffix of the group (k = 1: the row that predicts the first suffix token)."""
        if include_prefix_last < 0:
            raise ValueError(f"include_prefix_last: must be >= 0, got {include_prefix_last}")
        if output.dim() < 2 or tuple(output.shape[:2]) != tuple(self.padding_mask.shape):
            raise ValueError(f"output: expected leading shape {tuple(self.x_shape)}, got {tuple(output.shape)}")
        self._use(output.device)
        flat = output.reshape(-1, *output.shape[2:])
        groups, samples = len(self.group_info), self._idx["sample_group"].shape[0]
        prefix_out = _scatter_rows(
            flat.index_select(0, self._idx["grouped_prefix"]), self._idx["ungrouped_prefix"], groups, self._max_prefix
        )
        suffix_out = _scatter_rows(
            flat.index_select(0, self._idx["grouped_suffix"]), self._idx["ungrouped_suffix"], samples, self._max_suffix
        )
        prefix_mask, suffix_mask = self.ungrouped_prefix_mask, self.ungrouped_suffix_mask
        k = include_prefix_last
        if k > 0:
            per_sample = self._idx["sample_group"]
            suffix_out = torch.cat([prefix_out[:, -k:].index_select(0, per_sample), suffix_out], dim=1)
            suffix_mask = torch.cat([prefix_mask[:, -k:].index_select(0, per_sample), suffix_mask], dim=1)
            prefix_out, prefix_mask = prefix_out[:, :-k], prefix_mask[:, :-k]
        return prefix_out, prefix_mask, suffix_out, suffix_mask

    @staticmethod
    def convert_padding(x: torch.Tensor, x_mask: torch.Tensor, padding_mode: PaddingMode = "right") -> torch.Tensor:
        """Re-pad ``x [b, seq, ...]`` (valid tokens by ``x_mask``) to ``[b, max_len, ...]`` padded ``"left"``,
        ``"right"`` or as a given mask. Differentiable."""
        if x.dim() < 2 or x_mask.dim() != 2 or x_mask.shape != x.shape[:2]:
            raise ValueError("x_mask: expected a 2-D mask matching the first two dims of x")
        lens = x_mask.sum(1)
        if isinstance(padding_mode, torch.Tensor):
            target = padding_mode.to(device=x.device, dtype=torch.bool)
            if target.dim() != 2 or target.shape[0] != x.shape[0] or not torch.equal(target.sum(1), lens):
                raise ValueError("padding_mode: the mask's token counts differ from x_mask's")
        elif padding_mode in ("left", "right"):
            width = int(lens.max()) if lens.numel() else 0
            cols = torch.arange(width, device=x.device)
            target = cols >= (width - lens)[:, None] if padding_mode == "left" else cols < lens[:, None]
        else:
            raise ValueError(f"padding_mode: expected 'left', 'right' or a mask tensor, got {padding_mode!r}")
        values = x.reshape(-1, *x.shape[2:]).index_select(0, _positions(x_mask))
        return _scatter_rows(values, _positions(target), target.shape[0], target.shape[1])

    # -- attention ---------------------------------------------------------------------------------------------
    def forward(self, attn_func: Any, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *args, **kwargs):
        """Shared-prefix attention on the grouped layout: q/k/v ``[groups, heads, seq, dim]`` → ``[groups, seq,
        heads, dim]`` (0 at padding). Runs our exact attention; ``attn_func`` and positional extras are ignored
        (a ``scale``, ``softmax_scale`` or ``scaling`` keyword sets the softmax scale, default ``dim ** -0.5``;
        ``sinks`` or ``s_aux``, a ``[heads]`` tensor, adds GPT-OSS's attention-sink logits). Keywords asking for
        other attention (a sliding window shorter than a sequence, softcapping, dropout > 0, ``causal=False``,
        ALiBi) raise ``NotImplementedError``: the original would pass them to ``attn_func``."""
        scale = next((kwargs[n] for n in ("scale", "softmax_scale", "scaling") if kwargs.get(n) is not None), None)
        sinks = kwargs.get("sinks", kwargs.get("s_aux"))
        self._use(q.device)
        why = _forward_refusal(self._plan, kwargs)
        if why is not None:
            raise NotImplementedError(f"shared_prefix.compat: {why}")
        for name, x in (("q", q), ("k", k), ("v", v)):
            if not isinstance(x, torch.Tensor) or x.dim() != 4 or tuple(x.shape[::2]) != tuple(self.x_shape):
                got = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
                raise ValueError(f"{name}: expected [{self.x_shape[0]}, heads, {self.x_shape[1]}, dim] for this "
                                 f"group_info, got {got}")
        b, _, seq, _ = q.shape

        def packed(x):
            return x.transpose(1, 2).reshape(b * seq, x.shape[1], x.shape[3]).index_select(0, self._packed)

        out = attention(packed(q), packed(k), packed(v), self._plan, scale=scale, sinks=sinks)
        return _scatter_rows(out, self._packed, b, seq)


def _transformers_attention(module, query, key, value, attention_mask, *args, prefix_grouper=None, **kwargs):
    """The original's ``"prefix_grouper_attention"`` entry, on our executor: models called with
    ``prefix_grouper=pg`` (a compat ``PrefixGrouper``) run exact shared-prefix attention; ``attention_mask`` and
    ``prefix_grouper_attn_func`` are ignored, as the attention is ours."""
    from .hf.support import layer_refusal

    if not isinstance(prefix_grouper, PrefixGrouper):
        raise TypeError(
            f"prefix_grouper: expected a shared_prefix.compat.PrefixGrouper, got {type(prefix_grouper).__name__}"
        )
    kwargs.pop("prefix_grouper_attn_func", None)
    dropout = kwargs.pop("dropout", args[0] if len(args) > 0 else 0.0)
    scaling = kwargs.pop("scaling", args[1] if len(args) > 1 else None)
    prefix_grouper._use(query.device)
    why, _ = layer_refusal(module, prefix_grouper._plan, dropout, kwargs)
    if why is not None:
        raise NotImplementedError(f"shared_prefix.compat ({type(module).__name__}): {why}")
    return prefix_grouper.forward(None, query, key, value, scale=scaling, sinks=kwargs.get("s_aux")), None


def register_attention() -> None:
    """Drop-in for ``prefix_grouper.utils.register_transformers.register_attention``: registers
    ``"prefix_grouper_attention"`` in transformers' ``AttentionInterface`` on our executor. Idempotent."""
    from transformers import AttentionInterface

    AttentionInterface.register(ATTENTION_NAME, _transformers_attention)
