"""verl plugin: shared-prefix actor/ref log-probs for verl 0.9.x's FSDP engine, no verl fork.

Load it through verl's hook and switch it on with the existing flag::

    actor_rollout_ref.model.external_lib=shared_prefix.verl
    actor_rollout_ref.actor.use_prefix_grouper=True        # or: SHARED_PREFIX_VERL=1 in the workers' environment

Supported: verl >= 0.9, < 0.10. Importing it (verl imports ``external_lib`` in every process that builds the model
config, the trainer's included) installs, idempotently:

- ``engine``: the packed forward in ``FSDPEngineWithLMHead`` (FSDP1 and FSDP2, Ulysses sequence parallelism),
  log-probs and entropies in the engine's own layout, and the metrics ``shared_prefix/tokens_saved_frac``
  (against the stock engine's unpadded tokens; 0 for a micro-batch that took the stock path) and
  ``shared_prefix/tree_tokens_saved_frac`` per micro-batch, which verl logs under ``actor/``;
- ``batching``: micro-batches under ``use_dynamic_bsz`` that keep each ``uid`` group whole, sized by the tokens the
  packed forward computes, and data-parallel balancing (the v1 trainer's and the legacy trainer's
  ``_balance_batch``) that keeps groups on one rank;
- ``trl_value_head``: verl's model build with TRL 1.16 installed beside it;
- ``check``: a report of the settings that keep sharing off or reduce it (``python -m shared_prefix.verl check
  <config.yaml | overrides>``), logged once when the plugin is on.

Everything the plugin cannot pack falls back to verl's stock computation, the reason logged once.
"""

from __future__ import annotations

import logging

from ..hf.pipeline import version_refusal
from ..hf.registry import register
from .engine import _KEY, response_lengths  # noqa: F401  (the engine's state key and row lengths, for tools)
from .settings import SUPPORTED_VERL, _state, enable, enabled, fallbacks, watch_actor_config  # noqa: F401

__all__ = ["enable", "enabled", "fallbacks", "install", "SUPPORTED_VERL"]
logger = logging.getLogger("shared_prefix")


def install() -> bool:
    """Patch verl (idempotent). Returns False when verl is not installed or not a supported version."""
    try:
        import verl
        import verl.workers.engine.fsdp.transformer_impl as ti
        from verl.utils import tensordict_utils as tu
    except ImportError:
        return False
    why = version_refusal("verl", verl.__version__, SUPPORTED_VERL)
    if why is not None:
        logger.warning("shared_prefix.verl: not installed: %s", why)
        return False
    from . import batching, check, engine, trl_value_head

    register()
    engine.install(ti, tu)
    batching.install(ti, tu)
    trl_value_head.install()
    check.install()
    watch_actor_config()
    return True


install()
