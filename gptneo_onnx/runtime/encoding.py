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
    """A str, or a flat sequence of numbers (token ids), is one prompt; anything else is a batch."""
    if isinstance(prompts, str):
        return True
    if isinstance(prompts, np.ndarray):
        return prompts.ndim == 1
    if isinstance(prompts, (bytes, bytearray)) or not isinstance(prompts, Sequence):
        return False
    return len(prompts) > 0 and all(_is_scalar(item) for item in prompts)


def as_batch(prompts: Prompt | Sequence[Prompt]) -> list[Prompt]:
    """One prompt or a batch as a list of prompts; refuses what is neither (bytes, None, numbers)."""
    _refuse_non_prompt(prompts, "prompts")
    if is_single_prompt(prompts):
        return [prompts]
    if isinstance(prompts, np.ndarray) and prompts.ndim != 2:
        raise InputError(
            f"a token-id array must be 1-D (one prompt) or 2-D (a batch), got {prompts.ndim}-D "
            f"with shape {prompts.shape}"
        )
    batch = list(prompts)
    for index, prompt in enumerate(batch):
        _refuse_non_prompt(prompt, f"prompt {index}")
    return batch


def _is_scalar(item: object) -> bool:
    """A number or bool: a flat list of these is one prompt (ints are checked later)."""
    return isinstance(item, (int, float, np.number, np.bool_))


def _refuse_non_prompt(prompt: object, what: str) -> None:
    if isinstance(prompt, (bytes, bytearray)):
        raise InputError(
            f"{what}: bytes are not accepted; pass text as str (decode it first, e.g. "
            "data.decode('utf-8', errors='replace')) or token ids as a list of ints"
        )
    if not isinstance(prompt, (str, Sequence, np.ndarray)):
        raise InputError(
            f"{what}: expected a str, a list of token ids, or a list of those; got {type(prompt).__name__}"
        )


