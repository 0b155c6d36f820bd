"""Which settings of a verl trainer config keep prompt sharing off or reduce it, and what to change.

Run at trainer start when the plugin is on (the report is logged once), or by hand on a config::

    python -m shared_prefix.verl check actor_rollout_ref.rollout.n=8 actor_rollout_ref.actor.use_dynamic_bsz=True ...
    python -m shared_prefix.verl check outputs/2026-12-07/12-00-00/.hydra/config.yaml

The first form composes verl's own ``ppo_trainer.yaml`` with the overrides, as ``python -m verl.trainer.main_ppo``
does; the second reads a whole config (the one Hydra saves with every run).
"""

from __future__ import annotations

import dataclasses
import logging
import sys
from typing import Optional, Sequence

logger = logging.getLogger("shared_prefix")
PLUGIN = "shared_prefix.verl"


@dataclasses.dataclass(frozen=True)
class Finding:
    """One setting and what it does to sharing: ``off`` (the stock path runs), or ``reduced``."""

    setting: str
    value: object
    effect: str
    change: str

    def __str__(self) -> str:
        return f"{self.setting}={self.value!r}: {self.effect}; {self.change}"


def _get(cfg, path: str, default=None):
    node = cfg
    for part in path.split("."):
        try:
            node = node[part] if part in node else None
        except TypeError:
            return default
        if node is None:
            return default
    return node


def findings(cfg, *, plugin_enabled: Optional[bool] = None) -> list:
    """What in ``cfg`` (a verl trainer config: OmegaConf or nested dicts) keeps sharing off or reduces it.
    ``plugin_enabled``: whether the plugin is on in this process (None: judge by the config alone)."""
    out = []
    actor, rollout, ref = (f"actor_rollout_ref.{k}" for k in ("actor", "rollout", "ref"))
    n = int(_get(cfg, f"{rollout}.n", 1) or 1)
    if _get(cfg, "actor_rollout_ref.model.external_lib") not in (PLUGIN, [PLUGIN]):
        out.append(Finding("actor_rollout_ref.model.external_lib", _get(cfg, "actor_rollout_ref.model.external_lib"),
                           "off: verl's workers never load the plugin", f"set it to {PLUGIN}"))
    if not _get(cfg, f"{actor}.use_prefix_grouper", False) and not plugin_enabled:
        out.append(Finding(f"{actor}.use_prefix_grouper", False, "off: the plugin is loaded but not switched on",
                           "set it to True (or SHARED_PREFIX_VERL=1 in the workers' environment)"))
    if n < 2:
        out.append(Finding(f"{rollout}.n", n, "off: one response per prompt shares nothing", "sample n ≥ 2"))
    sp = int(_get(cfg, f"{actor}.ulysses_sequence_parallel_size", 1) or 1)
    attn = _get(cfg, "actor_rollout_ref.model.override_config.attn_implementation")
    if attn == "eager":
        out.append(Finding("actor_rollout_ref.model.override_config.attn_implementation", attn,
                           "off: eager attention cannot take a plan", "use flash_attention_2 (verl's default) or sdpa"))
    if _get(cfg, f"{actor}.calculate_sum_pi_squared", False):
        out.append(Finding(f"{actor}.calculate_sum_pi_squared", True, "off: the stock path computes Σπ²",
                           "set it to False"))
    if _get(cfg, "distillation.distillation_loss.loss_settings.use_topk", False):
        out.append(Finding("distillation.distillation_loss.loss_settings.use_topk", True,
                           "off: top-k distillation takes the stock path", "set it to False"))
    if _get(cfg, f"{actor}.shuffle", False):
        out.append(Finding(f"{actor}.shuffle", True, "reduced: mini-batches shuffle rows, splitting groups",
                           "set it to False"))
    if _get(cfg, f"{actor}.use_dynamic_bsz", False):
        budget = _get(cfg, f"{actor}.ppo_max_token_len_per_gpu")
        longest = (_get(cfg, "data.max_prompt_length", 0) or 0) + n * (_get(cfg, "data.max_response_length", 0) or 0)
        if budget and longest and int(budget) * sp < longest:
            out.append(Finding(f"{actor}.ppo_max_token_len_per_gpu", budget,
                               f"reduced: a group of n={n} at the data's maximum lengths packs to {longest} tokens "
                               "and is split into sub-groups (each still sharing its prompt)",
                               f"raise it to {-(-longest // sp)} to keep every group whole"))
    else:  # fixed micro-batches are cut at group boundaries: only one smaller than a group must split it
        for path, what in ((f"{actor}.ppo_micro_batch_size_per_gpu", "the update"),
                           (f"{rollout}.log_prob_micro_batch_size_per_gpu", "the old log-probs"),
                           (f"{ref}.log_prob_micro_batch_size_per_gpu", "the reference log-probs")):
            size = _get(cfg, path)
            if size and int(size) < n:
                out.append(Finding(path, size, f"reduced: micro-batches of {what} are smaller than a group of n={n}",
                                   f"use at least {n}, or use_dynamic_bsz=True (micro-batches of whole groups)"))
    return out


def report(cfg, *, plugin_enabled: Optional[bool] = None) -> str:
    items = findings(cfg, plugin_enabled=plugin_enabled)
    if not items:
        return "shared_prefix.verl: every setting keeps prompt sharing on"
    return "shared_prefix.verl: settings that keep prompt sharing off or reduce it:\n" + "\n".join(
        f"  - {f}" for f in items)


def install() -> None:
    """Log :func:`report` once when a trainer starts (``fit``) with the plugin on. Idempotent."""
    from .settings import trainer_classes

    for _, cls in trainer_classes():
        stock = cls.fit
        if getattr(stock, "_shared_prefix", False):
            continue

        def fit(self, *args, _stock=stock, **kwargs):
            from .settings import enabled

            wanted = enabled() or bool(_get(self.config, "actor_rollout_ref.actor.use_prefix_grouper", False))
            if wanted and not getattr(self, "_shared_prefix_checked", False):
                self._shared_prefix_checked = True
                logger.warning("%s", report(self.config, plugin_enabled=True))
            return _stock(self, *args, **kwargs)

        fit._shared_prefix = True
        cls.fit = fit


def load(args: Sequence[str]):
    """A whole config (one ``.yaml`` path), or verl's ``ppo_trainer.yaml`` composed with Hydra overrides."""
    import os

    from omegaconf import OmegaConf

    if len(args) == 1 and str(args[0]).endswith((".yaml", ".yml")):
        return OmegaConf.load(args[0])
    import verl
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=os.path.join(os.path.dirname(verl.__file__), "trainer", "config"),
                               version_base=None):
        return compose("ppo_trainer", overrides=list(args))


def main(argv: Optional[Sequence[str]] = None) -> int:
    import argparse

    ap = argparse.ArgumentParser(prog="python -m shared_prefix.verl check", description=__doc__.split("\n\n")[0])
    ap.add_argument("config", nargs="*", help="a config .yaml, or key=value overrides of verl's ppo_trainer.yaml")
    args = ap.parse_args(argv)
    print(report(load(args.config)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
