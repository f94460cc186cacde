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

STEPS = 12  # decode steps timed per batch size (the median is kept)
PREFILLS = 3  # prefill runs timed per shape


def _median_seconds(run, repeats: int) -> float:
    run()  # warm-up: first-run allocations
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _step_seconds(model: CausalLM, batch: int, past: int) -> float:
    ids = np.ones((batch, past), np.int64)
    mask = np.ones_like(ids)
    _, cache = model.forward(ids, mask, capacity=past + STEPS + 2, num_logits_to_keep=1)
    token = np.ones((batch, 1), np.int64)
    state = {"mask": mask, "cache": cache}

    def step() -> None:
        state["mask"] = np.concatenate([state["mask"], np.ones((batch, 1), np.int64)], axis=1)
        _, state["cache"] = model.forward(token, state["mask"], past=state["cache"])

    return _median_seconds(step, STEPS)


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
    past = prompt + round(mean_out / 2)
    step_1, step_b = _step_seconds(model, 1, past), _step_seconds(model, slots, past)
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
