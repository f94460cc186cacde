"""The server's limits: a full queue answers 429 with Retry-After, and a client that drops its
stream frees its slot at once, so the queued request starts."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

pytest.importorskip("fastapi")
from serve_helpers import app_server, export_tiny_lm  # noqa: E402

from gptneo_onnx.runtime import CausalLM  # noqa: E402
from gptneo_onnx.serve.api import ServerState  # noqa: E402
from gptneo_onnx.serve.engine import EngineLimits  # noqa: E402


@pytest.fixture(scope="module")
def export(tmp_path_factory):
    return export_tiny_lm(tmp_path_factory.getbasetemp() / "serve-lm")


@pytest.fixture(scope="module")
def one_slot_server(export):
    """One slot and a queue of one."""
    load = lambda: CausalLM.load(export, intra_op_threads=1)
    with app_server(ServerState(load, "tiny", EngineLimits(max_concurrent=1, max_queue=1))) as url:
        yield url


def long_request(tokens: int = 1500, stream: bool = False) -> dict:
    """A request that takes long enough (about a second or more) to hold its slot."""
    return {
        "prompt": "Once upon a time",
        "max_tokens": tokens,
        "min_tokens": tokens,
        "temperature": 0,
        "stream": stream,
    }


def test_full_slots_and_queue_answer_429_with_retry_after(one_slot_server):
    barrier = threading.Barrier(4)

    def send(index: int) -> httpx.Response:
        barrier.wait(timeout=10)
        return httpx.post(f"{one_slot_server}/v1/completions", json=long_request(200), timeout=60)

    with ThreadPoolExecutor(4) as pool:
        responses = list(pool.map(send, range(4)))
    statuses = sorted(response.status_code for response in responses)
    assert statuses == [200, 200, 429, 429]
    for response in responses:
        if response.status_code == 429:
            assert int(response.headers["Retry-After"]) >= 1
            assert response.json()["error"]["type"] == "rate_limit_error"
        else:
            assert response.json()["usage"]["completion_tokens"] == 200


def test_a_dropped_stream_frees_its_slot_for_the_queued_request(one_slot_server):
    url = f"{one_slot_server}/v1/completions"
    first_token_of_queued: dict[str, float] = {}
    dropped_at: dict[str, float] = {}
    started = threading.Event()

    def queued() -> None:
        started.wait(timeout=10)
        with httpx.stream("POST", url, json=long_request(5, stream=True), timeout=60) as response:
            assert response.status_code == 200
            for line in response.iter_lines():
                if line.startswith("data: {"):
                    first_token_of_queued.setdefault("at", time.monotonic())

    waiter = threading.Thread(target=queued)
    waiter.start()
    try:
        with httpx.stream("POST", url, json=long_request(1800, stream=True), timeout=60) as response:
            assert response.status_code == 200
            chunks = 0
            for line in response.iter_lines():
                if line.startswith("data: {"):
                    chunks += 1
                    if chunks == 1:
                        started.set()
                        time.sleep(0.2)  # the second request is in the queue now
                    if chunks == 3:
                        break
            dropped_at["at"] = time.monotonic()
        # leaving the block closes the connection: the client is gone
    finally:
        started.set()
        waiter.join(timeout=30)
    assert "at" in first_token_of_queued, "the queued request never started"
    assert first_token_of_queued["at"] - dropped_at["at"] < 1.0
