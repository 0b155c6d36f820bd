"""What a plan cannot compute exactly, and the error that says so. No transformers import: the compat layer's
``PrefixGrouper.forward`` uses these rules too."""

from __future__ import annotations

from typing import Any, Optional

from ._plan import Plan


class UnsupportedModelError(NotImplementedError):
    """The model, or this micro-batch, cannot run shared-prefix attention exactly (the stock computation can).
    TRL's and verl's integrations catch it and fall back to the stock computation.

    ``per_batch``: the reason is this forward (its micro-batch's lengths, or the mode the model is in), not the
    model; another forward may run. Integrations remember only the other refusals, per model class."""

    def __init__(self, message: str, *, per_batch: bool = False):
        super().__init__(message)
        self.per_batch = per_batch


def window_cuts(window: Any, plan: Plan) -> bool:
    """Whether a sliding window of ``window`` tokens cuts some row of ``plan``: an int shorter than its longest row,
    the planner's rule (``planner::window_cuts``). A window the plan was made for is answered by the planner's own
    verdict, its key tables, without reading the plan's lengths (a compiled forward is then not specialized on
    them)."""
    if not isinstance(window, int) or isinstance(window, bool):
        return False
    if window in plan.made_for_windows:
        return window in plan.windows
    return window < plan.max_seqlen


def lacks_window_tables(window: Any, plan: Plan) -> bool:
    """Whether ``window`` cuts some row of ``plan`` and the plan holds no key tables for it. The planner gives every
    window it was made for that cuts a row its tables, so only the others are looked at."""
    return window not in plan.made_for_windows and window_cuts(window, plan)


def missing_window(window: int, plan: Plan) -> str:
    return (f"sliding_window={window} is shorter than the longest sequence ({plan.max_seqlen} tokens) and the plan "
            f"was made without it (shared_prefix.plan(..., windows=[{window}]))")


def attention_refusal(plan: Plan, *, window: Any = None, softcap: Any = None,
                      dropout: Optional[float] = 0.0) -> "tuple[Optional[str], bool]":
    """Why one attention call with these settings cannot take ``plan`` exactly (None if it can), and whether the
    reason belongs to this forward (the micro-batch's lengths; dropout, which train mode applies and eval mode
    does not) rather than to the model."""
    if lacks_window_tables(window, plan):
        return missing_window(window, plan), True
    if softcap is not None:
        return "attention logit softcapping is not supported", False
    if dropout and dropout > 0:
        return f"attention dropout ({dropout}) in train mode is not supported; set attention_dropout=0", True
    return None, False
