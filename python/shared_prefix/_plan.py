"""The plan: how one micro-batch packs into a single shared-prefix stream.

All indices come from the Rust planner in one pass on the host, with one device→host read of the masks and one
host→device copy of the index tensors. Nothing here loops over rows or tokens in Python.
"""

from __future__ import annotations

import functools
import itertools
import numbers
from typing import Hashable, NamedTuple, Optional, Sequence, Union

import torch

from . import _core

class Node(NamedTuple):
    """One node of a plan's prefix tree: a run of ``tokens`` packed tokens from ``start`` on that ``rows`` input rows
    share, below node ``parent`` (-1 for a root). Nodes are listed in stream order, level by level."""

    start: int
    tokens: int
    rows: int
    parent: int


# Integer dtypes that every op on ids (gathers, embeddings) takes; not uint16/32/64 or quantized ones.
_ID_KINDS = (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8)


def _check_ids(name: str, t: object) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in _ID_KINDS:
        raise TypeError(f"{name}: expected an integer tensor of token ids (int64, int32, ...), got {t.dtype}")
    if t.device.type not in ("cpu", "cuda"):
        raise ValueError(f"{name}: expected a cpu or cuda tensor, got one on {t.device}")
    if t.dim() != 2:
        raise ValueError(f"{name}: expected a 2-D [B, L] tensor, got shape {tuple(t.shape)}")
    return t


def _check_mask(name: str, t: object, like: torch.Tensor, like_name: str) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    if t.dtype.is_floating_point or t.dtype.is_complex:
        raise TypeError(f"{name}: expected a bool or integer mask, got {t.dtype}")
    if t.shape != like.shape:
        raise ValueError(f"{name}: shape {tuple(t.shape)} differs from {like_name}'s {tuple(like.shape)}")
    if t.device != like.device:
        raise ValueError(f"{name}: is on {t.device} but {like_name} is on {like.device}")
    return t


# The prefix tree's defaults (see :func:`set_prefix_tree`).
_TREE = {"max_depth": 4, "min_node_tokens": 32}


def set_prefix_tree(*, max_depth: Optional[int] = None, min_node_tokens: Optional[int] = None) -> dict:
    """Set how plans made afterwards share prefixes when their caller does not say; returns the previous settings.

    ``max_depth``: levels of shared nodes a row's path may cross below its first; 1 shares whole prompts only (one
    node per prompt group, then each row's completion), larger values share every common prefix of whole rows
    (system prompts, tree rollouts, earlier turns) up to that depth. ``min_node_tokens``: a shared run shorter than
    this is not a node of its own: its tokens go to each of its children, so that a short common header costs no
    attention calls."""
    previous = dict(_TREE)
    if max_depth is not None:
        _TREE["max_depth"] = _positive("max_depth", max_depth)
    if min_node_tokens is not None:
        _TREE["min_node_tokens"] = _positive("min_node_tokens", min_node_tokens)
    return previous


