"""Memory bounds for a KV cache: how much a host cache may use, and refusing a generation that
would need more before anything is allocated (so the kernel's OOM killer never ends the process)."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

import numpy as np

from gptneo_onnx.runtime.errors import GenerationConfigError, InputError
from gptneo_onnx.runtime.kv_cache import CacheSpec


def host_cache_limit() -> int | None:
    """The default limit for a host-resident cache: 3/4 of the memory this process may use
    (physical memory, or less under a cgroup limit or RLIMIT_AS). Past it the kernel's OOM
    killer would end the process mid-generation, with no error at all."""
    limits = []
    with contextlib.suppress(ValueError, OSError, AttributeError):  # not a POSIX system that reports it
        limits.append(os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
    try:
        import resource

        soft, _ = resource.getrlimit(resource.RLIMIT_AS)
        if soft != resource.RLIM_INFINITY:
            limits.append(soft)
    except (ImportError, OSError, ValueError):
        pass
    try:  # cgroup v2 (containers)
        text = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        if text.isdigit():
            limits.append(int(text))
    except OSError:
        pass
    return min(limits) * 3 // 4 if limits else None


def cache_limit(max_cache_bytes: int | None, on_host: bool) -> int | None:
    """A model's `max_cache_bytes`, checked; by default `host_cache_limit()` for a host cache and
    none on a GPU, where onnxruntime reports a failed allocation itself."""
    if max_cache_bytes is None:
        return host_cache_limit() if on_host else None
    if not isinstance(max_cache_bytes, int) or isinstance(max_cache_bytes, bool) or max_cache_bytes < 1:
        raise InputError(
            f"max_cache_bytes must be a positive number of bytes or None, got {max_cache_bytes!r}"
        )
    return max_cache_bytes


# Copies of one step's (rows, vocab) float32 logits alive at once (processors, log-softmax, beam top-k).
LOGITS_STEP_COPIES = 4


def check_cache_size(
    spec: CacheSpec, prompts: int, sequences: int, tokens: int, new_tokens: int, limit: int | None
) -> None:
    """Refuse a generation whose memory would pass `limit` bytes, before anything is allocated:
    `prompts` x `sequences` rows, each holding keys and values of every layer for up to `tokens`
    tokens, plus the host logits every row needs (the prefill's, in onnxruntime and copied, and a
    step's, through the processors and beam search)."""
    rows = prompts * sequences
    logits_row_bytes = spec.vocab_size * np.dtype(np.float32).itemsize
    prompt_tokens = tokens - new_tokens
    needed = rows * (
        tokens * spec.bytes_per_token + logits_row_bytes * (2 * prompt_tokens + LOGITS_STEP_COPIES)
    )
    if limit is not None and needed > limit:
        raise GenerationConfigError(
            f"this generation needs {needed / 2**30:.1f} GiB for its KV cache and logits ({prompts} "
            f"prompt(s) x {sequences} sequence(s) each x {tokens} tokens), over the limit of "
            f"{limit / 2**30:.1f} GiB; lower the batch, num_beams, "
            "num_return_sequences or max_new_tokens (or load with a larger max_cache_bytes)"
        )
