"""Beam search, a numpy port of transformers' vectorized `_beam_search` (4.57).

Kept step-for-step equal to transformers so the output is token-identical: the same top-K
candidate pool (K = max(2, 1 + number of EOS ids) * num_beams), the same -1e9 masking, the
same length penalty and early-stopping heuristic, and the same float32 arithmetic.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from gptneo_onnx.runtime.generation import (
    ForwardFn,
    GenerationConfig,
    GenerationResult,
    StopCheck,
    check_choices,
    check_finite,
    seeded_rng,
)
from gptneo_onnx.runtime.sampling import log_softmax, sample_without_replacement

BIG = np.float32(1.0e9)


@dataclass
class BeamStep:
    """One beam-search step: the running (unfinished) beams, best first, per prompt."""

    step: int
    running_sequences: np.ndarray  # (B, num_beams, cur_len) int64, prompt included
    running_scores: np.ndarray  # (B, num_beams) float32 sums of log-probabilities


def _topk_indices(values: np.ndarray, k: int) -> np.ndarray:
    """Indices of the k largest values along the last axis, largest first (ties: lowest index)."""
    return np.argsort(-values, axis=-1, kind="stable")[..., :k]


def _gather_beams(tensor: np.ndarray, indices: np.ndarray) -> np.ndarray:
    """tensor (B, N, ...) indexed along axis 1 by indices (B, K) -> (B, K, ...)."""
    expanded = indices.reshape(indices.shape + (1,) * (tensor.ndim - 2))
    return np.take_along_axis(tensor, expanded, axis=1)


def beam_search(
    forward: ForwardFn,
    input_ids: np.ndarray,
    attention_mask: np.ndarray,
    config: GenerationConfig,
    eos_token_ids: list[int],
    pad_token_id: int,
    stop_check: StopCheck | None = None,
) -> Iterator[BeamStep | GenerationResult]:
    """Beam search over left-padded prompts (B, S); yields BeamSteps, then one GenerationResult."""
    num_beams, length_penalty, early_stopping = config.num_beams, config.length_penalty, config.early_stopping
    batch, prompt_length = input_ids.shape
    max_length = prompt_length + config.max_new_tokens
    processor = config.processor(eos_token_ids)
    rng = seeded_rng(config.seed)
    eos = np.asarray(eos_token_ids, dtype=np.int64)
    beams_to_keep = max(2, 1 + len(eos_token_ids)) * num_beams
    top_num_beam_mask = np.arange(beams_to_keep) < num_beams

    running_sequences = np.full((batch, num_beams, max_length), pad_token_id, dtype=np.int64)
    running_sequences[:, :, :prompt_length] = input_ids[:, None, :]
    sequences = running_sequences.copy()
    running_beam_scores = np.zeros((batch, num_beams), dtype=np.float32)
    running_beam_scores[:, 1:] = -BIG
    beam_scores = np.full((batch, num_beams), -BIG, dtype=np.float32)
    is_sent_finished = np.zeros((batch, num_beams), dtype=bool)
    early_stop_unsatisfied = np.ones((batch, 1), dtype=bool)
    running_beam_indices = np.full((batch, num_beams, config.max_new_tokens), -1, dtype=np.int64)
    beam_indices = running_beam_indices.copy()
    mask = np.repeat(attention_mask, num_beams, axis=0)
    batch_offset = np.arange(batch)[:, None] * num_beams

    cur_len, cache = prompt_length, None
    while True:
        flat_running = running_sequences[:, :, :cur_len].reshape(batch * num_beams, cur_len)
        step_ids = flat_running if cache is None else flat_running[:, -1:]
        logits, cache = forward(step_ids, mask, cache)
        check_finite(logits)
        log_probs = processor(flat_running, log_softmax(logits), prompt_length)
        check_choices(log_probs)
        vocab_size = log_probs.shape[-1]
        log_probs = log_probs.reshape(batch, num_beams, vocab_size) + running_beam_scores[:, :, None]
        log_probs = log_probs.reshape(batch, num_beams * vocab_size)

        # c. the top-K continuations over all beams of each prompt
        if config.do_sample:
            topk_indices = sample_without_replacement(log_probs, beams_to_keep, rng)
        else:
            topk_indices = _topk_indices(log_probs, beams_to_keep)
        topk_log_probs = np.take_along_axis(log_probs, topk_indices, axis=1)
        topk_beam = topk_indices // vocab_size
        topk_running_beam_indices = _gather_beams(running_beam_indices, topk_beam)
        topk_running_sequences = _gather_beams(running_sequences, topk_beam)
        topk_ids = topk_indices % vocab_size
        topk_running_sequences[:, :, cur_len] = topk_ids
        topk_running_beam_indices[:, :, cur_len - prompt_length] = topk_beam + batch_offset

        # d. which candidates stop: max length, EOS, stop strings
        hits = np.full(topk_ids.shape, cur_len + 1 >= max_length)
        if eos.size:
            hits |= np.isin(topk_ids, eos)
        if stop_check is not None:
            for b, k in zip(*np.nonzero(~hits)):
                new_tokens = topk_running_sequences[b, k, prompt_length : cur_len + 1].tolist()
                hits[b, k] = stop_check(new_tokens)

        # e. the best num_beams unfinished candidates keep running
        topk_running_log_probs = topk_log_probs + hits.astype(np.float32) * -BIG
        next_indices = _topk_indices(topk_running_log_probs, num_beams)
        running_sequences = _gather_beams(topk_running_sequences, next_indices)
        running_beam_scores = _gather_beams(topk_running_log_probs, next_indices)
        running_beam_indices = _gather_beams(topk_running_beam_indices, next_indices)

        # f. finished candidates among the top num_beams join the finished pool if good enough
        just_finished = hits & top_num_beam_mask[None, :]
        finished_scores = topk_log_probs / np.float32((cur_len + 1 - prompt_length) ** length_penalty)
        beams_full = is_sent_finished.all(axis=-1, keepdims=True) & (early_stopping is True)
        finished_scores = finished_scores + beams_full.astype(np.float32) * -BIG
        finished_scores = finished_scores + (~early_stop_unsatisfied).astype(np.float32) * -BIG
        finished_scores = finished_scores + (~just_finished).astype(np.float32) * -BIG
        merged_scores = np.concatenate([beam_scores, finished_scores], axis=1)
        keep = _topk_indices(merged_scores, num_beams)
        sequences = _gather_beams(np.concatenate([sequences, topk_running_sequences], axis=1), keep)
        beam_scores = _gather_beams(merged_scores, keep)
        beam_indices = _gather_beams(np.concatenate([beam_indices, topk_running_beam_indices], axis=1), keep)
        is_sent_finished = _gather_beams(np.concatenate([is_sent_finished, just_finished], axis=1), keep)

        # g. follow the surviving beams' caches, then decide whether to go on
        cache = cache.reorder(running_beam_indices[:, :, cur_len - prompt_length].reshape(-1))
        mask = np.concatenate([mask, np.ones((batch * num_beams, 1), dtype=mask.dtype)], axis=1)
        cur_len += 1
        early_stop_unsatisfied = _early_stop_unsatisfied(
            early_stop_unsatisfied, running_beam_scores, beam_scores, is_sent_finished, cur_len,
            max_length, prompt_length, early_stopping, length_penalty,
        )  # fmt: skip
        yield BeamStep(cur_len - prompt_length - 1, running_sequences[:, :, :cur_len], running_beam_scores)
        improvement_possible = early_stop_unsatisfied.any()
        open_beam = not (is_sent_finished.all() and early_stopping is True)
        if not (improvement_possible and open_beam and not hits.all()):
            break

    count = config.num_return_sequences
    result_sequences, scores, prompt_index, reasons = [], [], [], []
    for b in range(batch):
        for k in range(count):
            generated = int((beam_indices[b, k] != -1).sum())
            new_tokens = sequences[b, k, prompt_length : prompt_length + generated].tolist()
            result_sequences.append(new_tokens)
            scores.append(float(beam_scores[b, k]))
            prompt_index.append(b)
            reasons.append(_finish_reason(new_tokens, eos, stop_check))
    yield GenerationResult(result_sequences, reasons, prompt_index, scores)


def _early_stop_unsatisfied(
    unsatisfied: np.ndarray,
    running_beam_scores: np.ndarray,
    beam_scores: np.ndarray,
    is_sent_finished: np.ndarray,
    cur_len: int,
    max_length: int,
    prompt_length: int,
    early_stopping: bool | str,
    length_penalty: float,
) -> np.ndarray:
    """Can a running beam still beat the worst finished one? (transformers' heuristic)."""
    if early_stopping == "never" and length_penalty > 0.0:
        best_length = max_length - prompt_length
    else:
        best_length = cur_len - prompt_length
    best_running = running_beam_scores[:, :1] / np.float32(best_length**length_penalty)
    worst_finished = np.where(is_sent_finished, beam_scores.min(axis=1, keepdims=True), -BIG)
    return unsatisfied & (best_running > worst_finished).any(axis=-1, keepdims=True)


def _finish_reason(tokens: list[int], eos: np.ndarray, stop_check: StopCheck | None) -> str:
    if tokens and eos.size and tokens[-1] in eos:
        return "eos"
    if tokens and stop_check is not None and stop_check(tokens):
        return "stop_string"
    return "length"
