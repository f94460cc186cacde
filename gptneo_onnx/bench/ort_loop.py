"""A minimal greedy decode loop over a gptneo-onnx export, for timing (numpy + onnxruntime only).

The KV cache is the runtime's own cache object (runtime/kv_cache.py), in either mode:
- `concat`: presents are fed back as the next pasts;
- `shared-buffer`: one (B, H, capacity, D) buffer per layer tensor, bound with IOBinding as
  both the past input and the present output, so onnxruntime writes new rows in place.
Exports with a windowed local cache keep only the newest rows for local layers, as the runtime does.
What the loop leaves out is the runtime's session logic: input checks, processors, stop rules.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnxruntime as ort

from gptneo_onnx.contract import MANIFEST_NAME, position_ids_from_mask
from gptneo_onnx.runtime.kv_cache import CacheSpec, cache_class, resolve_cache_mode
from gptneo_onnx.runtime.manifest import load_manifest


def session_options(threads: int | None = None, low_memory: bool = False) -> ort.SessionOptions:
    """`low_memory` disables weight prepacking: MLAS then keeps no packed copy of each MatMul
    weight and external-data weights stay memory-mapped. It stays on by default: the lm_head reads
    the embedding through aliased row slices, which prepacking does not copy, so it costs no
    memory, and packed weights make fp32 decode faster. Quantized graphs need it: MatMulNBits'
    fast CPU kernels run on prepacked blocks (docs/performance.md)."""
    options = ort.SessionOptions()
    options.log_severity_level = 3
    if threads:
        options.intra_op_num_threads = threads
    if low_memory:
        options.add_session_config_entry("session.disable_prepacking", "1")
    return options


class ExportDecoder:
    """Greedy decoding of a causal-lm export; `cache_mode` picks how the KV cache is carried."""

    def __init__(
        self,
        folder: str | Path,
        cache_mode: str = "concat",
        threads: int | None = None,
        low_memory: bool = False,
    ):
        """`low_memory`: see `session_options`."""
        if not (Path(folder) / MANIFEST_NAME).is_file():  # the worker's log names what it could not read
            raise FileNotFoundError(f"{Path(folder) / MANIFEST_NAME} not found: not an export folder")
        self.manifest = load_manifest(folder, task="causal-lm", verify_hashes=False)
        cache_mode = resolve_cache_mode(cache_mode, self.manifest.cache_modes)
        self.cache_class = cache_class(cache_mode, io_binding=False)
        self.spec = CacheSpec.from_manifest(self.manifest)
        self.session = ort.InferenceSession(
            str(self.manifest.graph_path),
            session_options(threads, low_memory),
            providers=["CPUExecutionProvider"],
        )
        self.io = self.manifest.io
        # format x.2 exports compute the lm_head for the last position only when asked
        keep = self.spec.num_logits_to_keep
        self.keep_last = {keep: np.array(1, np.int64)} if keep else {}

    def generate(
        self,
        input_ids: np.ndarray,
        attention_mask: np.ndarray,
        new_tokens: int,
        logits: list | None = None,
        on_token: Callable[[], None] | None = None,
    ) -> np.ndarray:
        """Greedy ids (B, new_tokens) after the (left-padded) prompt; no early stop at EOS.

        With `logits` given, each step's last-position logits (B, V) are appended to it;
        `on_token` is called as each new token is chosen.
        """
        batch = input_ids.shape[0]
        cache = self.cache_class.empty(self.spec, batch, input_ids.shape[1] + new_tokens)
        ids, mask, chosen = input_ids, attention_mask, []
        for _ in range(new_tokens):
            inputs = {
                self.io["input_ids"]: ids,
                self.io["attention_mask"]: mask,
                self.io["position_ids"]: position_ids_from_mask(mask, ids.shape[1]),
                **self.keep_last,
            }
            last = cache.run(self.session, inputs, mask)[:, -1]
            ids = last.argmax(-1)[:, None].astype(np.int64)
            if on_token is not None:
                on_token()
            if logits is not None:
                logits.append(last)
            chosen.append(ids)
            mask = np.concatenate([mask, np.ones((batch, 1), np.int64)], axis=1)
        return np.concatenate(chosen, axis=1)
