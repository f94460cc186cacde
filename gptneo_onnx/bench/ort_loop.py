"""A minimal greedy decode loop over a gptneo-onnx export, for timing (numpy + onnxruntime only).

It reads the manifest (docs/sidecar.md) and supports both cache modes:
- `concat`: presents are fed back as the next pasts;
- `shared-buffer`: one (B, H, capacity, D) buffer per layer tensor, bound with IOBinding as
  both the past input and the present output, so onnxruntime writes new rows in place.
Exports with a windowed local cache keep only the newest rows for local layers, as the runtime does.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnxruntime as ort

from gptneo_onnx.runtime.causal_lm import bind_host_inputs
from gptneo_onnx.runtime.local_window import LocalWindow

PAIRS = (("past_key", "present_key"), ("past_value", "present_value"))


def session_options(threads: int | None = None, low_memory: bool = False) -> ort.SessionOptions:
    """`low_memory` disables weight prepacking: MLAS then keeps no packed copy of each MatMul
    weight and external-data weights stay memory-mapped. Since the lm_head reads the embedding
    through aliased row slices, prepacking no longer raises the peak (125m fp32: 582.7 MB with it,
    582.5 MB without) and it makes fp32 decode faster, so it stays on by default. Quantized graphs
    need it (MatMulNBits runs ~40x slower without)."""
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
        self.folder = Path(folder)
        self.manifest = json.loads((self.folder / "gptneo_onnx.json").read_text())
        modes = self.manifest["cache"].get("modes", [self.manifest["cache"]["mode"]])
        if cache_mode not in modes:
            raise ValueError(f"export supports cache modes {modes}, not {cache_mode!r}")
        self.cache_mode = cache_mode
        graph = str(self.folder / self.manifest["graph"]["file"])
        self.session = ort.InferenceSession(
            graph, session_options(threads, low_memory), providers=["CPUExecutionProvider"]
        )
        self.output_names = [output.name for output in self.session.get_outputs()]
        self.layers = self.manifest["cache"]["layers"]
        self.dtype = np.dtype(self.manifest["cache"]["dtype"])
        self.local = LocalWindow.from_cache(self.manifest["cache"])
        # format x.2 exports compute the lm_head for the last position only when asked
        keep = (self.manifest.get("io") or {}).get("num_logits_to_keep")
        self.keep_last = {keep: np.array(1, np.int64)} if keep else {}
        model = self.manifest["model"]
        self.num_heads, self.head_dim = model["num_heads"], model["head_dim"]

    def _empty(self, batch: int, length: int) -> np.ndarray:
        return np.zeros((batch, self.num_heads, length, self.head_dim), self.dtype)

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
        step = self._shared_steps if self.cache_mode == "shared-buffer" else self._concat_steps
        batch = input_ids.shape[0]
        ids, mask, chosen = input_ids, attention_mask, []
        runner = step(batch, input_ids.shape[1] + new_tokens)
        next(runner)
        for _ in range(new_tokens):
            positions = np.maximum(np.cumsum(mask, axis=1) - 1, 0)[:, -ids.shape[1] :]
            last = runner.send((ids, mask, positions))
            ids = last.argmax(-1)[:, None].astype(np.int64)
            if on_token is not None:
                on_token()
            if logits is not None:
                logits.append(last)
            chosen.append(ids)
            mask = np.concatenate([mask, np.ones((batch, 1), np.int64)], axis=1)
        runner.close()
        return np.concatenate(chosen, axis=1)

    def _concat_steps(self, batch: int, capacity: int):
        """A coroutine: send (ids, mask, positions), get last-position logits; presents become pasts."""
        past = {layer[name]: self._empty(batch, 0) for layer in self.layers for name, _ in PAIRS}
        last, held = None, 0  # held: rows in the local layers' caches
        while True:
            ids, mask, positions = yield last
            feed = {"input_ids": ids, "attention_mask": mask, "position_ids": positions, **past}
            feed.update(self.keep_last)
            if self.local:
                feed[self.local.input] = self.local.mask(mask, held, ids.shape[1])
            named = dict(zip(self.output_names, self.session.run(None, feed), strict=True))
            past = {layer[p]: named[layer[q]] for layer in self.layers for p, q in PAIRS}
            last = named["logits"][:, -1]
            if self.local:
                held = self.local.trim(past, held + ids.shape[1], in_place=False)

    def _shared_steps(self, batch: int, capacity: int):
        """The same coroutine in shared-buffer mode: one buffer per layer tensor, written in place."""
        arrays = {layer[p]: self._empty(batch, capacity) for layer in self.layers for p, _ in PAIRS}
        buffers = {name: ort.OrtValue.ortvalue_from_numpy(array) for name, array in arrays.items()}
        last, held = None, 0  # held: rows in the local layers' buffers
        while True:
            ids, mask, positions = yield last
            binding = self.session.io_binding()
            feed = {"input_ids": ids, "attention_mask": mask, "position_ids": positions, **self.keep_last}
            if self.local:
                feed[self.local.input] = self.local.mask(mask, held, ids.shape[1])
            bound = bind_host_inputs(binding, feed)
            binding.bind_output("logits")  # the first bound output: get_outputs()[0]
            for layer in self.layers:
                for p, q in PAIRS:
                    binding.bind_ortvalue_input(layer[p], buffers[layer[p]])
                    binding.bind_ortvalue_output(layer[q], buffers[layer[p]])
            self.session.run_with_iobinding(binding)
            del bound
            last = binding.get_outputs()[0].numpy()[:, -1]
            if self.local:
                held = self.local.trim(arrays, held + ids.shape[1], in_place=True)
