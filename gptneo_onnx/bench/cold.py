"""Cold start and peak RSS, measured in a fresh process.

    python -m gptneo_onnx.bench.cold KIND PATH PROMPT NEW


Prints one JSON line: `first_token_at` (time.time() when the first token was chosen; the parent
subtracts its spawn time), and `peak_rss_mb` (VmHWM after generating NEW tokens; not ru_maxrss,
which on Linux keeps the forking parent's peak across exec).
"""

from __future__ import annotations

import json
import resource
import sys
import time
from pathlib import Path


def peak_rss_mb() -> float:
    """This process's peak resident set size (Linux VmHWM; ru_maxrss elsewhere)."""
    status = Path("/proc/self/status")
    if status.is_file():
        for line in status.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024  # kB
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main(argv: list[str]) -> None:
    kind, path, prompt, new_tokens = argv[0], Path(argv[1]), int(argv[2]), int(argv[3])
    import numpy as np

    from gptneo_onnx.bench.runners import load_runner

    generate = load_runner(kind, path)
    ids = np.random.default_rng(0).integers(1, 500, size=(1, prompt), dtype=np.int64)
    stamps: list[float] = []
    generate(ids, np.ones_like(ids), new_tokens, lambda: stamps.append(time.time()))
    peak = peak_rss_mb()
    print(json.dumps({"first_token_at": stamps[0], "peak_rss_mb": peak}), flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
