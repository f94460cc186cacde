"""The prompt-lookup benchmark's markdown tables and grouped bar chart (bench/lookup.py)."""

from __future__ import annotations

from pathlib import Path

from gptneo_onnx.bench.report import save_with_legend_below

SYSTEMS = ("ours", "transformers")


def lookup_names(results: dict) -> list[str]:
    return [f"N={n}" for n in results["settings"]["lookups"]]


def write_table(results: dict, path: Path) -> str:
    """Speed-ups per prompt and N beside transformers', steps and accepted drafts, step costs."""
    settings, names = results["settings"], lookup_names(results)
    lines = [
        f"Decode tok/s after the first step, {settings['new_tokens']} new tokens, greedy, medians of "
        f"{settings['rounds']} rounds, {settings['threads']} threads; speed-up = tok/s with prompt "
        f"lookup N / plain tok/s of the same system (target {settings['target']}x).",
        "",
        "| prompt | prompt tokens | ours plain tok/s | "
        + " | ".join(f"ours {n}" for n in names)
        + " | transformers plain tok/s | "
        + " | ".join(f"transformers {n}" for n in names)
        + " | ours / transformers, plain | ours / transformers, best N |",
        "|---" * (6 + 2 * len(names)) + "|",
    ]
    for row in results["prompts"]:
        ours, theirs = row["ours"], row["transformers"]
        best = max(ours[n]["tok_s"] for n in names) / max(theirs[n]["tok_s"] for n in names)
        cells = [row["name"], str(len(row["prompt_ids"])), f"{ours['plain']['tok_s']:.0f}"]
        cells += [f"{ours[n]['speedup']:.2f}x" for n in names]
        cells += [f"{theirs['plain']['tok_s']:.0f}"] + [f"{theirs[n]['speedup']:.2f}x" for n in names]
        cells += [f"{ours['plain']['tok_s'] / theirs['plain']['tok_s']:.2f}x", f"{best:.2f}x"]
        lines.append("| " + " | ".join(cells) + " |")
    lines += [
        "",
        f"Forward steps for {settings['new_tokens']} tokens (the prefill included; plain = "
        f"{settings['new_tokens']}), accepted drafts per step in brackets, drafted tokens after the slash; "
        "copied: how many leading tokens of the plain greedy continuation are the copy a copying model "
        "would make (the original function's body, or C), of the copy's length.",
        "",
        "| prompt | copied | " + " | ".join(f"{system} {n}" for system in SYSTEMS for n in names) + " |",
        "|---" * (2 + 2 * len(names)) + "|",
    ]
    for row in results["prompts"]:
        cells = [row["name"], f"{row['copied_tokens']} of {row['copy_tokens']}"]
        for system in SYSTEMS:
            for n in names:
                values = row[system][n]
                cells.append(f"{values['steps']} ({values['accepted_per_step']:.2f}) / {values['drafted']}")
        lines.append("| " + " | ".join(cells) + " |")
    widths = list(next(iter(results["step_ms"].values())))
    past = len(results["prompts"][0]["prompt_ids"])
    lines += [
        "",
        f"One forward step of K tokens on a past of the first prompt ({past} "
        "tokens), logits for each, median ms; in brackets its cost relative to a one-token step.",
        "",
        "| system | " + " | ".join(f"K = {width}" for width in widths) + " |",
        "|---" * (1 + len(widths)) + "|",
    ]
    for system, costs in results["step_ms"].items():
        one = costs["1"]
        cells = [f"{costs[width]:.2f} ({costs[width] / one:.2f}x)" for width in widths]
        lines.append(f"| {system} | " + " | ".join(cells) + " |")
    lines += ["", "Prompts:", ""] + [f"- {row['name']}: {row['description']}" for row in results["prompts"]]
    text = "\n".join(lines) + "\n"
    path.write_text(text)
    return text


def write_chart(results: dict, path: Path) -> Path:
    """Grouped bars: the speed-up per prompt and N, ours (solid) beside transformers' (hatched),
    a dashed line at the target and a thin one at 1x (no gain)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names, prompts = lookup_names(results), results["prompts"]
    bars = [(system, n) for n in names for system in SYSTEMS]
    width = 0.8 / len(bars)
    colors = plt.get_cmap("tab10").colors
    figure, axis = plt.subplots(figsize=(max(7.0, 2.0 * len(prompts)), 4.8))
    for index, (system, n) in enumerate(bars):
        offsets = [position - 0.4 + width * (index + 0.5) for position in range(len(prompts))]
        axis.bar(
            offsets,
            [row[system][n]["speedup"] for row in prompts],
            width,
            color=colors[names.index(n)],
            alpha=1.0 if system == "ours" else 0.45,
            hatch=None if system == "ours" else "//",
            edgecolor="black",
            linewidth=0.4,
            label=f"{system}, {n}",
        )
    target = results["settings"]["target"]
    axis.axhline(target, color="black", linestyle="--", linewidth=1, label=f"target {target}x")
    axis.axhline(1.0, color="gray", linewidth=0.8)
    axis.set_xticks(range(len(prompts)), [row["name"] for row in prompts], fontsize=8)
    axis.set_ylabel("decode speed-up over plain greedy (same system)")
    axis.grid(True, axis="y", alpha=0.3)
    axis.set_title(
        f"Prompt-lookup decoding, bundled model, {results['settings']['new_tokens']} new tokens: "
        "ours (solid) and transformers (hatched)",
        fontsize=10,
    )
    return save_with_legend_below(figure, axis, path, bottom=0.14)
