"""The server's Prometheus metrics (prometheus-client), one registry per app."""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from gptneo_onnx.serve.engine import BatchRun

PREFIX = "gptneo_onnx"
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
BATCH_BUCKETS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 64)


class ServerMetrics:
    """Requests by endpoint and status, running / waiting requests, batch size per decode step,
    the engine's seconds per prefill, decode step and regroup; per completion: time in the queue,
    time to first token, inter-token latency, duration and how it finished; tokens read and
    generated."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()

        def latency(name: str, text: str) -> Histogram:
            return Histogram(f"{PREFIX}_{name}", text, buckets=LATENCY_BUCKETS, registry=self.registry)

        self.requests = Counter(
            f"{PREFIX}_requests", "HTTP requests answered, by endpoint and status code",
            ["endpoint", "status"], registry=self.registry,
        )  # fmt: skip
        self.running = Gauge(
            f"{PREFIX}_requests_running", "Requests in the running batch", registry=self.registry
        )
        self.waiting = Gauge(
            f"{PREFIX}_requests_waiting", "Requests queued for a slot", registry=self.registry
        )
        self.batch_size = Histogram(
            f"{PREFIX}_batch_size", "Rows in the batch at each decode step",
            buckets=BATCH_BUCKETS, registry=self.registry,
        )  # fmt: skip
        self.engine_seconds = Histogram(
            f"{PREFIX}_engine_duration_seconds",
            "Engine time per prefill run, decode step and regroup (rows joining or leaving the cache)",
            ["phase"], buckets=LATENCY_BUCKETS, registry=self.registry,
        )  # fmt: skip
        self.time_to_first_token = latency(
            "time_to_first_token_seconds", "From arrival to the first generated token"
        )
        self.inter_token_latency = latency(
            "inter_token_latency_seconds", "Between consecutive generated tokens of a request"
        )
        self.queue_time = latency("request_queue_seconds", "From arrival to taking a slot (waiting for one)")
        self.request_duration = latency(
            "request_duration_seconds", "From arrival to the end of the completion"
        )
        self.finished = Counter(
            f"{PREFIX}_completions_finished", "Completions (one per choice) by how they ended: "
            "stop, length, cancelled, timeout, error", ["reason"], registry=self.registry,
        )  # fmt: skip
        self.prompt_tokens = Counter(f"{PREFIX}_prompt_tokens", "Prompt tokens read", registry=self.registry)
        self.generated_tokens = Counter(
            f"{PREFIX}_generated_tokens", "Tokens generated", registry=self.registry
        )

    def observe_batch(self, run: BatchRun) -> None:
        """The engine's `on_batch`: each piece of its work, and the rows of each decode step."""
        self.engine_seconds.labels(run.phase).observe(run.seconds)
        if run.phase == "decode":
            self.batch_size.observe(run.rows)

    def watch_engine(self, running: Callable[[], float], waiting: Callable[[], float]) -> None:
        """Read the running and waiting gauges from the engine at each scrape."""
        self.running.set_function(running)
        self.waiting.set_function(waiting)

    def render(self) -> bytes:
        return generate_latest(self.registry)
