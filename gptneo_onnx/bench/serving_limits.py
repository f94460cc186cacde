"""What batching can gain at most on this machine: the serving benchmark's ceiling.

Every policy pays each request's prefill, and a decode step for B rows costs more than one for a
single row once the step is compute-bound. From a step at batch 1 and at the full batch, and a
prefill alone and in a group, both timed in this process on the served export, follow each
policy's cost per output token with every slot busy:

- sequential: (prefill alone + (m - 1) steps at batch 1) / m
- continuous: (grouped prefill per row + (m - 1) steps at batch B / B) / m
- static: (grouped prefill of B rows + (longest - 1) steps at batch B) / (B m)

with m the mean and `longest` the longest output length. Their ratios bound what the measured
throughputs can show; the benchmark prints them beside its targets.
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path

import numpy as np

from gptneo_onnx.runtime import CausalLM

STEPS = 24  # decode steps timed per batch size, batch 1 and the full batch in turn (medians kept)
PREFILLS = 3  # prefill runs timed per shape


def _median_seconds(run, repeats: int) -> float:
    run()  # warm-up: first-run allocations
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _step_seconds(model: CausalLM, batches: tuple[int, ...], past: int) -> list[float]:
    """The median decode step for each batch size, with rows `past` tokens long. The sizes take
    turns step by step, so a drift in the machine's speed reaches them alike."""
    runs = []
    for batch in batches:
        ids = np.ones((batch, past), np.int64)
        _, cache = model.forward(ids, np.ones_like(ids), capacity=past + STEPS + 2, num_logits_to_keep=1)
        runs.append(
            {"token": np.ones((batch, 1), np.int64), "mask": np.ones_like(ids), "cache": cache, "times": []}
        )
    for step in range(STEPS + 1):  # the first step of each is a warm-up
        for run in runs:
            run["mask"] = np.concatenate([run["mask"], np.ones_like(run["token"])], axis=1)
            start = time.perf_counter()
            _, run["cache"] = model.forward(run["token"], run["mask"], past=run["cache"])
            if step:
                run["times"].append(time.perf_counter() - start)
    return [statistics.median(run["times"]) for run in runs]


def decode_columns(prompt_lengths: tuple[int, ...], output_lengths: tuple[int, ...]) -> int:
    """The mean length of a row at a decode step: a prompt of p and an answer of a tokens take
    a - 1 steps at p + 1 ... p + a - 1 columns, so long answers weigh more."""
    steps = columns = 0
    for p in prompt_lengths:
        for a in output_lengths:
            steps += a - 1
            columns += (a - 1) * p + a * (a - 1) // 2
    return round(columns / steps) if steps else round(statistics.mean(prompt_lengths))


def _prefill_seconds(model: CausalLM, batch: int, length: int, capacity: int) -> float:
    """A prefill as the engine runs one: the cache sized to the prompt and the longest output."""
    ids = np.ones((batch, length), np.int64)

    def prefill() -> None:
        model.forward(ids, np.ones_like(ids), capacity=capacity, num_logits_to_keep=1)

    return _median_seconds(prefill, PREFILLS)


def batching_ceiling(
    export: Path, threads: int, slots: int, prompt_lengths: tuple[int, ...], output_lengths: tuple[int, ...]
) -> dict:
    """Timed costs and the ratios continuous / sequential and continuous / static can reach."""
    model = CausalLM.load(export, intra_op_threads=threads)
    prompt = round(statistics.mean(prompt_lengths))
    mean_out, longest = statistics.mean(output_lengths), max(output_lengths)
    past = decode_columns(prompt_lengths, output_lengths)
    step_1, step_b = _step_seconds(model, (1, slots), past)
    capacity = prompt + longest
    prefill_1 = _prefill_seconds(model, 1, prompt, capacity)
    prefill_b = _prefill_seconds(model, slots, prompt, capacity)
    per_token = {
        "sequential": (prefill_1 + (mean_out - 1) * step_1) / mean_out,
        "continuous": (prefill_b / slots + (mean_out - 1) * step_b / slots) / mean_out,
        "static": (prefill_b + (longest - 1) * step_b) / (slots * mean_out),
    }
    return {
        "step_ms": {"1": step_1 * 1000, str(slots): step_b * 1000},
        "prefill_ms": {"1": prefill_1 * 1000, str(slots): prefill_b * 1000},
        "prompt_tokens": prompt,
        "past_tokens": past,
        "tokens_per_second": {policy: 1 / seconds for policy, seconds in per_token.items()},
        "ratio": {policy: per_token[policy] / per_token["continuous"] for policy in ("sequential", "static")},
    }
