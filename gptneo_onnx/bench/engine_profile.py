"""Where a serving run's time went, read from the server's own /metrics around the run.

The engine reports each prefill run, decode step and regroup with its seconds
(`gptneo_onnx_engine_duration_seconds{phase}`) and each step's rows (`gptneo_onnx_batch_size`).
Their differences over a run give the share of its wall time in each phase (the rest: the engine
waiting for requests, and the HTTP side), the mean decode step and batch, and how many requests
each prefill run took. That explains a throughput: continuous batching loses to its ceiling where
prefills stall every row, steps get slower, or slots stand empty.
"""

from __future__ import annotations

from prometheus_client.parser import text_string_to_metric_families

from gptneo_onnx.serve.engine import PHASES

SHARES = ("decode", "prefill", "regroup", "other")  # in table and chart order
ENGINE = "gptneo_onnx_engine_duration_seconds"
BATCH = "gptneo_onnx_batch_size"


def totals(metrics_text: str) -> dict[str, float]:
    """The engine's counters in a /metrics answer: `{phase}_seconds` and `{phase}_runs` per
    phase, and `decode_rows`."""
    totals = {f"{phase}_{part}": 0.0 for phase in PHASES for part in ("seconds", "runs")}
    totals["decode_rows"] = 0.0
    for family in text_string_to_metric_families(metrics_text):
        for sample in family.samples:
            phase = sample.labels.get("phase")
            if sample.name == f"{ENGINE}_sum" and phase in PHASES:
                totals[f"{phase}_seconds"] = sample.value
            elif sample.name == f"{ENGINE}_count" and phase in PHASES:
                totals[f"{phase}_runs"] = sample.value
            elif sample.name == f"{BATCH}_sum":
                totals["decode_rows"] = sample.value
    return totals


def spent(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    """What the engine did between two scrapes (`totals`)."""
    return {key: after[key] - before[key] for key in after}


def pooled(stretches: list[dict[str, float]]) -> dict[str, float]:
    """Several stretches' `spent` counters summed (a benchmark's rounds)."""
    return {key: sum(stretch[key] for stretch in stretches) for key in stretches[0]}


def profile(spent: dict[str, float], wall: float, requests: int | None) -> dict:
    """A stretch of a run (its `spent` counters over `wall` seconds): its shares of wall time per
    phase, mean decode step (ms) and batch, and requests per prefill run (None where it made no
    such work, or `requests` is None)."""
    shares = {f"{phase}_share": spent[f"{phase}_seconds"] / wall for phase in PHASES}
    steps, prefills = spent["decode_runs"], spent["prefill_runs"]
    return {
        **shares,
        "other_share": max(0.0, 1 - sum(shares.values())),  # waiting for requests, HTTP, the loop
        "decode_steps": int(steps),
        "decode_step_ms": 1000 * spent["decode_seconds"] / steps if steps else None,
        "mean_batch": spent["decode_rows"] / steps if steps else None,
        "prefill_runs": int(prefills),
        "requests_per_prefill": requests / prefills if prefills and requests is not None else None,
    }


def markdown_table(runs: dict[str, dict[str, dict]]) -> str:
    """Per policy and client count: the engine's time by phase, its steps and its prefills."""
    lines = [
        "| policy | clients | decode | prefill | regroup | other | decode step ms | mean batch "
        "| sustained mean batch | requests per prefill |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]

    def number(value: float | None, digits: int) -> str:
        return "-" if value is None else f"{value:.{digits}f}"

    for policy, levels in runs.items():
        for clients, run in levels.items():
            engine = run.get("engine")
            if engine is None:
                continue
            shares = " | ".join(f"{100 * engine[f'{part}_share']:.0f}%" for part in SHARES)
            sustained = (run.get("sustained_engine") or {}).get("mean_batch")
            lines.append(
                f"| {policy} | {clients} | {shares} | {number(engine['decode_step_ms'], 1)} | "
                f"{number(engine['mean_batch'], 2)} | {number(sustained, 2)} | "
                f"{number(engine['requests_per_prefill'], 2)} |"
            )
    return "\n".join(lines) + "\n"
