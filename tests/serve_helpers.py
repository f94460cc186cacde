"""Helpers for the server tests: a tiny export with a long context, and servers on 127.0.0.1
that are always stopped (in a thread of this process, or as a real `gptneo-onnx serve`)."""

from __future__ import annotations

import re
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx

CONTEXT = 2048  # long enough that a stream can outlast the checks made while it runs


def export_tiny_lm(root: Path) -> Path:
    """A tiny causal-lm export with a tokenizer, whose context fits long streams (made once per
    session under `root`, shared by the server test modules)."""
    from runtime_helpers import export_tiny, train_tokenizer

    if (root / "export" / "gptneo_onnx.json").is_file():
        return root / "export"
    root.mkdir(parents=True, exist_ok=True)
    tokenizer = train_tokenizer(root / "tokenizer.json")
    options = {"validate": False}
    return export_tiny(
        "causal-lm", root / "export", tokenizer, export_options=options,
        vocab_size=320, max_position_embeddings=CONTEXT,
    )[1]  # fmt: skip


@contextmanager
def app_server(state, **app_options) -> Iterator[str]:
    """Serve `create_app(state)` with uvicorn in a thread; yields the base URL; always stopped."""
    import uvicorn

    from gptneo_onnx.serve.api import create_app
    from gptneo_onnx.serve.server import listen

    sock = listen("127.0.0.1", 0)
    config = uvicorn.Config(create_app(state, **app_options), log_level="warning", lifespan="on")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    try:
        wait_healthy(url, timeout=60)
        yield url
    finally:
        server.should_exit = True
        thread.join(timeout=15)
        sock.close()


def wait_healthy(url: str, timeout: float, process: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        if process is not None and process.poll() is not None:
            raise AssertionError(f"the server exited with {process.returncode}: {process.stderr.read()}")
        time.sleep(0.05)
    raise AssertionError(f"{url} did not become healthy within {timeout} s")


def cli_command() -> list[str]:
    """The installed `gptneo-onnx` script beside this interpreter, else `python -m gptneo_onnx.cli`."""
    script = Path(sys.executable).with_name("gptneo-onnx")
    return [str(script)] if script.is_file() else [sys.executable, "-m", "gptneo_onnx.cli"]


@contextmanager
def cli_server(*arguments: str, timeout: float = 60) -> Iterator[tuple[subprocess.Popen, str]]:
    """A real `gptneo-onnx serve ...` subprocess on a free port; yields (process, url); killed at the end."""
    command = [*cli_command(), "serve", *arguments]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        url, said = None, []
        deadline = time.monotonic() + timeout
        while url is None and time.monotonic() < deadline:
            line = process.stderr.readline()
            said.append(line)
            if not line and process.poll() is not None:
                tail = "".join(said)[-3000:]
                raise AssertionError(f"the server exited with {process.returncode} before serving:\n{tail}")
            found = re.search(r"on (http://\S+)", line)
            url = found.group(1) if found else None
        assert url is not None, f"the server never said where it listens:\n{''.join(said)[-3000:]}"
        wait_healthy(url, timeout=max(1.0, deadline - time.monotonic()), process=process)
        yield process, url
    finally:
        if process.poll() is None:  # SIGTERM first: a Ray driver shuts its cluster down on it
            process.terminate()
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
        process.wait(timeout=30)


def free_port() -> int:
    from gptneo_onnx.serve.server import listen

    sock = listen("127.0.0.1", 0)
    port = sock.getsockname()[1]
    sock.close()
    return port
