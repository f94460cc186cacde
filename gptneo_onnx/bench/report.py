"""Turn benchmark medians into the issue's targets, a markdown table, and the speed-up chart."""

from __future__ import annotations

import math
from pathlib import Path

PEERS = ("optimum-fp32", "transformers-fp32")
LOWER_IS_BETTER = ("cold_start_s", "peak_rss_mb")


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


def evaluate_targets(medians: dict, plan) -> list[dict]:
    """The issue's targets, each with the measured ratio (as `x` better) and whether it is met."""
    short, long = f"decode_tok_s@{plan.short[0]}", f"decode_tok_s@{plan.long[0]}"
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
    targets = []
    for title, variant, peer, metric, required in checks:
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
    lines += ["", "| target | variant | measured | required | met |", "|---|---|---|---|---|"]
    for target in results["targets"]:
        met = {True: "yes", False: "NO", None: "not measured"}[target["met"]]
        lines.append(
            f"| {target['target']} | {target['variant']} | {_format(target['measured_x'])}x "
            f"| {target['required_x']}x | {met} |"
        )
    return "\n".join(lines)


def write_chart(medians: dict, plan, path: Path) -> Path:
    """Decode speed-up over Optimum fp32 (else the first peer run) against context length."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    baseline = next((peer for peer in PEERS if peer in medians), next(iter(medians)))
    contexts = sorted({plan.short[0], plan.long[0], *(length for length, _ in plan.contexts)})
    figure, axis = plt.subplots(figsize=(7, 4.5))
    for variant in medians:
        speedups = [ratio(medians, variant, baseline, f"decode_tok_s@{n}") for n in contexts]
        axis.plot(
            contexts, speedups, marker="o", label=variant, linestyle="--" if variant == baseline else "-"
        )
    axis.set_xlabel("context length (tokens before decoding)")
    axis.set_ylabel(f"decode speed-up over {baseline}")
    axis.set_title(f"GPT-Neo {plan.shape}, CPU, batch 1: decode tok/s relative to {baseline}")
    axis.grid(True, alpha=0.3)
    axis.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path
