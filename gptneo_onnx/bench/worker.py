"""One system under test in its own process, serving timed generations to the benchmark.

    python -m gptneo_onnx.bench.worker KIND PATH

Each system gets a process of its own, as it would in deployment: what one system allocates
can't change how another's memory is laid out (the same onnxruntime session decodes faster or
slower depending on what was loaded into the process before it, so sharing a process would
measure the order of loading, not the system). The
parent still interleaves the systems scenario by scenario. Protocol, one JSON object per line:
the worker prints {"ready": true} once loaded; then for each request {"rows", "length", "new",
"seed", "vocab"} on stdin it prints `timed`'s result.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np


def prompt(rows: int, length: int, vocab: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(1, vocab, size=(rows, length), dtype=np.int64)


def timed(generate, ids: np.ndarray, new_tokens: int) -> dict:
    """Wall time, time to the first token, and the decode rate after it."""
    stamps: list[float] = []
    start = time.perf_counter()
    generate(ids, np.ones_like(ids), new_tokens, lambda: stamps.append(time.perf_counter()))
    total = time.perf_counter() - start
    decode = (len(stamps) - 1) / (stamps[-1] - stamps[0]) if len(stamps) > 1 else float("nan")
    return {"total_s": total, "first_token_s": stamps[0] - start, "decode_tok_s": decode}


class Worker:
    """The parent's handle on a worker process."""

    def __init__(self, kind: str, path: Path, log: Path):
        self.log_path = log
        self._log = open(log, "w")  # noqa: SIM115 - closed in close()
        self.process = subprocess.Popen(
            [sys.executable, "-m", "gptneo_onnx.bench.worker", kind, str(path)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._log,
            text=True,
        )
        self._read()  # {"ready": true}

    def timed(self, rows: int, length: int, new: int, seed: int, vocab: int) -> dict:
        request = {"rows": rows, "length": length, "new": new, "seed": seed, "vocab": vocab}
        self.process.stdin.write(json.dumps(request) + "\n")
        self.process.stdin.flush()
        return self._read()

    def _read(self) -> dict:
        line = self.process.stdout.readline()
        if not line:
            self.close()
            raise RuntimeError(f"benchmark worker failed; its log:\n{self.log_path.read_text()[-3000:]}")
        return json.loads(line)

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.stdin.close()
            self.process.wait(timeout=60)
        self._log.close()


def main(argv: list[str]) -> None:
    from gptneo_onnx.bench.runners import load_runner

    generate = load_runner(argv[0], Path(argv[1]))
    print(json.dumps({"ready": True}), flush=True)
    for line in sys.stdin:
        request = json.loads(line)
        ids = prompt(request["rows"], request["length"], request["vocab"], request["seed"])
        print(json.dumps(timed(generate, ids, request["new"])), flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
