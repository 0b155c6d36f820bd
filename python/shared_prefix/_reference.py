"""The stock computation the trainers run today (TRL-style), used as the baseline by the demo and the bench.

Each row is ``[prompt, completion]`` in a padded batch (prompts left-padded, completions right-padded), so every
prompt is forwarded once per completion. Logits are computed only at completion positions, as TRL does.
"""

from __future__ import annotations

import torch

from ._logprobs import token_logprobs


def stock_logprobs(
    model: torch.nn.Module,
    prompt_ids: torch.Tensor,
    prompt_mask: torch.Tensor,
    completion_ids: torch.Tensor,
    completion_mask: torch.Tensor,
    *,
    temperature: float = 1.0,
) -> torch.Tensor:
    """``[B, Lc]`` log-probs of the completion tokens, 0 at padding, through the model's current attention.

    Prompts must be left-padded (as TRL builds them): the last prompt column predicts the first completion token.
    """
    if not bool(prompt_mask[:, -1].all()):
        raise ValueError("prompt_mask: the stock baseline expects left-padded prompts")
    ids = torch.cat([prompt_ids, completion_ids], dim=1)
    mask = torch.cat([prompt_mask, completion_mask], dim=1).long()
    # Positions count valid tokens only, so a left-padded row sees the same positions as the row alone.
    position_ids = (mask.cumsum(-1) - 1).clamp_min(0)
    lc = completion_ids.shape[1]
    hidden = model.get_decoder()(input_ids=ids, attention_mask=mask, position_ids=position_ids, use_cache=False)
    # Rows predicting completion tokens: the last prompt position and the completion positions but the last.
    h = hidden.last_hidden_state[:, -lc - 1 : -1]
    logits = model.get_output_embeddings()(h)
    logp, _ = token_logprobs(logits, completion_ids, temperature, False)
    return logp * completion_mask
