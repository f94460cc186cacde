"""CausalLM: one forward step with an explicit KV cache, and generation on top of it.

The cache is an object of the export's cache mode (runtime/kv_cache.py): `forward` checks the
step's inputs and hands them to the cache, which feeds, runs and absorbs. This module keeps the
session logic: the row-by-row fallback for multi-token steps, decoding and text.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from typing import Any

import numpy as np

from gptneo_onnx.contract import position_ids_from_mask
from gptneo_onnx.runtime.beam_search import BeamStep, beam_search
from gptneo_onnx.runtime.cache_memory import cache_limit, check_cache_size
from gptneo_onnx.runtime.encoding import (
    Prompt,
    as_batch,
    check_length,
    check_logits_to_keep,
    check_position_ids,
    check_token_ids,
    encode_prompts,
    left_pad,
    step_inputs,
)
from gptneo_onnx.runtime.errors import GenerationConfigError, InputError
from gptneo_onnx.runtime.generation import GenerationConfig, GenerationResult, StopCheck, TokenStep, decode
from gptneo_onnx.runtime.kv_cache import CacheSpec, KVCache, RaggedCache, cache_class, resolve_cache_mode
from gptneo_onnx.runtime.model import Model
from gptneo_onnx.runtime.prompt_lookup import prompt_lookup_decode
from gptneo_onnx.runtime.providers import gpu_attention_advice
from gptneo_onnx.runtime.streaming import final_text, stop_checker, stream_text


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
        self.io = self.manifest.io  # graph names by role
        # IO binding keeps the cache on the GPU; `io_binding=True` forces it on CPU too (for tests).
        self.io_binding = self.provider in ("cuda", "tensorrt") if io_binding is None else io_binding
        device = ("cuda", self.options.device_id) if self.provider in ("cuda", "tensorrt") else ("cpu", 0)
        self.cache_spec = CacheSpec.from_manifest(self.manifest, device)
        self.cache_mode = cache_mode = resolve_cache_mode(cache_mode, self.manifest.cache_modes)
        optimization = self.manifest.raw.get("optimization") or {}
        self._multi_token_step_max_batch = optimization.get("multi_token_step_max_batch")
        advice = gpu_attention_advice(self.manifest.raw, self.provider)
        if advice:
            warnings.warn(advice, stacklevel=3)
        if cache_mode == "shared-buffer":
            self.io_binding = True  # the buffers are bound as both input and output
        self.max_cache_bytes = cache_limit(max_cache_bytes, self.cache_spec.on_host)

    # ---- one step ---------------------------------------------------------------------------
    @property
    def ragged_rows(self) -> bool:
        """Whether this model runs ragged caches (`new_cache(ragged=True)`): shared buffers of an
        export whose graph reads each row up to its own last real column."""
        return self.cache_mode == "shared-buffer" and self.manifest.ragged_rows

    def new_cache(self, batch: int, capacity: int | None = None, ragged: bool = False) -> KVCache:
        """An empty cache of this model's mode for `batch` rows (`capacity`: shared buffers' rows,
        default max_position_embeddings). `ragged`: a RaggedCache, whose rows may end at
        different columns (a server's batch; see `ragged_rows`)."""
        capacity = capacity or self.manifest.max_position_embeddings
        if ragged and not self.ragged_rows:
            raise InputError(
                "ragged caches need the shared-buffer cache mode of an export with cache.ragged_rows "
                "(optimized exports made by this version)"
            )
        kind = RaggedCache if ragged else cache_class(self.cache_mode, self.io_binding)
        return kind.empty(self.cache_spec, batch, capacity)

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
        (`num_logits_to_keep` K > 0: the last K positions only, (B, min(K, S), V); on a past, the
        step may verify drafts, so a windowed cache keeps K - 1 rows spare for `drop_newest`).

        `attention_mask` covers past + new tokens (on a ragged cache, build it with
        `past.next_mask`: each row's tokens end at its last real column). `position_ids` default
        to the sidecar rule (cumsum(mask) - 1, clipped at 0, for the new tokens). `past` is
        advanced in place and returned. `capacity` sizes the buffers of a shared-buffer cache at
        the prefill (default max_position_embeddings).
        """
        if past is not None and not isinstance(past, KVCache):
            raise InputError(f"past must be a KVCache from this model's forward, got {type(past).__name__}")
        past_length = 0 if past is None else past.length
        manifest = self.manifest
        input_ids, attention_mask = step_inputs(
            input_ids, attention_mask, past_length, manifest.vocab_size, manifest.max_position_embeddings
        )
        batch, length = input_ids.shape
        if past is not None and (past.spec != self.cache_spec or past.batch != batch):
            raise InputError(
                "past must be the KVCache returned by this model's previous forward call, for the "
                f"same batch (it holds {past.batch} rows, input_ids has {batch})"
            )
        if position_ids is None:
            position_ids = position_ids_from_mask(attention_mask, length)
        else:
            position_ids = check_position_ids(position_ids, (batch, length), manifest.max_position_embeddings)
        keep = check_logits_to_keep(num_logits_to_keep)
        if past_length and length > 1 and batch > (self._multi_token_step_max_batch or batch):
            return self._forward_by_rows(input_ids, attention_mask, position_ids, past, keep)
        if past is None:
            if capacity is not None and not (isinstance(capacity, int) and capacity >= length):
                raise InputError(
                    f"capacity must be an integer >= the prompt length ({length}), got {capacity!r}"
                )
            past = self.new_cache(batch, capacity)
        inputs = {
            self.io["input_ids"]: input_ids,
            self.io["attention_mask"]: attention_mask,
            self.io["position_ids"]: position_ids,
        }
        if keep and self.cache_spec.num_logits_to_keep:  # format x.2 graphs take it
            inputs[self.cache_spec.num_logits_to_keep] = np.array(keep, np.int64)
        spare = min(keep, length) - 1 if past_length and keep else 0
        logits = past.run(self.session, inputs, attention_mask, spare)
        return (logits[:, -keep:] if keep else logits), past  # older graphs return every position

    def _forward_by_rows(
        self, ids: np.ndarray, mask: np.ndarray, positions: np.ndarray, past: KVCache, keep: int
    ) -> tuple[np.ndarray, KVCache]:
        """A multi-token step on top of a past, one batch row at a time: the graph's fused attention
        takes only batch 1 there (the sidecar's `multi_token_step_max_batch`)."""
        if past.mode == "shared-buffer":
            raise InputError(
                "this export runs a multi-token step with a past one batch row at a time, which the "
                "shared-buffer cache can't split; load it with cache_mode='concat'"
            )
        steps = [
            self.forward(ids[rows], mask[rows], positions[rows], past.select([row]), None, keep)
            for row in range(ids.shape[0])
            for rows in [slice(row, row + 1)]
        ]
        caches = [cache for _, cache in steps]
        return np.concatenate([logits for logits, _ in steps], axis=0), caches[0].extend(*caches[1:])

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
        sequences = max(config.num_beams, config.num_return_sequences)
        tokens, limit = input_ids.shape[1] + config.max_new_tokens, self.max_cache_bytes
        check_cache_size(self.cache_spec, input_ids.shape[0], sequences, tokens, config.max_new_tokens, limit)
        stop_check = self.stop_check(config.stop_strings)
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

        def verify(ids: np.ndarray, mask: np.ndarray, cache: KVCache | None, keep: int = 1):
            return self.forward(ids, mask, past=cache, capacity=capacity, num_logits_to_keep=keep)

        def step(ids: np.ndarray, mask: np.ndarray, cache: KVCache | None) -> tuple[np.ndarray, KVCache]:
            logits, cache = verify(ids, mask, cache)  # the lm_head on the last position only
            return logits[:, -1], cache

        if config.prompt_lookup_num_tokens:
            steps = prompt_lookup_decode(verify, input_ids, attention_mask, config, eos, stop_check)
        elif config.num_beams > 1:
            steps = beam_search(step, input_ids, attention_mask, config, eos, pad, stop_check)
        else:
            steps = decode(step, input_ids, attention_mask, config, eos, pad, stop_check)
        for event in steps:
            if isinstance(event, GenerationResult) and self.tokenizer is not None:
                event.texts = [final_text(self.tokenizer, t, config.stop_strings) for t in event.sequences]
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

    def stop_check(self, stop_strings: list[str]) -> StopCheck | None:
        """tokens -> whether their text holds a stop string (None without stop strings)."""
        if stop_strings and self.tokenizer is None:
            raise InputError("stop strings need a tokenizer; this export has none")
        return stop_checker(self.tokenizer, stop_strings) if stop_strings else None
