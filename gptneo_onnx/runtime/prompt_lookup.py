"""Prompt-lookup decoding (transformers' `prompt_lookup_num_tokens`): draft the next tokens by
copying what followed the newest n-gram's earlier occurrence in the context, then verify the
drafts in one multi-token step.

The step feeds the last chosen token and its drafts; logits row j predicts the token after draft
j. Each row's token is chosen exactly as plain decoding chooses it (the same processors, on the
same prefix), and drafts are accepted while they equal those choices, so greedy output is token
for token that of plain greedy decoding (sampling draws from the same distribution). Cache rows
of rejected drafts leave the cache (`KVCache.drop_newest`) before the next step. One sequence
at a time, as in transformers.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import numpy as np

from gptneo_onnx.runtime.errors import GenerationConfigError
from gptneo_onnx.runtime.generation import (
    GenerationConfig,
    GenerationResult,
    StopCheck,
    TokenStep,
    check_choices,
    check_finite,
    seeded_rng,
)
from gptneo_onnx.runtime.kv_cache import KVCache
from gptneo_onnx.runtime.sampling import sample

# transformers' default `max_matching_ngram_size`
MAX_NGRAM = 2
# forward(ids (1, S), mask (1, T), cache, keep) -> (logits of the last `keep` positions (1, keep, V), cache)
StepFn = Callable[[np.ndarray, np.ndarray, KVCache | None, int], tuple[np.ndarray, KVCache]]


def draft_tokens(tokens: np.ndarray, count: int, max_ngram: int = MAX_NGRAM) -> np.ndarray:
    """Up to `count` tokens that followed the first earlier occurrence of the row's last n-gram
    (longest n first, n = max_ngram .. 1), as transformers' PromptLookupCandidateGenerator."""
    length = len(tokens)
    if count < 1:
        return tokens[:0]
    for size in range(min(max_ngram, length - 1), 0, -1):
        ngram = length - size  # where the newest n-gram starts; earlier ones start before it
        match = tokens[:ngram] == tokens[ngram]
        for offset in range(1, size):  # one comparison per position: ~8x faster than windows
            match &= tokens[offset : ngram + offset] == tokens[ngram + offset]
        hits = np.flatnonzero(match)
        if hits.size:
            start = int(hits[0]) + size
            return tokens[start : start + count]
    return tokens[:0]


def prompt_lookup_decode(
    forward: StepFn,
    input_ids: np.ndarray,
    attention_mask: np.ndarray,
    config: GenerationConfig,
    eos_token_ids: list[int],
    stop_check: StopCheck | None = None,
) -> Iterator[TokenStep | GenerationResult]:
    """`generation.decode` for one prompt, with drafts verified in multi-token steps; yields a
    TokenStep per new token, then one GenerationResult."""
    if input_ids.shape[0] != 1 or config.num_return_sequences != 1 or config.num_beams != 1:
        raise GenerationConfigError(
            "prompt_lookup_num_tokens decodes one sequence: one prompt, num_beams=1, num_return_sequences=1"
        )
    tokens = input_ids[0].astype(np.int64)
    prompt_length = len(tokens)
    processor = config.processor(eos_token_ids)
    rng = seeded_rng(config.seed)
    eos = set(eos_token_ids)
    reason = None
    logits, cache = forward(input_ids, attention_mask, None, 1)
    drafts = tokens[:0]
    while reason is None:
        accepted = 0
        for row in range(len(drafts) + 1):  # row j predicts the token after drafts[:j]
            check_finite(logits[:, row])
            scores = processor(tokens[None], logits[:, row], prompt_length)
            check_choices(scores)
            chosen = int(sample(scores, rng)[0] if config.do_sample else scores[0].argmax())
            tokens = np.append(tokens, chosen)
            new = len(tokens) - prompt_length
            if chosen in eos:
                reason = "eos"
            elif stop_check is not None and stop_check(tokens[prompt_length:].tolist()):
                reason = "stop_string"
            elif new == config.max_new_tokens:
                reason = "length"
            yield TokenStep(
                step=new - 1,
                token_ids=np.array([chosen]),
                active=np.array([True]),
                finished=np.array([reason is not None]),
            )
            if reason is not None or row == len(drafts) or chosen != drafts[row]:
                break
            accepted += 1
        if reason is not None:
            break
        cache.drop_newest(len(drafts) - accepted)
        # The last chosen token is not in the cache yet: feed it with the next drafts.
        room = config.max_new_tokens - (len(tokens) - prompt_length) - 1
        drafts = draft_tokens(tokens, min(config.prompt_lookup_num_tokens, room))
        step_ids = np.concatenate([tokens[-1:], drafts])[None]
        logits, cache = forward(
            step_ids, np.ones((1, len(tokens) + len(drafts)), np.int64), cache, len(step_ids[0])
        )
    yield GenerationResult(
        sequences=[tokens[prompt_length:].tolist()], finish_reasons=[reason or "length"], prompt_index=[0]
    )
