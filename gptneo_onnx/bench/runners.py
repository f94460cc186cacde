"""One greedy `generate` per system under test, all with the same signature.

`generate(ids, mask, new_tokens, on_token)` produces exactly `new_tokens` per row (EOS never
stops it) and calls `on_token()` as each new token is chosen, so the caller can time the first
token (prefill) and the rest (decode) separately. Heavy imports happen inside `load_runner`, so
a cold-start process imports only what its system needs.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np

Generate = Callable[[np.ndarray, np.ndarray, int, Callable[[], None]], None]


class _TokenStreamer:
    """transformers' streamer protocol: the first `put` is the prompt, then one per new token."""

    def __init__(self, on_token: Callable[[], None]):
        self.on_token = on_token
        self.seen_prompt = False

    def put(self, value) -> None:
        if self.seen_prompt:
            self.on_token()
        self.seen_prompt = True

    def end(self) -> None:
        pass


def _hf_generate(model, torch) -> Generate:
    model.generation_config.eos_token_id = None  # random weights: never stop early
    model.generation_config.pad_token_id = 0

    def generate(ids, mask, new_tokens, on_token):
        with torch.inference_mode():
            model.generate(
                input_ids=torch.from_numpy(ids),
                attention_mask=torch.from_numpy(mask),
                max_new_tokens=new_tokens,
                min_new_tokens=new_tokens,
                do_sample=False,
                streamer=_TokenStreamer(on_token),
            )

    return generate


def _runtime_generate(path: Path, threads: int | None) -> Generate:
    from gptneo_onnx.runtime import Model, TokenStep

    model = Model.load(path, provider="cpu", intra_op_threads=threads)

    def generate(ids, mask, new_tokens, on_token):
        prompts = [row[row_mask.astype(bool)].tolist() for row, row_mask in zip(ids, mask, strict=True)]
        options = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
        for event in model.generate_steps(prompts, **options):
            if isinstance(event, TokenStep):
                on_token()

    return generate


def load_runner(kind: str, path: Path, threads: int | None = None) -> Generate:
    """kind: `ours`, `ours-shared` (bench loop, concat or shared-buffer cache), `runtime` (the
    project's `gptneo_onnx.runtime`, as it chooses), `transformers` or `optimum`."""
    if kind in ("ours", "ours-shared"):
        from gptneo_onnx.bench.ort_loop import ExportDecoder

        decoder = ExportDecoder(path, "shared-buffer" if kind == "ours-shared" else "concat", threads)

        def generate(ids, mask, new_tokens, on_token):
            decoder.generate(ids, mask, new_tokens, on_token=on_token)

        return generate
    if kind == "runtime":
        return _runtime_generate(path, threads)
    import torch

    if threads:
        torch.set_num_threads(threads)
    if kind == "transformers":
        from transformers import GPTNeoForCausalLM

        return _hf_generate(GPTNeoForCausalLM.from_pretrained(path).eval(), torch)
    if kind == "optimum":
        from optimum.onnxruntime import ORTModelForCausalLM

        return _hf_generate(ORTModelForCausalLM.from_pretrained(path, use_cache=True), torch)
    raise ValueError(f"unknown runner kind {kind!r}")