def _positive(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(f"{name}: expected a positive int, got {value!r}")
    return int(value)


class Plan:
    """One micro-batch packed as a stream of shared nodes, level by level: with whole prompts shared,
    ``[prompt_0 | … | prompt_{n-1} | completions of group 0 | …]``; with a prefix tree, every common prefix once.

    Make it with :func:`shared_prefix.plan`. A value: immutable, with no state of any forward, so one plan serves
    every layer, forward and backward, and every forward of its micro-batch (policy, old and reference log-probs).
    """

    __slots__ = ("handle", "_rows", "_lp", "_lc", "_src", "_scored", "_scored_tail", "_predictor", "_completion_flat",
                 "_entry_scored", "num_tokens", "stock_tokens", "by_prompt_tokens", "prefix_tokens", "completion_tokens",
                 "max_seqlen", "min_seqlen", "levels", "_windows", "_made_for_windows", "_group_sizes", "_row_group",
                 "_node_rows", "_node_tokens", "_node_parent", "position_ids", "input_ids", "attention_mask")

    #: Tokens in the packed stream: each shared prefix once, then every token no other row shares.
    num_tokens: int
    #: Tokens the stock per-row computation forwards (each row's prompt and completion).
    stock_tokens: int
    #: Tokens a plan sharing whole prompts only (``max_depth=1``) packs: what the prefix tree saves beyond that.
    by_prompt_tokens: int
    #: Packed tokens taken from the prompts and from the completions. Every completion token is some row's scored
    #: token; with whole prompts shared they are the stream's last ``completion_tokens``.
    prefix_tokens: int
    completion_tokens: int
    #: Levels of nodes: 2 when whole prompts are shared (prompts, then completions), up to ``max_depth + 1``.
    levels: int
    #: Longest and shortest per-row sequence (prompt + completion) of the stock computation.
    max_seqlen: int
    min_seqlen: int
    #: The plan as the attention ops take it: one int64 on the host naming the plan's tables on its device (the
    #: Rust planner's), whose storage keeps them alive. A tensor, so compiled graphs take each new plan as an input.
    handle: torch.Tensor
    #: ``[1, T]`` position ids: each completion's positions continue from its prompt's length.
    position_ids: torch.Tensor
    #: ``[1, T]`` packed token ids (plans made for attention alone have none), and an all-ones ``[1, T]`` mask: with
    #: it transformers skips its packed-sequence detection (a host sync) and never builds a dense mask.
    input_ids: Optional[torch.Tensor]
    attention_mask: Optional[torch.Tensor]

    def __init__(self, handle: torch.Tensor, info: dict, input_ids: Optional[tuple] = None):
        put = functools.partial(object.__setattr__, self)
        put("handle", handle)
        put("_rows", info["rows"])
        put("_lp", info["prompt_width"])
        put("_lc", info["completion_width"])
        for name in ("num_tokens", "stock_tokens", "by_prompt_tokens", "prefix_tokens", "completion_tokens",
                     "max_seqlen", "min_seqlen", "levels"):
            put(name, info[name])
        for name in ("windows", "made_for_windows", "group_sizes", "row_group", "node_rows", "node_tokens",
                     "node_parent"):
            put("_" + name, tuple(info[name]))
        # Packing: (prompt rows, completion rows) to gather and concatenate, or one gather from both.
        put("_src", tuple(info["src_gathers"]))
        put("_scored", info["scored"])
        put("_scored_tail", info["scored_tail"])
        put("_predictor", info["predictor"])
        put("_completion_flat", info["completion_flat"])
        put("_entry_scored", info["entry_scored"] if info["entry_scored"].numel() else None)
        put("position_ids", info["position_ids"].unsqueeze(0))
        packed = None if input_ids is None else self.pack(input_ids[0], input_ids[1])
        put("input_ids", packed)
        put("attention_mask", None if packed is None else torch.ones_like(packed, dtype=torch.bool))

    def __setattr__(self, name, value):
        raise AttributeError(f"shared_prefix.Plan is immutable (cannot set {name!r})")

    def __delattr__(self, name):
        raise AttributeError(f"shared_prefix.Plan is immutable (cannot delete {name!r})")

    def __copy__(self):
        return self  # immutable: a copy would be the same value

    def __deepcopy__(self, memo):
        return self

    @property
    def windows(self) -> list:
        """Sliding windows (shorter than ``max_seqlen``) this plan holds key tables for."""
        return list(self._windows)

    @property
    def made_for_windows(self) -> tuple:
        """The sliding windows the plan was made for (``plan(..., windows=)``), sorted: those among them that cut
        some row are :attr:`windows`."""
        return self._made_for_windows

    @property
    def group_sizes(self) -> list:
        """Group sizes in plan order."""
        return list(self._group_sizes)

    @property
    def row_group(self) -> list:
        """Plan-order group index of every input row."""
        return list(self._row_group)

    @property
    def nodes(self) -> list:
        """The prefix tree: every :class:`Node` in stream order, roots first (sharing whole prompts, the roots are
        the prompts)."""
        starts = itertools.accumulate(self._node_tokens, initial=0)
        return [Node(*n) for n in zip(starts, self._node_tokens, self._node_rows, self._node_parent)]

    @property
    def input_shapes(self) -> tuple:
        """The shapes of the prompt and completion tensors the plan was made for: ``((B, Lp), (B, Lc))``."""
        return (self._rows, self._lp), (self._rows, self._lc)

    @property
    def device(self) -> torch.device:
        return self.position_ids.device

    @property
    def auto_kernels(self) -> dict:
        """The kernel of each attention call of this plan under the CUDA fp16/bf16 default (``kernels="auto"``):
        ``"cudnn"`` or ``"flash"`` (flash-attention 2) per call, in the executor's order. cuDNN takes a call that is
        one dense batch of at least 8192 keys whose shape recurred in enough earlier plans (:func:`cudnn_after`),
        as decided when this plan was made. Full-attention layers only: sliding-window layers always run
        flash-attention 2. The self-call mode is read when this is asked."""
        return dict(_core.auto_kernels(self.handle))

    def token_weights(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """``[T]``: how many rows each packed token stands for (the rows that hold it). A mean over every row's
        tokens, as the stock computation takes it (a MoE load-balancing loss), is the packed tokens' mean with
        these weights."""
        rows = torch.tensor(self._node_rows, dtype=dtype)
        return rows.repeat_interleave(torch.tensor(self._node_tokens), output_size=self.num_tokens).to(self.device)

    # -- per-token maps ----------------------------------------------------------------------------------------
    def pack(self, prompt_x: torch.Tensor, completion_x: torch.Tensor) -> torch.Tensor:
        """Pack per-token tensors ``[B, Lp, ...]`` and ``[B, Lc, ...]`` into ``[1, T, ...]`` (differentiable)."""
        b, lp, lc = self._rows, self._lp, self._lc
        if tuple(prompt_x.shape[:2]) != (b, lp):
            raise ValueError(f"prompt_x: expected leading shape ({b}, {lp}), got {tuple(prompt_x.shape)}")
        if tuple(completion_x.shape[:2]) != (b, lc):
            raise ValueError(f"completion_x: expected leading shape ({b}, {lc}), got {tuple(completion_x.shape)}")
        if prompt_x.shape[2:] != completion_x.shape[2:]:
            raise ValueError(
                f"completion_x: trailing shape {tuple(completion_x.shape[2:])} differs from prompt_x's "
                f"{tuple(prompt_x.shape[2:])}"
            )
        rest = prompt_x.shape[2:]
        prompts, completions = prompt_x.reshape(b * lp, *rest), completion_x.reshape(b * lc, *rest)
        if len(self._src) == 2:
            packed = torch.cat([prompts.index_select(0, self._src[0]), completions.index_select(0, self._src[1])])
        else:
            packed = torch.cat([prompts, completions]).index_select(0, self._src[0])
        return packed.unsqueeze(0)  # promoted as torch.cat promotes, nothing rounded

    def _packed_rows(self, x: torch.Tensor, name: str) -> torch.Tensor:
        h = x[0] if x.dim() >= 2 and x.shape[0] == 1 and x.shape[1] == self.num_tokens else x
        if h.shape[0] != self.num_tokens:
            raise ValueError(f"{name}: expected {self.num_tokens} packed rows, got shape {tuple(x.shape)}")
        return h

    def scored_rows(self, x: torch.Tensor) -> torch.Tensor:
        """The rows of a packed per-token tensor (``[1, T, ...]`` or ``[T, ...]``) at the completion tokens, in
        packed order: ``[Nc, ...]``, what :meth:`unpack_completions` takes."""
        h = self._packed_rows(x, "x")
        return h[self._scored_tail:] if self._scored_tail is not None else h.index_select(0, self._scored)

    @property
    def predictor_index(self) -> torch.Tensor:
        """``[Nc]``: for each completion token in packed order, the stream position that predicts it. As a causal
        LM's ``logits_to_keep`` it makes the model apply its head to exactly these rows."""
        return self._predictor

    def predictor_rows(self, hidden: torch.Tensor) -> torch.Tensor:
        """For each completion token in packed order, the row of ``hidden`` that predicts it: ``[Nc, ...]``."""
        return self._packed_rows(hidden, "hidden").index_select(0, self._predictor)

    def unpack_completions(self, values: torch.Tensor) -> torch.Tensor:
        """Per-completion-token values ``[Nc, ...]`` (packed order) as ``[B, Lc, ...]``, 0 at padding. A token
        that several rows share gives each of them its value (and, in backward, the sum of their gradients)."""
        if self._entry_scored is not None:
            values = values.index_select(0, self._entry_scored)
        out = values.new_zeros((self._rows * self._lc, *values.shape[1:]))
        return out.index_copy(0, self._completion_flat, values).view(self._rows, self._lc, *values.shape[1:])

    def predictors(self, hidden: torch.Tensor) -> torch.Tensor:
        """``[B, Lc, ...]``: for every completion token, the row of ``hidden`` (``[1, T, ...]`` or ``[T, ...]``)
        that predicts it (the previous token on its row). 0 at padding."""
        return self.unpack_completions(self.predictor_rows(hidden))

    def completion_targets(self) -> torch.Tensor:
        """Token ids of the completion tokens in packed order ``[Nc]``: a tensor of its own, never a view (so that a
        compiled forward taking it sees the same kind of tensor from every plan)."""
        targets = self.scored_rows(self.input_ids)
        return targets.clone() if targets._base is not None else targets

    def __repr__(self) -> str:
        return (
            f"Plan(rows={self._rows}, groups={len(self.group_sizes)}, tokens={self.num_tokens}, "
            f"stock_tokens={self.stock_tokens}, device={self.device})"
        )


def plan(
    prompt_ids: torch.Tensor,
    prompt_mask: torch.Tensor,
    completion_ids: torch.Tensor,
    completion_mask: torch.Tensor,
    *,
    group_sizes: Optional[Union[int, Sequence[int]]] = None,
    group_ids: Optional[Union[torch.Tensor, Sequence[Hashable]]] = None,
    windows: Optional[Sequence[int]] = None,
    max_depth: Optional[int] = None,
    min_node_tokens: Optional[int] = None,
) -> Plan:
    """Plan one micro-batch. See the README for the grouping rules.

    ``windows``: the sliding windows of the model's attention layers (transformers' ``sliding_window``), whose key
    tables the plan then holds (for windows shorter than its longest row; longer ones cut nothing). A window that
    cuts a row limits the plan to whole prompts (``max_depth=1``).

    ``max_depth``, ``min_node_tokens``: how far prefixes are shared (:func:`set_prefix_tree`, whose settings they
    default to)."""
    _check_ids("prompt_ids", prompt_ids)
    _check_mask("prompt_mask", prompt_mask, prompt_ids, "prompt_ids")
    _check_ids("completion_ids", completion_ids)
    _check_mask("completion_mask", completion_mask, completion_ids, "completion_ids")
    b = prompt_ids.shape[0]
    if completion_ids.shape[0] != b:
        raise ValueError(
            f"completion_ids: has {completion_ids.shape[0]} rows but prompt_ids has {b} (one completion per row)"
        )
    if completion_ids.device != prompt_ids.device:
        raise ValueError(f"completion_ids: is on {completion_ids.device} but prompt_ids is on {prompt_ids.device}")
    if group_sizes is not None and group_ids is not None:
        raise ValueError("group_sizes and group_ids: pass at most one")
    sizes = None
    if group_sizes is not None:
        if isinstance(group_sizes, bool) or not isinstance(group_sizes, (int, list, tuple)):
            raise TypeError(f"group_sizes: expected an int or a list of ints, got {type(group_sizes).__name__}")
        if isinstance(group_sizes, int):
            if group_sizes < 1 or b % group_sizes:
                raise ValueError(f"group_sizes: {group_sizes} does not divide the batch of {b} rows")
            sizes = [group_sizes] * (b // group_sizes)
        else:
            if not all(isinstance(s, int) and not isinstance(s, bool) for s in group_sizes):
                raise TypeError("group_sizes: every entry must be an int")
            if any(s < 1 for s in group_sizes):
                raise ValueError("group_sizes: every group size must be at least 1")
            if sum(group_sizes) != b:
                raise ValueError(f"group_sizes: sizes sum to {sum(group_sizes)} but the batch has {b} rows")
            sizes = list(group_sizes)
    if isinstance(group_ids, (list, tuple)) and any(isinstance(g, torch.Tensor) for g in group_ids):
        # Tensors hash by identity: 0-d ones become their values (a list of them would otherwise make every row
        # its own group).
        if not all(isinstance(g, torch.Tensor) and g.dim() == 0 for g in group_ids):
            raise TypeError("group_ids: a list of tensors must hold 0-d tensors only (one id per row)")
        group_ids = torch.stack(list(group_ids))
    if isinstance(group_ids, torch.Tensor) and (group_ids.dtype.is_floating_point or group_ids.dtype.is_complex):
        raise TypeError(f"group_ids: expected integer ids, got {group_ids.dtype}")
    if windows is not None:
        if not isinstance(windows, (list, tuple)) or not all(
                isinstance(w, numbers.Integral) and not isinstance(w, bool) and w >= 1 for w in windows):
            raise ValueError(f"windows: expected a list of positive ints (sliding windows in tokens), got {windows!r}")
        # Windows beyond any sequence the segment tables can hold cut nothing: clamp them into the planner's range.
        windows = [min(int(w), 2**31 - 1) for w in windows]
    depth = _TREE["max_depth"] if max_depth is None else _positive("max_depth", max_depth)
    min_node = _TREE["min_node_tokens"] if min_node_tokens is None else _positive("min_node_tokens", min_node_tokens)
    tree = None if depth == 1 else (depth, min_node)
    handle, info = _core.make_plan(prompt_ids, prompt_mask, completion_ids, completion_mask, sizes, group_ids, windows,
                                   tree)
    return Plan(handle, info, (prompt_ids, completion_ids))
