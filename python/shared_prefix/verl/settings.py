"""What the verl plugin's parts share: whether it is on in this process, the supported verl versions, and the
record of why micro-batches went to the stock path."""

from __future__ import annotations

import os

from ..hf.pipeline import StockFallbacks

SUPPORTED_VERL = (">=0.9", "<0.10")
_state = {"enabled": os.environ.get("SHARED_PREFIX_VERL", "") not in ("", "0")}
fallbacks = StockFallbacks("shared_prefix.verl: stock log-probs")


def enable(on: bool = True) -> None:
    """Switch the plugin on (or off) in this process, as ``use_prefix_grouper=True`` does."""
    _state["enabled"] = bool(on)


def enabled() -> bool:
    return _state["enabled"]


def watch_actor_config() -> None:
    """``actor_rollout_ref.actor.use_prefix_grouper=True`` switches the plugin on in a worker when verl builds the
    actor config from it (the flag verl 0.9 keeps in its config but its engine workers no longer read)."""
    try:
        from verl.workers.config import actor as actor_cfg
    except ImportError:
        return
    for name in ("ActorConfig", "FSDPActorConfig"):
        klass = getattr(actor_cfg, name, None)
        post = getattr(klass, "__post_init__", None)
        if post is None or getattr(post, "_shared_prefix", False):
            continue

        def wrapped(self, _post=post):
            _post(self)
            if getattr(self, "use_prefix_grouper", False):
                enable(True)

        wrapped._shared_prefix = True
        klass.__post_init__ = wrapped


def trainer_classes() -> list:
    """verl's PPO trainers that this verl has, as ``(module, class)``: the v1 trainer (``trainer.use_v1``, the
    default) and the legacy one."""
    import importlib

    found = []
    for module, name in (("verl.trainer.ppo.v1.trainer_base", "PPOTrainer"),
                         ("verl.trainer.ppo.ray_trainer", "RayPPOTrainer")):
        try:
            mod = importlib.import_module(module)
            found.append((mod, getattr(mod, name)))
        except (ImportError, AttributeError):
            continue
    return found
