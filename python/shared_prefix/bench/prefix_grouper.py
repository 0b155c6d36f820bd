"""Completion log-probs through the original Prefix Grouper package (``pip install prefix-grouper``, arXiv 2506.05433).

A comparison baseline: it drives the package through its public API the way its README and verl 0.7 do
(``from_ungrouped_masks`` -> ``concat_input`` -> its transformers attention registration -> ``split_output``).
"""

from __future__ import annotations

from typing import Sequence

import torch

from shared_prefix._logprobs import token_logprobs

_PG_ATTENTION = "prefix_grouper_attention"  # the name prefix_grouper's register_attention() registers
_INNER = "shared_prefix_pg_sdpa"  # our kernel under it (see _sdpa_inner)


def _sdpa_inner(module, query, key, value, attention_mask, *args, **kwargs):
    """Adapter: the kernel the package's registration calls for the prefix and the suffix attention.

    The package hands the inner kernel its own 2D key-padding mask ``[b, k_len]`` and relies on flash_attention_2
    (its default) for causality aligned bottom-right (suffix queries see the whole prefix). With transformers 5.10,
    naming "sdpa" fails (the 2D mask does not broadcast; where it does, attention is not causal), "eager" is not in
    the registry, and flash-attn needs a GPU and fp16/bf16. So this builds the 4D bottom-right causal mask and
    calls transformers' sdpa.
    """
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    q_len, k_len = query.shape[2], key.shape[2]
    causal = torch.ones(q_len, k_len, dtype=torch.bool, device=query.device).tril(k_len - q_len)
    mask = causal & attention_mask.bool()[:, None, None, :]
    # Padded query rows see no key: softmax gives NaN, which poisons the backward. Let them see all keys; the
    # package drops their outputs when it regroups.
    mask = mask | ~mask.any(-1, keepdim=True)
    return sdpa_attention_forward(module, query, key, value, mask, *args, **kwargs)


def prefix_grouper_logprobs(
    model: torch.nn.Module,
    prompt_ids: torch.Tensor,
    prompt_mask: torch.Tensor,
    completion_ids: torch.Tensor,
    completion_mask: torch.Tensor,
    *,
    group_sizes: Sequence[int],
    temperature: float = 1.0,
    keep_attention_implementation: bool = False,
) -> torch.Tensor:
    """``[B, Lc]`` completion log-probs (``log_softmax(logits / temperature)`` at each token, 0 at padding).

    Rows come in consecutive groups of ``group_sizes`` rows sharing one prompt; each prompt is forwarded once by the
    Prefix Grouper package. Any prompt/completion padding works (the package packs by mask); the completion mask
    must be contiguous per row. fp32 result (fp64 for an fp64 model); gradients reach the parameters.

    With ``keep_attention_implementation`` the model is left on the package's attention, which gradient
    checkpointing needs (its recompute runs in backward); the caller restores it.
    """
    try:
        from prefix_grouper import PrefixGrouper
        from prefix_grouper.utils.register_transformers import register_attention
    except ImportError as e:
        raise ImportError(
            "prefix_grouper_logprobs needs the optional Prefix Grouper package: pip install prefix-grouper"
        ) from e
    from transformers import AttentionInterface

    from shared_prefix.hf import checkpointing_on

    sizes = [int(g) for g in group_sizes]
    if min(sizes, default=0) < 1 or sum(sizes) != completion_ids.shape[0]:
        raise ValueError(f"group_sizes: expected positive sizes summing to {completion_ids.shape[0]}, got {sizes}")
    checkpointing = checkpointing_on(model) and model.training and torch.is_grad_enabled()
    if checkpointing and not keep_attention_implementation:
        # The recompute in backward would run after the attention implementation is restored: wrong gradients.
        raise NotImplementedError(
            "prefix_grouper_logprobs: with gradient checkpointing, pass keep_attention_implementation=True"
        )
    register_attention()  # the package's transformers integration (idempotent)
    AttentionInterface.register(_INNER, _sdpa_inner)

    device = completion_ids.device
    c_mask = completion_mask.bool()
    # One prompt per group: its first row.
    first = torch.tensor([0, *sizes[:-1]], device=device).cumsum(0)
    p_ids, p_mask = prompt_ids[first], prompt_mask[first].bool()
    pg = PrefixGrouper.from_ungrouped_masks(p_mask, c_mask, sizes, device=device, padding_mode="right")
    input_ids = pg.concat_input(p_ids, p_mask, completion_ids, c_mask)
    # Positions (README): every completion continues from its prompt's length; concat_input packs them like the ids.
    p_len = torch.repeat_interleave(p_mask.sum(1), torch.tensor(sizes, device=device))
    position_ids = pg.concat_input(
        p_mask.long().cumsum(1) - 1, p_mask, c_mask.long().cumsum(1) - 1 + p_len[:, None], c_mask
    )

    previous = model.config._attn_implementation
    model.set_attn_implementation(_PG_ATTENTION)
    try:
        # The package's attention ignores attention_mask and builds its own from pg; pass it as verl does.
        hidden = model.get_decoder()(
            input_ids=input_ids,
            attention_mask=pg.padding_mask,
            position_ids=position_ids,
            use_cache=False,
            prefix_grouper=pg,
            prefix_grouper_attn_func=_INNER,
        ).last_hidden_state
    finally:
        if not keep_attention_implementation:
            model.set_attn_implementation(previous)

    # include_prefix_last=1 puts the last prompt position first in each suffix: it predicts the first completion
    # token. Split the hidden states (not logits) so the LM head runs only at predicting rows.
    _, _, suffix_h, suffix_mask = pg.split_output(hidden, include_prefix_last=1)
    rows = suffix_mask[:, 1:]  # [B, S] compact right-padded: row t predicts completion token t
    logits = model.get_output_embeddings()(suffix_h[:, :-1][rows])
    targets = pg.convert_padding(completion_ids, c_mask, padding_mode="right")[rows]
    picked, _ = token_logprobs(logits, targets, float(temperature), False)
    # Both masks list each row's tokens in order, so the compact values scatter back to the caller's layout.
    out = picked.new_zeros(completion_ids.shape)
    out[c_mask] = picked
    return out
