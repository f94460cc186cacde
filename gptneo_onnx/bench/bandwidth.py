"""The decode wall: the machine's read bandwidth, and how many bytes a decode step must read.

Batch-1 decoding reads every weight once per token (the lm_head included), plus the KV cache.
Bytes per token times tokens per second is the bandwidth a variant uses; against what this
machine can read at all (numpy sums over an array far larger than the caches, on every core),
that says how close to the wall it runs.
"""

from __future__ import annotations

import os
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from gptneo_onnx.contract import MANIFEST_NAME
from gptneo_onnx.runtime.manifest import Manifest, read_manifest

# Far larger than any last-level cache: every pass reads from memory.
PROBE_BYTES = 512 << 20
# Inputs 0 of these ops are tables read one row per token, not whole.
ROW_GATHERS = {"Gather", "GatherBlockQuantized"}
ELEMENT_BITS = {1: 32, 10: 16, 16: 16, 7: 64, 6: 32, 2: 8, 3: 8, 21: 4, 22: 4}  # onnx TensorProto types


def read_bandwidth(threads: int | None = None, repeats: int = 5) -> float:
    """Best observed read bandwidth in bytes/s: `threads` (default: every core) each sum a part
    of one PROBE_BYTES array; numpy releases the GIL in the reduction."""
    threads = threads or os.cpu_count() or 1
    data = np.ones(PROBE_BYTES // 4, np.float32)
    parts = np.array_split(data, threads)
    best = 0.0
    with ThreadPoolExecutor(threads) as pool:
        for _ in range(repeats):
            start = time.perf_counter()
            list(pool.map(np.sum, parts))
            best = max(best, data.nbytes / (time.perf_counter() - start))
    return best


def weight_bytes_per_token(graph: Path) -> int:
    """Bytes of the initializers a batch-1 decode step reads: all of them except tables that only
    row gathers (embedding lookups) consume. Aliased row views of one table count once each."""
    import onnx

    model = onnx.load(str(graph), load_external_data=False)
    consumers: dict[str, set[tuple[str, int]]] = {}
    for node in model.graph.node:
        for index, name in enumerate(node.input):
            consumers.setdefault(name, set()).add((node.op_type, index))
    total = 0
    for tensor in model.graph.initializer:
        uses = consumers.get(tensor.name, set())
        if not uses or all(op in ROW_GATHERS and index == 0 for op, index in uses):
            continue
        elements = int(np.prod(tensor.dims)) if tensor.dims else 1
        total += elements * ELEMENT_BITS.get(tensor.data_type, 32) // 8
    return total


def kv_bytes_per_token(manifest: Manifest, context: int) -> int:
    """KV-cache bytes one decode step reads at `context` tokens: keys and values of every layer
    (local layers of a windowed cache hold at most min_rows + slack rows)."""
    itemsize = np.dtype(manifest.cache_dtype).itemsize
    local = manifest.local_window
    most_local_rows = context if local is None else min(context, local.min_rows + local.slack)
    total = 0
    for layer in manifest.cache_layers:
        rows = most_local_rows if layer.window else context
        total += 2 * rows * manifest.model["num_heads"] * manifest.model["head_dim"] * itemsize
    return total


def bytes_per_token(folder: Path, context: int) -> int | None:
    """What one decode step of the system in `folder` reads: one of our exports (the manifest
    says the graph and the cache), an Optimum folder (model.onnx; every layer caches every row),
    or None for PyTorch checkpoints."""
    import json

    if (folder / MANIFEST_NAME).is_file():
        manifest = read_manifest(folder)
        return weight_bytes_per_token(manifest.graph_path) + kv_bytes_per_token(manifest, context)
    if (folder / "model.onnx").is_file():
        config = json.loads((folder / "config.json").read_text())
        kv = 2 * context * config["hidden_size"] * 4 * config["num_layers"]
        return weight_bytes_per_token(folder / "model.onnx") + kv
    return None


def percent_of_limit(bytes_per_token: float, tokens_per_s: float, limit: float) -> tuple[float, float]:
    """(effective GB/s, percentage of `limit` bytes/s)."""
    used = bytes_per_token * tokens_per_s
    return used / 1e9, 100.0 * used / limit
