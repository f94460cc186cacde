"""Turn benchmark medians into the issue's targets, a markdown table, and the speed-up chart."""

from __future__ import annotations

import math
from pathlib import Path

PEERS = ("optimum-fp32", "transformers-fp32")
LOWER_IS_BETTER = ("cold_start_s", "peak_rss_mb")
# The chart: these against every peer system, each line its own color (the table has the rest).
HEADLINE = ("ours-optimized-fp32", "ours-optimized-int4", "runtime-optimized-fp32", "runtime-optimized-int4")
CHART_PEERS = ("transformers-fp32", "optimum-fp32", "optimum-int4")
INT4_BANDWIDTH_TARGET = 0.85  # int4 short decode: fraction of the measured read bandwidth


def _metrics(plan) -> list[tuple[str, str]]:
    """(key, column title) in table order."""
    short, long = plan.short[0], plan.long[0]
    contexts = [length for length, _ in plan.contexts]
    rows = [
        (f"decode_tok_s@{short}", f"decode tok/s @{short}"),
        (f"decode_tok_s@{long}", f"decode tok/s @{long}"),
    ]
    rows += [(f"prefill_tok_s@{n}", f"prefill tok/s {n}") for n in (*contexts, long)]
    rows += [(f"batch{plan.batch[0]}_tok_s", f"batch {plan.batch[0]} tok/s")]
    rows += [("cold_start_s", "cold start s"), ("peak_rss_mb", "peak RSS MB")]
    return rows


def ratio(medians: dict, variant: str, peer: str, metric: str) -> float:
    """How many times better `variant` is than `peer` (>1 is better, for every metric)."""
    ours, theirs = medians.get(variant, {}).get(metric), medians.get(peer, {}).get(metric)
    if ours is None or theirs is None or not ours or not theirs:
        return math.nan
    return theirs / ours if metric in LOWER_IS_BETTER else ours / theirs


def evaluate_targets(medians: dict, plan, bandwidth: dict | None = None) -> list[dict]:
    """The issue's targets, each with the measured ratio (as `x` better) and whether it is met.
    Time to first token is the prefill of one prompt: its ratio is that of prefill tok/s."""
    short, long = f"decode_tok_s@{plan.short[0]}", f"decode_tok_s@{plan.long[0]}"
    prefills = [f"prefill_tok_s@{n}" for n in (plan.contexts[0][0], plan.long[0])]
    checks = []
    for prefix in ("ours", "runtime"):  # the bench loop always; the project runtime when it was run
        fp32, int4 = f"{prefix}-optimized-fp32", f"{prefix}-optimized-int4"
        if prefix != "ours" and fp32 not in medians:
            continue
        checks += [
            ("fp32 optimized short decode vs Optimum fp32", fp32, "optimum-fp32", short, 1.15),
            ("fp32 optimized long-context decode vs Optimum fp32", fp32, "optimum-fp32", long, 1.8),
            ("int4 short decode vs Optimum fp32", int4, "optimum-fp32", short, 3.5),
            (
                "int4 short decode vs Optimum int4 (same MatMulNBits settings)",
                int4,
                "optimum-int4",
                short,
                1.25,
            ),
            ("peak RSS, fp32 process vs Optimum's (<= 0.5x)", fp32, "optimum-fp32", "peak_rss_mb", 2.0),
            ("cold start to first token vs Optimum's (<= 0.5x)", fp32, "optimum-fp32", "cold_start_s", 2.0),
        ]
        for metric in prefills:
            length = metric.split("@")[1]
            checks += [
                (f"fp32 TTFT (prefill {length}) vs Optimum fp32", fp32, "optimum-fp32", metric, 1.5),
                (f"int4 TTFT (prefill {length}) vs Optimum int4", int4, "optimum-int4", metric, 1.5),
            ]
        title = "int4 short decode, fraction of the read bandwidth"
        checks.append((title, int4, "bandwidth", short, INT4_BANDWIDTH_TARGET))
    targets = []
    for title, variant, peer, metric, required in checks:
        if peer == "bandwidth":
            entry = ((bandwidth or {}).get("variants") or {}).get(variant) or {}
            measured = entry["percent"] / 100 if "percent" in entry else math.nan
        else:
            measured = ratio(medians, variant, peer, metric)
        targets.append(
            {
                "target": title,
                "variant": variant,
                "peer": peer,
                "metric": metric,
                "measured_x": measured,
                "required_x": required,
                "met": bool(measured >= required) if not math.isnan(measured) else None,
            }
        )
    return targets


