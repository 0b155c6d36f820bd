"""verl beside TRL in one environment.

verl 0.9.1's ``apply_monkey_patch`` (``verl/models/transformers/monkey_patch.py``), run on every model the engine
builds, imports TRL's ``AutoModelForCausalLMWithValueHead`` whenever TRL is importable, to patch that class's
``state_dict``. TRL 1.16 has no such class, so with both installed verl's model build raises ``ImportError``.
"""

from __future__ import annotations


def install() -> None:
    """Wrap that module's ``is_trl_available`` to also ask whether TRL has the class: with TRL 1.16 the patch of a
    class that does not exist is skipped, and an older TRL is patched as before. Idempotent."""
    try:
        from verl.models.transformers import monkey_patch
    except ImportError:
        return
    stock = monkey_patch.is_trl_available
    if getattr(stock, "_shared_prefix", False):
        return

    def is_trl_available() -> bool:
        if not stock():
            return False
        import importlib
        import warnings

        for module in ("trl", "trl.experimental.ppo"):  # where verl looks, the stable one first
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")  # TRL warns on importing its experimental package
                    if hasattr(importlib.import_module(module), "AutoModelForCausalLMWithValueHead"):
                        return True
            except ImportError:
                continue
        return False

    is_trl_available._shared_prefix = True
    monkey_patch.is_trl_available = is_trl_available
