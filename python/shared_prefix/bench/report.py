"""The bench's report: the results table (markdown) and plot."""

from __future__ import annotations

from pathlib import Path

from shared_prefix.bench.host import REPEATS, TINY_COMPLETION, TINY_PROMPT
from shared_prefix.bench.variants import TREE_PROXIES, VARY_STEP

# The table's note for the limit proxies (their log-probs are wrong by design).
PROXY_NOTES = {"packed_causal": "limit proxy; wrong mask by design",
               "packed_causal_fa2": "limit proxy on flash-attention 2",
               "packed_causal_roots": "limit proxy at the tree's token count; wrong mask by design",
               "packed_causal_tree": "limit proxy at the tree's token count in rows of the stock length; wrong "
                                     "mask by design"}


def markdown(rows: list[dict], meta: dict) -> str:
    window = "" if meta.get("window") is None else f", sliding window {meta['window']} on every layer"
    parts = []
    if meta.get("system"):
        parts.append(f"every prompt opens with one shared system prompt of {meta['system']} tokens")
    if meta.get("branches"):
        parts.append(f"each group's completions share their first half in {meta['branches']} trunk(s)")
    if parts and meta.get("min_node_tokens") is not None:
        parts.append(f"prefix-tree nodes of at least {meta['min_node_tokens']} tokens")
    sharing = f" Batches: {'; '.join(parts)}." if parts else ""
    shapes = (f"a new prompt length every step (P, P + {VARY_STEP}, …)" if meta.get("vary")
              else "the same shapes every step (steady state)")
    # CUDA runs add the GPU busy time of one profiled step (kernels only: what the step costs the GPU, apart from
    # the host's time to issue it) and its attention part, with its ratio to packed_causal's.
    busy = any("gpu_busy_s" in r for r in rows)
    lines = [
        f"Device: {meta['device_name']}; model {meta['model']} (random weights{window}), {meta['dtype']}, "
        f"grad checkpointing {'on' if meta['grad_ckpt'] else 'off'}; torch {meta['torch']}; commit {meta['commit']}; "
        f"{meta['date']}. Median of {meta['steps']} interleaved rounds (forward+backward of completion log-probs), "
        f"{shapes}.{sharing}",
        "",
        "| config PxSxGxB | variant | median s | first step s | vs baseline | vs packed_causal | peak mem GiB "
        "| max abs Δlogp | grad rel L2 | grad cos |"
        + (" GPU busy s (attention) | busy vs packed_causal |" if busy else "") + " note |",
        "|---|---|---|---|---|---|---|---|---|---|" + ("---|---|" if busy else "") + "---|",
    ]
    for cfg in dict.fromkeys(r["config"] for r in rows):
        group = {r["variant"]: r for r in rows if r["config"] == cfg}
        base = group.get("baseline")
        limit = group.get("packed_causal")
        base = base if base and "error" not in base else None
        limit = limit if limit and "error" not in limit else None
        for r in group.values():
            if "error" in r:
                dashes = " — |" * (10 if busy else 8)
                lines.append(f"| {cfg} | {r['variant']} |{dashes} {r['error']} |")
                continue
            speed = f"{base['median_s'] / r['median_s']:.2f}× faster" if base else "—"
            ratio = f"{r['median_s'] / limit['median_s']:.2f}×" if limit else "—"
            notes = [f"+{r['compile_s']:.0f} s first compile" if "compile_s" in r else ""]
            if r["variant"] in PROXY_NOTES:
                notes = [PROXY_NOTES[r["variant"]]]
            for proxy in TREE_PROXIES:
                tree_limit = group.get(proxy)
                if r["variant"] == "shared_prefix" and tree_limit and "error" not in tree_limit:
                    notes.append(f"{r['median_s'] / tree_limit['median_s']:.2f}× {proxy}")
            if r.get("interrupted"):
                notes.append(f"interrupted: median of {r['rounds']} of {meta['steps']} rounds")
            gpu = ""
            if busy:
                gpu = " — | — |"
                if "gpu_busy_s" in r:
                    vs = (f"{r['gpu_busy_s'] / limit['gpu_busy_s']:.2f}×"
                          if limit and limit.get("gpu_busy_s") else "—")
                    gpu = f" {r['gpu_busy_s']:.3f} ({r['gpu_attn_s']:.3f}) | {vs} |"
            note = "; ".join(n for n in notes if n)
            first = f"{r['first_step_s']:.3f}" if "first_step_s" in r else "—"
            lines.append(
                f"| {cfg} | {r['variant']} | {r['median_s']:.3f} | {first} | {speed} | {ratio} | "
                f"{r['peak_mem_bytes'] / 2**30:.2f} | {r['max_abs_logp_diff']:.1e} | {r['grad_rel_l2']:.1e} | "
                f"{r['grad_cos']:.6f} |{gpu} {note} |"
            )
    hosts = [(r["config"], r["host"]) for r in rows if "host" in r]
    if hosts:
        lines += ["", f"Host cost per attention forward+backward at tiny lengths (P = {TINY_PROMPT}, doubled with a "
                  f"system prompt; S = {TINY_COMPLETION}; the config's G and B): ATen ops dispatched, attention "
                  f"kernel calls (forward and backward) and the median µs of {REPEATS} calls, ours against one SDPA "
                  "causal call over the same packed tokens, their calls interleaved.", "",
                  "| config PxSxGxB | tokens | levels | ours ops | SDPA ops | ours kernels | SDPA kernels | ours µs | "
                  "SDPA µs | µs ratio |",
                  "|---|---|---|---|---|---|---|---|---|---|"]
        for cfg, h in hosts:
            lines.append(f"| {cfg} | {h['tokens']} | {h['levels']} | {h['ours_ops']} | {h['sdpa_ops']} | "
                         f"{h['ours_kernels']} | {h['sdpa_kernels']} | {h['ours_us']:.0f} | {h['sdpa_us']:.0f} | "
                         f"{h['us_ratio']:.2f}× |")
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    configs = list(dict.fromkeys(r["config"] for r in rows))
    variants = list(dict.fromkeys(r["variant"] for r in rows))
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    width = 0.8 / max(1, len(variants))
    for i, v in enumerate(variants):
        xs, ts, ms = [], [], []
        for j, c in enumerate(configs):
            r = next((r for r in rows if r["config"] == c and r["variant"] == v and "error" not in r), None)
            if r is not None:
                xs.append(j + i * width)
                ts.append(r["median_s"])
                ms.append(r["peak_mem_bytes"] / 2**30)
        axes[0].bar(xs, ts, width, label=v)
        axes[1].bar(xs, ms, width, label=v)
    for ax, title in zip(axes, ["step time (s, median)", "peak memory above weights (GiB)"]):
        ax.set_xticks([j + width * (len(variants) - 1) / 2 for j in range(len(configs))], configs)
        ax.set_xlabel("P x S x G x B")
        ax.set_title(title)
    if variants:
        axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