def _format(value: float | None) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{value:.2f}" if value < 100 else f"{value:.0f}"


def markdown_table(results: dict, plan) -> str:
    medians, metrics = results["medians"], _metrics(plan)
    lines = ["| variant | " + " | ".join(title for _, title in metrics) + " |"]
    lines.append("|---" * (len(metrics) + 1) + "|")
    for variant, values in medians.items():
        lines.append(f"| {variant} | " + " | ".join(_format(values.get(key)) for key, _ in metrics) + " |")
    for peer in PEERS:
        if peer not in medians:
            continue
        lines += ["", f"Ratios against {peer} (x better; for cold start and RSS, peer / ours):", ""]
        lines.append("| variant | " + " | ".join(title for _, title in metrics) + " |")
        lines.append("|---" * (len(metrics) + 1) + "|")
        for variant in medians:
            if variant != peer:
                cells = [_format(ratio(medians, variant, peer, key)) for key, _ in metrics]
                lines.append(f"| {variant} | " + " | ".join(cells) + " |")
    bandwidth = results.get("bandwidth")
    if bandwidth:
        lines += [
            "",
            f"Decode at the memory wall: measured read bandwidth {bandwidth['read_gb_s']:.1f} GB/s; "
            f"bytes a step reads (weights + KV cache) at {plan.short[0]} tokens of context:",
            "",
            "| variant | MB read per token | decode tok/s | effective GB/s | % of read bandwidth |",
            "|---|---|---|---|---|",
        ]
        for variant, entry in bandwidth["variants"].items():
            cells = [entry["mb_per_token"], entry["tok_s"], entry["gb_s"], entry["percent"]]
            lines.append(f"| {variant} | " + " | ".join(_format(cell) for cell in cells) + " |")
    lines += ["", "| target | variant | measured | required | met |", "|---|---|---|---|---|"]
    for target in results["targets"]:
        met = {True: "yes", False: "NO", None: "not measured"}[target["met"]]
        lines.append(
            f"| {target['target']} | {target['variant']} | {_format(target['measured_x'])}x "
            f"| {target['required_x']}x | {met} |"
        )
    return "\n".join(lines)


def write_chart(medians: dict, plan, path: Path) -> Path:
    """Two panels: decode tok/s against context length, and prefill (time to first token) tok/s
    against prompt length; the headline variants (solid) against the peers (dashed), one color
    each, and the legend below the plots, clear of the data."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    contexts = sorted({plan.short[0], plan.long[0], *(length for length, _ in plan.contexts)})
    prompts = sorted({plan.long[0], *(length for length, _ in plan.contexts)})
    drawn = [name for name in (*HEADLINE, *CHART_PEERS) if name in medians]
    colors = plt.get_cmap("tab10").colors
    figure, (decode, prefill) = plt.subplots(1, 2, figsize=(11, 4.8))
    for index, variant in enumerate(drawn):
        style = dict(
            color=colors[index % len(colors)],
            marker="o",
            linestyle="--" if variant in CHART_PEERS else "-",
            label=variant,
        )
        values = medians[variant]
        decode.plot(contexts, [values.get(f"decode_tok_s@{n}", math.nan) for n in contexts], **style)
        prefill.plot(prompts, [values.get(f"prefill_tok_s@{n}", math.nan) for n in prompts], **style)
    for axis, title, xlabel in (
        (decode, "decode (batch 1)", "context length (tokens before decoding)"),
        (prefill, "prefill = time to first token", "prompt length (tokens)"),
    ):
        axis.set_title(title)
        axis.set_xlabel(xlabel)
        axis.set_ylabel("tokens per second")
        axis.set_yscale("log")
        axis.grid(True, alpha=0.3, which="both")
    figure.suptitle(f"GPT-Neo {plan.shape}, CPU: ours (solid) against the peers (dashed)")
    return save_with_legend_below(figure, decode, path, bottom=0.12, top=0.95)


def save_with_legend_below(figure, axis, path: Path, bottom: float, top: float = 1.0) -> Path:
    """`axis`'s legend in a row under the plots (never over the data), then the PNG."""
    import matplotlib.pyplot as plt

    handles, labels = axis.get_legend_handles_labels()
    figure.legend(handles, labels, loc="lower center", ncol=min(4, len(labels)), fontsize=8, frameon=False)
    figure.tight_layout(rect=(0, bottom, 1, top))
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path