def check_text(text: str, what: str) -> None:
    """Refuse text that is not valid Unicode: lone surrogates (e.g. undecodable bytes from argv)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as error:
        raise InputError(
            f"{what} is not valid Unicode: it holds the lone surrogate U+{ord(text[error.start]):04X} at "
            f"index {error.start} (undecodable bytes?); decode input with errors='replace'"
        ) from None


def token_id_list(prompt: Sequence[int] | np.ndarray, what: str) -> list[int]:
    """Token ids as Python ints; floats, bools, strings and nested lists are refused."""
    if isinstance(prompt, np.ndarray):
        if prompt.ndim != 1:
            raise InputError(f"{what} must be a 1-D sequence of token ids, got shape {prompt.shape}")
        if prompt.dtype.kind not in "iu":
            raise InputError(f"{what} must hold integer token ids, got an array of dtype {prompt.dtype}")
        return prompt.tolist()
    ids = []
    for position, token in enumerate(prompt):
        if not isinstance(token, (int, np.integer)) or isinstance(token, (bool, np.bool_)):
            raise InputError(
                f"{what} must be a str or a list of integer token ids; position {position} holds "
                f"{token!r} ({type(token).__name__})"
            )
        ids.append(int(token))
    return ids


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
            check_text(prompt, f"prompt {index}")
            ids = tokenizer.encode(prompt).ids if prompt else []
        else:
            ids = token_id_list(prompt, f"prompt {index}")
        if not ids:
            raise InputError(f"prompt {index} is empty; every prompt needs at least one token")
        rows.append(ids)
    return rows


def as_texts(texts: str | Sequence[str], what: str = "text") -> list[str]:
    """One text or a list of texts, each checked to be a valid str."""
    if isinstance(texts, str):
        texts = [texts]
    elif isinstance(texts, (bytes, bytearray)) or not isinstance(texts, Sequence):
        raise InputError(f"expected a str or a list of str, got {type(texts).__name__}")
    texts = list(texts)
    for index, text in enumerate(texts):
        if not isinstance(text, str):
            raise InputError(f"{what} {index} must be a string, got {type(text).__name__}")
        check_text(text, f"{what} {index}")
    return texts


def encode_texts(texts: Sequence[str], tokenizer: Tokenizer | None) -> list[Encoding]:
    """Encodings (ids and character offsets) for the single-pass heads; text only."""
    if tokenizer is None:
        raise InputError("this export has no tokenizer; the text heads need tokenizer.json in the export")
    texts = as_texts(texts)
    if len(texts) == 0:
        raise InputError("no texts given")
    encodings = []
    for index, text in enumerate(texts):
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


def integer_array(values: object, name: str) -> np.ndarray:
    """`values` as an integer numpy array; floats, bools, strings and ragged lists are refused."""
    try:
        array = np.asarray(values)
    except ValueError as error:  # ragged nested lists
        raise InputError(f"{name} must be a rectangular array of integers: {error}") from None
    if array.dtype.kind not in "iu":
        raise InputError(f"{name} must hold integers, got dtype {array.dtype}")
    return array


def step_inputs(
    input_ids: object, attention_mask: object, past_length: int, vocab_size: int, max_positions: int
) -> tuple[np.ndarray, np.ndarray]:
    """Check one forward step's (input_ids, attention_mask); both come back as int64 arrays.

    input_ids: (batch, new) integers in the vocabulary, batch and new >= 1. attention_mask:
    (batch, past + new), only 0s and 1s (any numeric or bool dtype), at least one 1 per row and at
    most `max_positions` (the positions are counted over real tokens: padding columns may take a
    batch's width past them, as in a server's batch of rows that joined at different times).
    """
    ids = integer_array(input_ids, "input_ids")
    if ids.ndim != 2 or 0 in ids.shape:
        raise InputError(
            "input_ids must be (batch, new tokens) with at least one row and one token, "
            f"got shape {ids.shape}"
        )
    check_token_ids(ids, vocab_size)
    try:
        mask = np.asarray(attention_mask)
    except ValueError as error:
        raise InputError(f"attention_mask must be a rectangular array of 0s and 1s: {error}") from None
    batch, length = ids.shape
    if mask.shape != (batch, past_length + length):
        raise InputError(
            f"attention_mask must be (batch, past + new) = ({batch}, {past_length + length}), "
            f"got {mask.shape}"
        )
    if mask.dtype.kind not in "biuf" or not ((mask == 0) | (mask == 1)).all():
        raise InputError("attention_mask must hold only 0 (padding) and 1 (token)")
    mask = mask.astype(np.int64)
    empty = np.flatnonzero(~mask.any(axis=1))
    if empty.size:
        raise InputError(
            f"attention_mask row {int(empty[0])} is all zeros: every row needs at least one real token"
        )
    tokens = int(mask.sum(axis=1).max())
    if tokens > max_positions:
        raise InputError(f"{tokens} tokens exceed max_position_embeddings ({max_positions})")
    return ids.astype(np.int64, copy=False), mask


def check_position_ids(position_ids: object, shape: tuple[int, int], max_positions: int) -> np.ndarray:
    """Explicit position ids: (batch, new) integers in [0, max_position_embeddings)."""
    positions = integer_array(position_ids, "position_ids")
    if positions.shape != shape:
        raise InputError(f"position_ids must have the shape of input_ids {shape}, got {positions.shape}")
    if positions.size and (positions.min() < 0 or positions.max() >= max_positions):
        raise InputError(
            f"position_ids must be in [0, {max_positions}) (max_position_embeddings), got values from "
            f"{int(positions.min())} to {int(positions.max())}"
        )
    return positions.astype(np.int64, copy=False)


def check_logits_to_keep(value: object) -> int:
    """`forward`'s num_logits_to_keep: an integer >= 0 (0: logits of every position)."""
    if isinstance(value, bool) or not (isinstance(value, (int, np.integer)) and value >= 0):
        raise InputError(f"num_logits_to_keep must be an integer >= 0, got {value!r}")
    return int(value)


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
