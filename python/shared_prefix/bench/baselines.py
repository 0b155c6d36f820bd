"""What the bench and the demo compare ours against.

- :func:`stock_logprobs`: the stock computation the trainers run (TRL-style): each row ``[prompt, completion]`` in
  a padded batch (prompts left-padded, completions right-padded), so every prompt is forwarded once per
  completion; logits only at completion positions, as TRL computes them.
- :func:`packed_causal_logprobs`: each group as one causal row ``[prompt, c_1 … c_G]`` (the limit proxy: our token
  count with plain causal attention, so its log-probs are wrong by design).
- :func:`packed_causal_roots_logprobs`: ``packed_causal`` at the prefix tree's token count: each root's subtree
  (a group's prompt and its completions, when whole prompts are shared) as one causal row, the LM head on the same
  predictor rows as ours (log-probs wrong by design).
- :func:`packed_causal_tree_logprobs`: the prefix tree's packed tokens cut into causal rows as long as the longest
  stock row (a stricter proxy: the tree's token count at the stock context length; log-probs wrong by design).
- :class:`FlexVariant`: FlexAttention with a shared-prefix block mask (CUDA).
"""

from __future__ import annotations

import itertools

import torch

from shared_prefix._logprobs import token_logprobs


def stock_logprobs(model, prompt_ids, prompt_mask, completion_ids, completion_mask, *, temperature=1.0):
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


def packed_rows(prompt_ids, completion_ids, g: int):
    """Each group as one row ``[prompt, c_1 … c_G]``, its position ids (completions restart at P) and, for every
    completion token, the flat index of the row position that predicts it."""
    bg, p = prompt_ids.shape
    s = completion_ids.shape[1]
    b = bg // g
    dev = prompt_ids.device
    ids = torch.cat([prompt_ids[::g], completion_ids.view(b, g * s)], dim=1)
    pos = torch.cat([torch.arange(p, device=dev), p + torch.arange(s, device=dev).repeat(g)]).expand(b, -1)
    j = torch.arange(s, device=dev)
    within = torch.where(j == 0, torch.full_like(j, p - 1), p + j - 1)  # for completion 0
    per_completion = within[None, :] + torch.where(j[None, :] == 0, 0, torch.arange(g, device=dev)[:, None] * s)
    length = p + g * s
    pred = (torch.arange(b, device=dev)[:, None, None] * length + per_completion[None]).reshape(bg, s)
    return ids, pos, pred


def packed_rows_logprobs(model, ids, pos, pred, completion_ids, attention_mask):
    """Completion log-probs from per-group packed rows: the decoder on ``ids``, the LM head on the predictor rows."""
    hidden = model.get_decoder()(input_ids=ids, position_ids=pos, attention_mask=attention_mask,
                                 use_cache=False).last_hidden_state
    h = hidden.reshape(-1, hidden.shape[-1]).index_select(0, pred.reshape(-1))
    logp, _ = token_logprobs(model.get_output_embeddings()(h), completion_ids.reshape(-1), 1.0, False)
    return logp.view_as(completion_ids)


def packed_causal_logprobs(model, prompt_ids, completion_ids, g: int):
    ids, pos, pred = packed_rows(prompt_ids, completion_ids, g)
    # An all-ones mask keeps transformers from reading the restarting positions as packed sequences: plain causal.
    return packed_rows_logprobs(model, ids, pos, pred, completion_ids, torch.ones_like(ids))


def packed_causal_tree_logprobs(model, prompt_ids, prompt_mask, completion_ids, completion_mask):
    """The tokens a prefix-tree plan packs, cut into causal rows as long as the longest stock row (the last row
    topped up with the stream's first tokens), through the decoder; the LM head on the plan's predictor rows."""
    import shared_prefix as sp

    plan = sp.plan(prompt_ids, prompt_mask, completion_ids, completion_mask)
    t = plan.num_tokens
    rows = -(-t // plan.max_seqlen)
    width = -(-t // rows)
    ids = plan.input_ids[0]
    ids = torch.cat([ids, ids[: rows * width - t]]).view(rows, width)
    pos = torch.arange(width, device=ids.device).expand(rows, -1)
    hidden = model.get_decoder()(input_ids=ids, position_ids=pos, attention_mask=torch.ones_like(ids),
                                 use_cache=False).last_hidden_state
    h = plan.predictor_rows(hidden.reshape(-1, hidden.shape[-1])[:t])
    logp, _ = token_logprobs(model.get_output_embeddings()(h), plan.completion_targets(), 1.0, False)
    return plan.unpack_completions(logp)


def packed_causal_roots_logprobs(model, prompt_ids, prompt_mask, completion_ids, completion_mask):
    """Each root of the prefix tree with all its descendants as one causal row (stream order, the plan's position
    ids), through the decoder; the LM head on the plan's predictor rows. Roots whose subtrees have one size run as one batch."""
    import shared_prefix as sp

    plan = sp.plan(prompt_ids, prompt_mask, completion_ids, completion_mask)
    nodes = plan.nodes
    root = []
    for n in nodes:
        root.append(len(root) if n.parent < 0 else root[n.parent])
    token_root = torch.tensor(root).repeat_interleave(torch.tensor([n.tokens for n in nodes]))  # on the host
    order = torch.sort(token_root, stable=True).indices  # each root's subtree in stream order, root by root
    sizes = torch.bincount(token_root).tolist()
    offsets = [0, *itertools.accumulate(sizes)]
    dev, decoder, hidden = plan.device, model.get_decoder(), None
    for size in sorted(set(sizes) - {0}):
        # Subtrees of one size as one batch.
        starts = torch.tensor([offsets[r] for r, n in enumerate(sizes) if n == size])
        index = order[starts[:, None] + torch.arange(size)].to(dev)
        ids = plan.input_ids[0][index]
        h = decoder(input_ids=ids, position_ids=plan.position_ids[0][index],
                    attention_mask=torch.ones_like(ids), use_cache=False).last_hidden_state
        hidden = h.new_empty(plan.num_tokens, h.shape[-1]) if hidden is None else hidden
        hidden = hidden.index_copy(0, index.reshape(-1), h.reshape(-1, h.shape[-1]))
    h = plan.predictor_rows(hidden)
    logp, _ = token_logprobs(model.get_output_embeddings()(h), plan.completion_targets(), 1.0, False)
    return plan.unpack_completions(logp)


class FlexVariant:
    """FlexAttention with a block mask: completions see their group's prompt and causally themselves."""

    def __init__(self, model, prompt_ids, completion_ids, g: int):
        from torch.nn.attention.flex_attention import create_block_mask

        self.model, self.g, self.completion_ids = model, g, completion_ids
        self.ids, self.pos, self.pred = packed_rows(prompt_ids, completion_ids, g)
        p, s = prompt_ids.shape[1], completion_ids.shape[1]

        def mask_mod(b, h, q, kv):
            same_completion = torch.div(q - p, s, rounding_mode="floor") == torch.div(kv - p, s, rounding_mode="floor")
            return (kv <= q) & ((kv < p) | same_completion)

        length = self.ids.shape[1]
        self.block_mask = create_block_mask(mask_mod, B=None, H=None, Q_LEN=length, KV_LEN=length,
                                            device=prompt_ids.device)

    def __call__(self):
        model = self.model
        # Left on flex through backward (the checkpoint recompute runs there); run_config resets it.
        model.set_attn_implementation("flex_attention")
        return packed_rows_logprobs(model, self.ids, self.pos, self.pred, self.completion_ids, self.block_mask)
