"""Prompts to token ids: tokenize, check ids against the vocabulary, left-pad batches."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Union

import numpy as np
from tokenizers import Encoding, Tokenizer

from gptneo_onnx.runtime.errors import ExportFolderError, InputError

# A prompt is text, or token ids; a batch is a list of prompts.
Prompt = Union[str, Sequence[int]]  # noqa: UP007 (a runtime alias, Python 3.10 safe)


def load_tokenizer(path: Path | None, vocab_size: int) -> Tokenizer | None:
    """The export's tokenizer, which must fit the model: every token id below `vocab_size`."""
    if path is None:
        return None
    try:
        tokenizer = Tokenizer.from_file(str(path))
    except Exception as error:  # tokenizers raises a bare Exception on malformed files
        raise ExportFolderError(f"{path} is not a valid tokenizers JSON file: {error}") from error
    vocabulary = tokenizer.get_vocab(with_added_tokens=True)
    largest = max(vocabulary.values(), default=-1)
    if largest >= vocab_size:
        token = next(token for token, index in vocabulary.items() if index == largest)
        raise ExportFolderError(
            f"{path} does not fit the model: token {token!r} has id {largest}, but the model's vocab_size "
            f"is {vocab_size}. The tokenizer belongs to another model; re-export with the checkpoint's own"
        )
    return tokenizer


def is_single_prompt(prompts: Prompt | Sequence[Prompt]) -> bool:
    """A str, or a flat sequence of ints, is one prompt; anything else is a batch."""
    if isinstance(prompts, str):
        return True
    if isinstance(prompts, np.ndarray):
        return prompts.ndim == 1
    return len(prompts) > 0 and all(isinstance(item, (int, np.integer)) for item in prompts)


def as_batch(prompts: Prompt | Sequence[Prompt]) -> list[Prompt]:
    return [prompts] if is_single_prompt(prompts) else list(prompts)


def encode_prompts(prompts: Sequence[Prompt], tokenizer: Tokenizer | None) -> list[list[int]]:
    """Token ids per prompt; text needs a tokenizer, empty prompts are refused."""
    if len(prompts) == 0:
        raise InputError("no prompts given; pass a string, a list of token ids, or a list of those")
    rows = []
    for index, prompt in enumerate(prompts):
        if isinstance(prompt, str):
            if tokenizer is None:
                raise InputError(
                    "this export has no tokenizer, so prompts must be token ids; "
                    "re-export with a tokenizer.json or pass lists of ints"
                )
            ids = tokenizer.encode(prompt).ids if prompt else []
        else:
            ids = [int(token) for token in prompt]
        if not ids:
            raise InputError(f"prompt {index} is empty; every prompt needs at least one token")
        rows.append(ids)
    return rows


def encode_texts(texts: Sequence[str], tokenizer: Tokenizer | None) -> list[Encoding]:
    """Encodings (ids and character offsets) for the single-pass heads; text only."""
    if tokenizer is None:
        raise InputError("this export has no tokenizer; the text heads need tokenizer.json in the export")
    if len(texts) == 0:
        raise InputError("no texts given")
    encodings = []
    for index, text in enumerate(texts):
        if not isinstance(text, str):
            raise InputError(f"text {index} must be a string, got {type(text).__name__}")
        encoding = tokenizer.encode(text) if text else None
        if encoding is None or not encoding.ids:
            raise InputError(f"text {index} is empty; every input needs at least one token")
        encodings.append(encoding)
    return encodings


def check_token_ids(rows: Sequence[Sequence[int]] | np.ndarray, vocab_size: int) -> None:
    """Refuse ids outside [0, vocab_size) before the run (CUDA and TensorRT would not complain)."""
    for index, row in enumerate(rows):
        array = np.asarray(row)
        bad = array[(array < 0) | (array >= vocab_size)]
        if bad.size:
            raise InputError(
                f"prompt {index} has token id {int(bad[0])} outside the vocabulary [0, {vocab_size}); "
                "check the tokenizer matches this export"
            )


def check_length(
    rows: list[list[int]], max_new_tokens: int, max_positions: int, truncate: bool
) -> list[list[int]]:
    """Fit prompt + max_new_tokens in max_position_embeddings, left-truncating prompts if asked."""
    budget = max_positions - max_new_tokens
    if budget < 1:
        raise InputError(
            f"max_new_tokens ({max_new_tokens}) leaves no room for a prompt: the model's "
            f"max_position_embeddings is {max_positions}"
        )
    longest = max(len(row) for row in rows)
    if longest <= budget:
        return rows
    if truncate:
        return [row[-budget:] for row in rows]
    raise InputError(
        f"a prompt of {longest} tokens plus max_new_tokens={max_new_tokens} exceeds the model's "
        f"max_position_embeddings ({max_positions}); shorten the prompt, lower max_new_tokens, "
        "or pass truncate=True to keep the last tokens"
    )


def left_pad(rows: Sequence[Sequence[int]], pad_token_id: int) -> tuple[np.ndarray, np.ndarray]:
    """(input_ids, attention_mask), both (B, longest) int64, padded on the left."""
    longest = max(len(row) for row in rows)
    input_ids = np.full((len(rows), longest), pad_token_id, dtype=np.int64)
    attention_mask = np.zeros((len(rows), longest), dtype=np.int64)
    for index, row in enumerate(rows):
        if len(row):
            input_ids[index, longest - len(row) :] = row
            attention_mask[index, longest - len(row) :] = 1
    return input_ids, attention_mask


def position_ids_from_mask(attention_mask: np.ndarray, length: int) -> np.ndarray:
    """Positions of the last `length` tokens: cumsum(mask) - 1, clipped at 0 (sidecar rule)."""
    positions = np.clip(np.cumsum(attention_mask, axis=-1) - 1, 0, None)
    return positions[:, -length:].astype(np.int64)
