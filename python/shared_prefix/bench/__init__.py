"""Benchmark: ``python -m shared_prefix.bench`` (tooling, not the library; the demo lives here too).

One step is the forward and backward of the completion log-probs of a GRPO micro-batch: B prompts of P tokens, each
with G completions of S tokens (config ``PxSxGxB``). Variants, measured side by side in one run:

- ``baseline``: stock rows ``[prompt, completion]`` as TRL builds them, SDPA, logits only at completion positions;
- ``packed_causal``: each group as one causal row of P + G·S tokens (the limit proxy: our token count with plain
  causal attention, so its log-probs are wrong by design); ``packed_causal_fa2`` (CUDA only) holds its SDPA to
  flash-attention 2 for the whole step: on Hopper SDPA picks cuDNN, which builds a graph per new shape, so under
  ``--vary`` the proxy pays those builds (as stock packed training would) and this one does not; with fixed shapes
  it splits our gap to the proxy into FA2's part (ours runs FA2 wherever a shape has not recurred) and the rest;
- ``packed_causal_roots``: ``packed_causal`` at the prefix tree's token count (each root's subtree as one causal
  row; for batches that share more than prompts, ``--system``/``--branches``), and ``packed_causal_tree``, a
  stricter proxy (the tree's tokens in rows as long as the longest stock row); ``shared_prefix_prompts``: ours
  sharing whole prompts only;
- ``shared_prefix``: ours (``_fa2`` / ``_cudnn`` / ``_cudnn_views``: one attention kernel forced, CUDA;
  ``_full_head``: the LM head in one piece instead of vocabulary slices; ``_split`` / ``_fused``: the prefixes'
  and the completions' causal attention forced apart, as DESIGN's three calls, or into one call, where by default
  each kernel chooses: one call on flash-attention 2, apart on cuDNN and the CPU kernels);
- ``prefix_grouper``: the original ``prefix-grouper`` package through its API, where it is installed;
- ``flex``: FlexAttention with a shared-prefix block mask (CUDA only; compile time reported separately).

Shapes: by default every step of a config has the same shapes, and the numbers are the steady state of a run that
repeats them (ours with ``cudnn_after(0)``: the cuDNN graphs of the long calls are built in the untimed steps, as
after the first 8 plans of a shape by default). ``--vary`` gives every step a new prompt length (P, P + 8, P + 16,
…; the same sequence for every variant), as GRPO batches have: whatever a kernel builds per shape (cuDNN graphs,
FlexAttention's block masks and recompiles) is then paid in the timed steps, and ours runs with its defaults.
``shared_prefix_eager_cudnn`` is ours giving every long one-batch call to cuDNN at once (``cudnn_after(0)``); with
fixed shapes it equals ``shared_prefix``. ``shared_prefix_cudnn_bucketed`` pads the causal self
calls to a multiple of 512 tokens (``cudnn_bucket``) and gives a call to cuDNN once its (padded) shape was seen
in one earlier plan, so that under ``--vary`` the prompts' call reaches cuDNN on recurring buckets; measure it in a
process of its own (the shape counts and cuDNN's graph cache are process-wide).

``--window W`` gives every layer a sliding window of W tokens (Qwen2's ``use_sliding_window``, as Mistral and
Gemma 3's sliding layers apply it); ``flex`` and ``prefix_grouper`` implement full causal attention only and are
left out then.

Per variant: the median of the timed steps after warm-up (rounds run the variants in turn, so drifts in the
machine's speed fall on all of them alike), the first step's time apart (compiles, graph builds), peak memory
above the weights, and max |Δ logprob|, gradient rel L2 and cosine against ``baseline``; on CUDA also the GPU
busy time of one profiled step (its kernels' summed durations, and those of its attention kernels), which leaves
out the host's time to issue the step. Per config, the host cost of one attention forward+backward at tiny lengths
(ATen ops dispatched and µs, ours against one SDPA causal call over the same tokens; ``--no-host-cost`` skips it):
where kernels take no time, what remains is the host's work, which bounds a host-bound GPU step.
Writes ``results.jsonl``, ``results.md`` and ``results.png``.
"""

