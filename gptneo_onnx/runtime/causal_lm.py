"""CausalLM: one forward step with an explicit KV cache, and generation on top of it.

The cache follows the sidecar's `concat` mode: the graph returns present = concat(past, new);
each step feeds the presents back as the next pasts. On CUDA / TensorRT the presents stay on
the device as OrtValues (IO binding): only the logits come back to the host each step.
Optimized exports that list `shared-buffer` in `cache.modes` run with one preallocated
(B, H, capacity, D) buffer per layer tensor, bound as both past and present and written in
place by the graph, so no cache is copied per step. Exports with a windowed local cache keep only
the newest rows for local layers (runtime/local_window.py), on the CPU; device caches keep all.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnxruntime as ort

from gptneo_onnx.runtime.beam_search import BeamStep, beam_search
from gptneo_onnx.runtime.encoding import (
    Prompt,
    as_batch,
    check_length,
    check_position_ids,
    check_token_ids,
    encode_prompts,
    left_pad,
    position_ids_from_mask,
    step_inputs,
)
from gptneo_onnx.runtime.errors import GenerationConfigError, InputError
from gptneo_onnx.runtime.generation import GenerationConfig, GenerationResult, StopCheck, TokenStep, decode
from gptneo_onnx.runtime.local_window import LocalWindow
from gptneo_onnx.runtime.model import Model
from gptneo_onnx.runtime.prompt_lookup import prompt_lookup_decode
from gptneo_onnx.runtime.streaming import first_stop_index, stream_text


def gpu_attention_advice(manifest: dict, provider: str) -> str | None:
    """A warning for fp32 fused attention on a GPU: onnxruntime's GroupQueryAttention has CUDA
    kernels for fp16/bf16 only, so it runs fp32 GQA on the CPU (measured on an H200: 0.13x the
    portable graph's decode rate after 1,500 tokens)."""
    attention = (manifest.get("optimization") or {}).get("attention")
    if provider not in ("cuda", "tensorrt") or attention != "GroupQueryAttention":
        return None
    if manifest.get("precision") != "float32":
        return None
    return (
        "this optimized float32 export runs GroupQueryAttention on the CPU under CUDA (onnxruntime "
        "has GPU kernels for float16 only); for GPUs export with --optimize --precision float16, "
        "or use the portable flavor for float32"
    )


def host_cache_limit() -> int | None:
    """The default `max_cache_bytes` for a host-resident cache: 3/4 of physical memory. Past it the
    kernel's OOM killer would end the process mid-generation, with no error at all."""
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") * 3 // 4
    except (ValueError, OSError, AttributeError):  # not a POSIX system that reports it
        return None


def bind_host_inputs(binding: ort.IOBinding, feeds: dict[str, np.ndarray]) -> list[ort.OrtValue]:
    """Bind host arrays as inputs. Through OrtValues: `bind_cpu_input` can't find inputs that
    have a default (`num_logits_to_keep`). Keep the returned values until the run is done."""
    values = [
        ort.OrtValue.ortvalue_from_numpy(np.require(array, requirements="C")) for array in feeds.values()
    ]
    for name, value in zip(feeds, values):
        binding.bind_ortvalue_input(name, value)
    return values


@dataclass
class KVCache:
    """Per-layer past keys and values, keyed by the graph's past input names.

    Values are numpy arrays, or OrtValues when they live on a device (IO binding).
    """

    values: dict[str, Any]
    length: int  # past_sequence_length: rows [0, length) of each value are filled
    binding: Any = field(default=None, repr=False, compare=False)  # shared-buffer: bound once
    local_length: int | None = None  # rows the local layers hold (windowed local cache), else None

    @property
    def local_rows(self) -> int:
        return self.length if self.local_length is None else self.local_length


class CausalLM(Model):
    """A causal-lm export: `forward` one step, or `generate` / `stream` text.

    One instance may serve many threads at once: every call makes its own KV cache, IO binding
    and shared buffers, and nothing per request is stored on the model (onnxruntime's
    `InferenceSession.run` is thread-safe). tests/test_sustained_load.py checks this.
    """

    task = "causal-lm"

    def __init__(
        self,
        *args: Any,
        io_binding: bool | None = None,
        cache_mode: str = "auto",
        max_cache_bytes: int | None = None,
    ):
        """`max_cache_bytes`: refuse, before the first step, a generation whose KV cache would
        need more (default: 3/4 of physical memory when the cache lives on the host; none on a
        GPU, where onnxruntime reports a failed allocation itself)."""
        super().__init__(*args)
        self.layers = self.manifest.cache_layers
        self.io = self.manifest.io  # graph names by role
        self.cache_dtype = np.dtype(self.manifest.cache_dtype)
        model = self.manifest.model
        self._num_heads, self._head_dim = int(model["num_heads"]), int(model["head_dim"])
        # IO binding keeps the cache on the GPU; `io_binding=True` forces it on CPU too (for tests).
        self.io_binding = self.provider in ("cuda", "tensorrt") if io_binding is None else io_binding
        self._device = (
            ("cuda", self.options.device_id) if self.provider in ("cuda", "tensorrt") else ("cpu", 0)
        )
        modes = (self.manifest.raw.get("cache") or {}).get("modes") or ["concat"]
        if cache_mode == "auto":
            cache_mode = "shared-buffer" if "shared-buffer" in modes else "concat"
        if cache_mode not in modes:
            raise InputError(f"cache_mode {cache_mode!r} is not offered by this export; it offers {modes}")
        self.cache_mode = cache_mode
        optimization = self.manifest.raw.get("optimization") or {}
        self._multi_token_step_max_batch = optimization.get("multi_token_step_max_batch")
        self._local_window = LocalWindow.from_cache(self.manifest.raw.get("cache") or {})
        advice = gpu_attention_advice(self.manifest.raw, self.provider)
        if advice:
            warnings.warn(advice, stacklevel=3)
        if cache_mode == "shared-buffer":
            self.io_binding = True  # the buffers are bound as both input and output
        on_host = self._device[0] == "cpu"
        self.max_cache_bytes = (
            max_cache_bytes if max_cache_bytes is not None else (host_cache_limit() if on_host else None)
        )

    # ---- one step ---------------------------------------------------------------------------
    def forward(
        self,
        input_ids: np.ndarray,
        attention_mask: np.ndarray,
        position_ids: np.ndarray | None = None,
        past: KVCache | None = None,
        capacity: int | None = None,
        num_logits_to_keep: int = 0,
    ) -> tuple[np.ndarray, KVCache]:
        """Run the graph on new tokens; returns logits (B, S, V) float32 and the grown cache
        (`num_logits_to_keep` K > 0: logits of the last K positions only, (B, min(K, S), V); on a
        past, a windowed local cache then keeps K - 1 rows beyond `min_rows`, see drop_newest_rows).

        `attention_mask` covers past + new tokens. `position_ids` default to the sidecar rule
        (cumsum(mask) - 1, clipped at 0, for the new tokens). `capacity` sizes the buffers of a
        shared-buffer cache at the prefill (default max_position_embeddings).
        """
        if past is not None and not isinstance(past, KVCache):
            raise InputError(f"past must be a KVCache from this model's forward, got {type(past).__name__}")
        past_length = 0 if past is None else past.length
        input_ids, attention_mask = step_inputs(
            input_ids, attention_mask, past_length, self.manifest.vocab_size
        )
        batch, length = input_ids.shape
        if past_length + length > self.manifest.max_position_embeddings:
            raise InputError(
                f"{past_length + length} tokens exceed max_position_embeddings "
                f"({self.manifest.max_position_embeddings})"
            )
        if past is not None:
            self._check_past(past, batch)
        local_held = 0 if past is None else past.local_rows
        if position_ids is None:
            position_ids = position_ids_from_mask(attention_mask, length)
        else:
            position_ids = check_position_ids(
                position_ids, (batch, length), self.manifest.max_position_embeddings
            )
        if not (isinstance(num_logits_to_keep, (int, np.integer)) and num_logits_to_keep >= 0):
            raise InputError(f"num_logits_to_keep must be an integer >= 0, got {num_logits_to_keep!r}")
        if past_length and length > 1 and batch > (self._multi_token_step_max_batch or batch):
            return self._forward_by_rows(input_ids, attention_mask, position_ids, past, num_logits_to_keep)
        feeds = {
            self.io["input_ids"]: input_ids,
            self.io["attention_mask"]: attention_mask,
            self.io["position_ids"]: position_ids,
        }
        if num_logits_to_keep and self.io.get("num_logits_to_keep"):  # format >= x.2 graphs
            feeds[self.io["num_logits_to_keep"]] = np.array(num_logits_to_keep, np.int64)
        if self._local_window is not None:
            feeds[self._local_window.input] = self._local_window.mask(attention_mask, local_held, length)
        if past is None:
            if capacity is not None and not (isinstance(capacity, int) and capacity >= length):
                raise InputError(
                    f"capacity must be an integer >= the prompt length ({length}), got {capacity!r}"
                )
            past = self._empty_cache(batch, capacity)
        if self.cache_mode == "shared-buffer":
            room = past.values[self.layers[0].past_key].shape()[2]
            if past_length + length > room:
                raise InputError(
                    f"{past_length + length} tokens exceed the cache capacity ({room}); "
                    "pass a larger capacity at the prefill"
                )
        if self.io_binding:
            logits, cache = self._forward_bound(feeds, past)
        else:
            outputs = dict(
                zip(self._output_names(), self.session.run(self._output_names(), {**feeds, **past.values}))
            )
            logits = outputs[self.io["logits"]].astype(np.float32, copy=False)
            cache = self._next_cache(outputs, past.length + length)
        if num_logits_to_keep:
            logits = logits[:, -num_logits_to_keep:]  # older exports return every position
        # A step on a past that asks for several positions' logits verifies drafts (prompt lookup):
        # the rows after the first rejected one are dropped again, so local layers keep them spare.
        spare = min(num_logits_to_keep, length) - 1 if past_length and num_logits_to_keep else 0
        return logits, self._trim_local(cache, local_held + length, spare)

    def _trim_local(self, cache: KVCache, rows: int, spare: int = 0) -> KVCache:
        """Windowed local cache: the local layers now hold `rows` rows; past `min_rows + spare +
        slack`, keep only the newest `min_rows + spare` (on the CPU; a device cache keeps every row)."""
        local = self._local_window
        if local is None:
            return cache
        if self._device[0] != "cpu" or local.rows_to_keep(rows, spare) == rows:
            cache.local_length = rows
            return cache
        # numpy() of a CPU OrtValue is a view of it: shared buffers are trimmed in place.
        arrays = {
            name: value.numpy() if isinstance(value, ort.OrtValue) else value
            for name, value in cache.values.items()
            if name in local.past_names
        }
        in_place = self.cache_mode == "shared-buffer"
        cache.local_length = local.trim(arrays, rows, in_place, spare)
        if not in_place:
            for name, array in arrays.items():
                cache.values[name] = ort.OrtValue.ortvalue_from_numpy(array) if self.io_binding else array
        return cache

    def _forward_by_rows(
        self,
        input_ids: np.ndarray,
        attention_mask: np.ndarray,
        position_ids: np.ndarray,
        past: KVCache,
        num_logits_to_keep: int = 0,
    ) -> tuple[np.ndarray, KVCache]:
        """A multi-token step on top of a past, one batch row at a time: the graph's fused attention
        takes only batch 1 there (the sidecar's `multi_token_step_max_batch`)."""
        if self.cache_mode == "shared-buffer":
            raise InputError(
                "this export runs a multi-token step with a past one batch row at a time, which the "
                "shared-buffer cache can't split; load it with cache_mode='concat'"
            )
        host = {
            name: value.numpy() if isinstance(value, ort.OrtValue) else value
            for name, value in past.values.items()
        }
        logits, caches, caches_local_length = [], [], None
        for row in range(input_ids.shape[0]):
            row_past = KVCache(
                {name: value[row : row + 1] for name, value in host.items()},
                past.length,
                None,
                past.local_length,
            )
            rows = slice(row, row + 1)
            row_logits, row_cache = self.forward(
                input_ids[rows], attention_mask[rows], position_ids[rows], row_past, None, num_logits_to_keep
            )
            logits.append(row_logits)
            caches.append(row_cache.values)
            caches_local_length = row_cache.local_length  # every row trims alike
        values = {}
        for name in host:
            parts = [c[name].numpy() if isinstance(c[name], ort.OrtValue) else c[name] for c in caches]
            joined = np.ascontiguousarray(np.concatenate(parts, axis=0))
            values[name] = (
                ort.OrtValue.ortvalue_from_numpy(joined, *self._device) if self.io_binding else joined
            )
        rows_cache = KVCache(values, past.length + input_ids.shape[1], None, caches_local_length)
        return np.concatenate(logits, axis=0), rows_cache

    def _check_past(self, past: KVCache, batch: int) -> None:
        """The cache must be one this model made, for the same batch."""
        expected = {name for layer in self.layers for name in (layer.past_key, layer.past_value)}
        if set(past.values) != expected:
            raise InputError("past must be the KVCache returned by this model's previous forward call")
        for value in past.values.values():
            shape = value.shape() if isinstance(value, ort.OrtValue) else value.shape
            if shape[0] != batch:
                raise InputError(f"past holds a batch of {shape[0]} rows but input_ids has {batch}")

    def _output_names(self) -> list[str]:
        names = [self.io["logits"]]
        for layer in self.layers:
            names += [layer.present_key, layer.present_value]
        return names

    def _next_cache(self, outputs: dict[str, Any], length: int) -> KVCache:
        values = {}
        for layer in self.layers:
            values[layer.past_key] = outputs[layer.present_key]
            values[layer.past_value] = outputs[layer.present_value]
        return KVCache(values, length)

    def _empty_cache(self, batch: int, capacity: int | None = None) -> KVCache:
        shape = (batch, self._num_heads, 0, self._head_dim)
        values = {}
        if self.cache_mode == "shared-buffer":
            capacity = capacity or self.manifest.max_position_embeddings
            # np.zeros per buffer (not one copied): the OS maps pages as rows are written, so
            # capacity that is never reached costs no memory and nothing is written up front.
            buffer_shape = (batch, self._num_heads, capacity, self._head_dim)
        for layer in self.layers:
            for name in (layer.past_key, layer.past_value):
                if self.cache_mode == "shared-buffer":
                    device, device_id = self._device
                    zeros = np.zeros(buffer_shape, dtype=self.cache_dtype)
                    values[name] = ort.OrtValue.ortvalue_from_numpy(zeros, device, device_id)
                elif self.io_binding:
                    device, device_id = self._device
                    values[name] = ort.OrtValue.ortvalue_from_shape_and_type(
                        shape, self.cache_dtype.type, device, device_id
                    )
                else:
                    values[name] = np.zeros(shape, dtype=self.cache_dtype)
        return KVCache(values, 0)

    def _forward_bound(self, feeds: dict[str, np.ndarray], past: KVCache) -> tuple[np.ndarray, KVCache]:
        """The IO-binding path: pasts and presents stay where the provider runs; logits come to host."""
        if self.cache_mode == "shared-buffer":
            return self._forward_in_place(feeds, past)
        device, device_id = self._device
        binding = self.session.io_binding()
        bound = bind_host_inputs(binding, feeds)
        for name, value in past.values.items():
            if isinstance(value, np.ndarray):
                value = ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(value), device, device_id)
            binding.bind_ortvalue_input(name, value)
        binding.bind_output(self.io["logits"], "cpu")
        for layer in self.layers:
            binding.bind_output(layer.present_key, device, device_id)
            binding.bind_output(layer.present_value, device, device_id)
        self.session.run_with_iobinding(binding)
        del bound
        outputs = dict(zip(self._output_names(), binding.get_outputs()))
        logits = outputs.pop(self.io["logits"]).numpy().astype(np.float32, copy=False)
        return logits, self._next_cache(outputs, past.length + feeds[self.io["input_ids"]].shape[1])

    def _forward_in_place(self, feeds: dict[str, np.ndarray], past: KVCache) -> tuple[np.ndarray, KVCache]:
        """Shared-buffer cache: each buffer is bound as both past and present once per sequence
        (the binding rides on the KVCache) and written in place; a step rebinds only the token
        inputs and a fresh host array for the logits, so nothing else is copied or re-wrapped."""
        binding, values = past.binding, past.values
        if binding is None:
            device, device_id = self._device
            binding, values = self.session.io_binding(), {}
            for layer in self.layers:
                for past_name, present_name in (
                    (layer.past_key, layer.present_key),
                    (layer.past_value, layer.present_value),
                ):
                    value = past.values[past_name]
                    if isinstance(value, np.ndarray):
                        value = ort.OrtValue.ortvalue_from_numpy(
                            np.ascontiguousarray(value), device, device_id
                        )
                    binding.bind_ortvalue_input(past_name, value)
                    binding.bind_ortvalue_output(present_name, value)
                    values[past_name] = value
        bound = bind_host_inputs(binding, feeds)
        batch, length = feeds[self.io["input_ids"]].shape
        kept = int(feeds.get(self.io.get("num_logits_to_keep"), 0)) or length
        logits = np.empty((batch, min(kept, length), self.manifest.vocab_size), np.float32)
        binding.bind_ortvalue_output(self.io["logits"], ort.OrtValue.ortvalue_from_numpy(logits))
        self.session.run_with_iobinding(binding)
        del bound
        return logits, KVCache(values, past.length + length, binding)

    def reorder_cache(self, cache: KVCache, rows: np.ndarray) -> KVCache:
        """Select batch rows of the cache (beam search). Device values make a host round trip."""
        reordered = {}
        for name, value in cache.values.items():
            if isinstance(value, ort.OrtValue):
                array = np.ascontiguousarray(value.numpy()[rows])
                reordered[name] = ort.OrtValue.ortvalue_from_numpy(array, *self._device)
            else:
                reordered[name] = value[rows]
        return KVCache(reordered, cache.length, None, cache.local_length)

    def drop_newest_rows(self, cache: KVCache, rows: int) -> KVCache:
        """The cache without its newest `rows` rows (rejected prompt-lookup drafts). Shared
        buffers just lower the length; concat caches are sliced (device values via the host)."""
        if rows == 0:
            return cache
        local = self._local_window.past_names if self._local_window is not None else frozenset()
        local_length = None if cache.local_length is None else cache.local_length - rows
        if self.cache_mode == "shared-buffer":
            return KVCache(cache.values, cache.length - rows, cache.binding, local_length)
        values = {}
        for name, value in cache.values.items():
            array = value.numpy() if isinstance(value, ort.OrtValue) else value
            keep = local_length if name in local and local_length is not None else cache.length - rows
            array = np.ascontiguousarray(array[:, :, :keep])
            values[name] = (
                ort.OrtValue.ortvalue_from_numpy(array, *self._device) if self.io_binding else array
            )
        return KVCache(values, cache.length - rows, None, local_length)

    # ---- generation -------------------------------------------------------------------------
    def generation_config(self, config: GenerationConfig | None = None, **options: Any) -> GenerationConfig:
        """The export's decoding defaults, then `config`, then keyword overrides."""
        if config is None:
            return GenerationConfig.from_defaults(self.manifest.generation, **options)
        return config.updated(**options)

    def generate_steps(
        self, prompts: Prompt | list[Prompt], config: GenerationConfig | None = None, **options: Any
    ) -> Iterator[TokenStep | BeamStep | GenerationResult]:
        """Decode step by step: an iterator of TokenStep (or BeamStep) events, then one GenerationResult.

        Prompts and options are checked here, when called: bad input raises before the first step.
        """
        config = self.generation_config(config, **options)
        config.check_token_ids(self.manifest.vocab_size)
        input_ids, attention_mask = self._prepare(as_batch(prompts), config)
        self._check_cache_size(input_ids.shape[0], input_ids.shape[1] + config.max_new_tokens, config)
        stop_check = self._stop_check(config.stop_strings)
        return self._steps(input_ids, attention_mask, config, stop_check)

    def _steps(
        self,
        input_ids: np.ndarray,
        attention_mask: np.ndarray,
        config: GenerationConfig,
        stop_check: StopCheck | None,
    ) -> Iterator[TokenStep | BeamStep | GenerationResult]:
        eos = config.eos_token_id if config.eos_token_id is not None else self.manifest.eos_token_ids
        pad = config.pad_token_id if config.pad_token_id is not None else self.pad_token_id
        capacity = input_ids.shape[1] + config.max_new_tokens

        def step(ids: np.ndarray, mask: np.ndarray, cache: KVCache | None) -> tuple[np.ndarray, KVCache]:
            logits, cache = self.forward(ids, mask, past=cache, capacity=capacity, num_logits_to_keep=1)
            return logits[:, -1], cache

        if config.prompt_lookup_num_tokens:

            def verify(ids: np.ndarray, mask: np.ndarray, cache: KVCache | None, keep: int):
                return self.forward(ids, mask, past=cache, capacity=capacity, num_logits_to_keep=keep)

            steps = prompt_lookup_decode(
                verify, self.drop_newest_rows, input_ids, attention_mask, config, eos, stop_check
            )
        elif config.num_beams > 1:
            steps = beam_search(
                step, self.reorder_cache, input_ids, attention_mask, config, eos, pad, stop_check
            )
        else:
            steps = decode(step, input_ids, attention_mask, config, eos, pad, stop_check)
        for event in steps:
            if isinstance(event, GenerationResult) and self.tokenizer is not None:
                event.texts = [self._final_text(tokens, config.stop_strings) for tokens in event.sequences]
            yield event

    def generate(
        self, prompts: Prompt | list[Prompt], config: GenerationConfig | None = None, **options: Any
    ) -> GenerationResult:
        """Generate for one prompt or a batch (text or token ids); returns all sequences at once."""
        result = None
        for event in self.generate_steps(prompts, config, **options):
            result = event
        assert isinstance(result, GenerationResult)  # the generator always ends with one
        return result

    def stream(self, prompt: Prompt, config: GenerationConfig | None = None, **options: Any) -> Iterator[str]:
        """Text pieces as they are generated (one prompt, greedy or sampling).

        Bad input raises here, when called, before any piece (so a caller may echo the prompt first).
        """
        if self.tokenizer is None:
            raise InputError("streaming text needs a tokenizer; this export has none (use generate_steps)")
        prompts = as_batch(prompt)
        if len(prompts) != 1:
            raise InputError("stream takes one prompt; use generate() for batches")
        config = self.generation_config(config, **options)
        if config.num_beams > 1 or config.num_return_sequences > 1:
            raise GenerationConfigError("streaming needs num_beams=1 and num_return_sequences=1")
        steps = self.generate_steps(prompts, config)

        def tokens() -> Iterator[int]:
            for event in steps:
                if isinstance(event, TokenStep) and event.active[0]:
                    yield int(event.token_ids[0])

        return stream_text(tokens(), self.tokenizer, config.stop_strings)

    def _prepare(self, prompts: list[Prompt], config: GenerationConfig) -> tuple[np.ndarray, np.ndarray]:
        rows = encode_prompts(prompts, self.tokenizer)
        check_token_ids(rows, self.manifest.vocab_size)
        rows = check_length(
            rows, config.max_new_tokens, self.manifest.max_position_embeddings, config.truncate
        )
        pad = config.pad_token_id if config.pad_token_id is not None else self.pad_token_id
        return left_pad(rows, pad)

    def _check_cache_size(self, prompts: int, tokens: int, config: GenerationConfig) -> None:
        """Refuse a generation whose KV cache would pass `max_cache_bytes` (every row of every
        layer holds keys and values for up to `tokens` tokens)."""
        rows = prompts * max(config.num_beams, config.num_return_sequences)
        row_bytes = 2 * len(self.layers) * self._num_heads * self._head_dim * self.cache_dtype.itemsize
        needed = rows * tokens * row_bytes
        if self.max_cache_bytes is not None and needed > self.max_cache_bytes:
            raise GenerationConfigError(
                f"this generation needs a {needed / 2**30:.1f} GiB KV cache ({prompts} prompt(s) x "
                f"{rows // prompts} sequence(s) each x {tokens} tokens), over the limit of "
                f"{self.max_cache_bytes / 2**30:.1f} GiB; lower the batch, num_beams, "
                "num_return_sequences or max_new_tokens (or load with a larger max_cache_bytes)"
            )

    def _stop_check(self, stop_strings: list[str]) -> StopCheck | None:
        if not stop_strings:
            return None
        if self.tokenizer is None:
            raise InputError("stop strings need a tokenizer; this export has none")
        tokenizer = self.tokenizer
        # A token decodes to at least one byte, so the last 4 * len + 2 tokens cover any stop string.
        window = 4 * max(len(stop) for stop in stop_strings) + 2

        def check(tokens: list[int]) -> bool:
            tail = tokenizer.decode(tokens[-window:], skip_special_tokens=True)
            return first_stop_index(tail, stop_strings) is not None

        return check

    def _final_text(self, tokens: list[int], stop_strings: list[str]) -> str:
        text = self.tokenizer.decode(tokens, skip_special_tokens=True)
        cut = first_stop_index(text, stop_strings)
        return text if cut is None else text[:cut]
