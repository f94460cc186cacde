"""One replica in this process: uvicorn serving the app, with a draining SIGTERM.

uvicorn alone stops listening at SIGTERM, so clients would see refused connections. Here the
first SIGTERM (or Ctrl-C) only starts a drain: /health and new requests answer 503, running
requests finish for up to `shutdown_timeout` seconds, the engine ends the rest, then uvicorn
exits. A second Ctrl-C exits at once.
"""

from __future__ import annotations

import signal
import socket
import sys
import threading
from types import FrameType

import uvicorn

from gptneo_onnx.serve.access import Access
from gptneo_onnx.serve.api import ServerState, create_app


class DrainingServer(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, state: ServerState, shutdown_timeout: float):
        super().__init__(config)
        self.state, self.shutdown_timeout = state, shutdown_timeout
        self._drain: threading.Thread | None = None

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if self._drain is not None:  # a second signal: stop now
            if sig == signal.SIGINT:
                self.force_exit = True
            self.should_exit = True
            return
        print(f"draining (up to {self.shutdown_timeout:g} s), then exiting", file=sys.stderr, flush=True)
        self._drain = threading.Thread(target=self._drain_then_exit, name="gptneo-onnx-drain", daemon=True)
        self._drain.start()

    def _drain_then_exit(self) -> None:
        try:
            self.state.drain(self.shutdown_timeout)
        finally:
            self.should_exit = True


def listen(host: str, port: int) -> socket.socket:
    """Bind before loading anything: a taken port is one clear error, not a log line later."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as error:
        sock.close()
        raise OSError(f"cannot listen on {host}:{port}: {error.strerror or error}") from None
    sock.listen(2048)
    return sock


def serve_forever(
    state: ServerState, host: str, port: int, shutdown_timeout: float, access: Access | None = None
) -> int:
    """Serve until a SIGTERM or Ctrl-C has drained the server; returns the exit code."""
    sock = listen(host, port)
    bound_host, bound_port = sock.getsockname()[:2]
    config = uvicorn.Config(
        create_app(state, access=access), log_level="warning", access_log=False, timeout_graceful_shutdown=5
    )
    server = DrainingServer(config, state, shutdown_timeout)
    print(
        f"serving {state.model_name!r} on http://{bound_host}:{bound_port} (loading)",
        file=sys.stderr,
        flush=True,
    )
    server.run(sockets=[sock])
    return 0
