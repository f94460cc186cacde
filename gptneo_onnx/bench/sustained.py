"""Sustained load on one loaded model: concurrent threads against sequential runs, and RSS over time.

`check_concurrent` runs a stream of requests on N threads that share one model, for a bounded
time, then replays every request that finished one by one and compares the token ids: any
difference means state leaked between requests. `measure_rss` runs many generations in a row
and samples the process's resident memory, to show it stays flat. `scripts/load_test.py` runs
both at full size; `tests/test_sustained_load.py` runs a short version.
"""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import psutil
from tqdm.auto import tqdm

PROMPTS = [
    "def fibonacci(n):",
    "import os\nimport sys\n",
    "class Stack:\n    def __init__(self):",
    "for i in range(10):",
    "    return self._",
    "# Copyright",
    "with open(path) as f:",
    "if __name__ == '__main__':",
    "raise ValueError(",
    "try:\n    import",
]


@dataclass(frozen=True)
class Request:
    """One generate call: its prompts and decoding options (seeded when sampling)."""

    index: int
    prompts: list[str]
    options: dict[str, Any]


def make_requests(seed: int = 0, max_new_tokens: int = 24) -> Iterator[Request]:
    """An endless, reproducible mix: greedy, batched, seeded sampling, beam search, stop strings."""
    rng = random.Random(seed)
    index = 0
    while True:
        kind = index % 5
        new_tokens = rng.randint(max(1, max_new_tokens // 4), max_new_tokens)
        options: dict[str, Any] = {"max_new_tokens": new_tokens}
        prompts = [rng.choice(PROMPTS)]
        if kind == 1:  # a left-padded batch
            prompts.append(rng.choice(PROMPTS) * rng.randint(1, 3))
        elif kind == 2:  # seeded sampling, two sequences
            options.update(do_sample=True, temperature=0.8, top_p=0.95, top_k=40, seed=rng.randrange(2**32))
            options.update(num_return_sequences=2)
        elif kind == 3:
            options.update(num_beams=2)
        elif kind == 4:
            options.update(stop_strings=["\n"], repetition_penalty=1.3)
        yield Request(index, prompts, options)
        index += 1


def run_request(model: Any, request: Request) -> list[list[int]]:
    return model.generate(request.prompts, **request.options).sequences


@dataclass
class ConcurrentReport:
    threads: int
    seconds: float
    requests: int  # finished on the threads, and replayed one by one
    generated_tokens: int
    mismatches: list[int] = field(default_factory=list)  # request indices whose outputs differ
    errors: list[str] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return not self.mismatches and not self.errors and self.requests > 0


def check_concurrent(
    model: Any,
    requests: Iterator[Request],
    threads: int = 8,
    duration_s: float = 60.0,
    max_requests: int | None = None,
    progress: bool = True,
    run: Callable[[Any, Request], list[list[int]]] = run_request,
) -> ConcurrentReport:
    """Run `requests` on `threads` threads sharing `model` until `duration_s` or `max_requests`,
    then replay each finished request alone and compare the token ids."""
    lock = threading.Lock()
    outputs: dict[int, list[list[int]]] = {}
    taken: dict[int, Request] = {}
    errors: list[str] = []
    start_together = threading.Barrier(threads)
    bar = tqdm(total=max_requests, desc=f"{threads} threads", unit="req", disable=not progress)

    def next_request() -> Request | None:
        with lock:
            if time.perf_counter() >= deadline or (max_requests is not None and len(taken) >= max_requests):
                return None
            request = next(requests)
            taken[request.index] = request
            return request

    def worker() -> None:
        start_together.wait()
        while (request := next_request()) is not None:
            try:
                result = run(model, request)
            except Exception as error:  # reported, not raised: the other threads finish their work
                with lock:
                    errors.append(f"request {request.index}: {type(error).__name__}: {error}")
                continue
            with lock:
                outputs[request.index] = result
                bar.update(1)

    started = time.perf_counter()
    deadline = started + duration_s
    pool = [threading.Thread(target=worker, name=f"load-{i}") for i in range(threads)]
    for thread in pool:
        thread.start()
    for thread in pool:
        thread.join()
    seconds = time.perf_counter() - started
    bar.close()

    mismatches = []
    for index in tqdm(sorted(outputs), desc="sequential replay", unit="req", disable=not progress):
        if run(model, taken[index]) != outputs[index]:
            mismatches.append(index)
    tokens = sum(len(sequence) for result in outputs.values() for sequence in result)
    return ConcurrentReport(threads, round(seconds, 2), len(outputs), tokens, mismatches, errors)


def rss_mb() -> float:
    return psutil.Process().memory_info().rss / 2**20


@dataclass
class MemoryReport:
    generations: int
    warmup: int
    samples: list[tuple[int, float]]  # (generations done, RSS MB), after the warm-up
    seconds: float

    @property
    def start_mb(self) -> float:
        return self.samples[0][1]

    @property
    def peak_mb(self) -> float:
        return max(rss for _, rss in self.samples)

    @property
    def end_mb(self) -> float:
        return self.samples[-1][1]

    @property
    def slope_mb_per_1000(self) -> float:
        """Least-squares growth of RSS, in MB per 1,000 generations."""
        done, rss = np.array(self.samples).T
        if len(done) < 2:
            return 0.0
        return float(np.polyfit(done, rss, 1)[0] * 1000)

    def summary(self) -> dict[str, Any]:
        return {
            "generations": self.generations,
            "warmup_generations": self.warmup,
            "seconds": round(self.seconds, 1),
            "rss_start_mb": round(self.start_mb, 1),
            "rss_peak_mb": round(self.peak_mb, 1),
            "rss_end_mb": round(self.end_mb, 1),
            "rss_growth_mb": round(self.end_mb - self.start_mb, 1),
            "slope_mb_per_1000_generations": round(self.slope_mb_per_1000, 2),
            "samples": [(done, round(rss, 1)) for done, rss in self.samples],
        }


def measure_rss(
    model: Any,
    requests: Iterator[Request],
    generations: int = 1000,
    sample_every: int = 25,
    warmup: int = 20,
    progress: bool = True,
    run: Callable[[Any, Request], list[list[int]]] = run_request,
) -> MemoryReport:
    """Run `warmup` + `generations` requests in a row, sampling RSS every `sample_every` after the warm-up.

    The warm-up lets onnxruntime's arena and allocator caches reach their working size, so what
    the samples show is growth per request, not the first allocations.
    """
    for _ in range(warmup):
        run(model, next(requests))
    samples = [(0, rss_mb())]
    started = time.perf_counter()
    for done in tqdm(range(1, generations + 1), desc="generations (RSS)", unit="gen", disable=not progress):
        run(model, next(requests))
        if done % sample_every == 0 or done == generations:
            samples.append((done, rss_mb()))
    return MemoryReport(generations, warmup, samples, time.perf_counter() - started)
