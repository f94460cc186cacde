"""How the engine lays out rows: prefill groups of similar length, left-padded masks, the order
of the rows that stay and the cache's columns."""

from __future__ import annotations

from typing import Protocol, TypeVar

import numpy as np

# A prefill group: at most this many padded tokens (the portable graph holds batch x heads x
# length^2 attention scores per layer), and padding at most half of its real tokens.
PREFILL_GROUP_TOKENS = 2048
PREFILL_GROUP_PADDING = 1.5
# Cache columns grow in steps of this many: a shared-buffer cache moves rows in place while they
# fit (KVCache.regroup) and is copied into new buffers only when it has to grow.
CAPACITY_STEP = 256


class Prompted(Protocol):
    prompt_length: int
    max_new_tokens: int


R = TypeVar("R", bound=Prompted)


def prefill_groups(rows: list[R], context: int) -> list[list[R]]:
    """Rows in groups of similar prompt length, shortest first: a group grows while its padded
    tokens stay within PREFILL_GROUP_TOKENS (a longer prompt runs alone), its padding within
    PREFILL_GROUP_PADDING x its real tokens, and each row's columns (its padding, prompt and new
    tokens: the longest prompt + its max_new_tokens) within the `context`."""
    groups: list[list[R]] = []
    real = most_new = 0
    for row in sorted(rows, key=lambda row: row.prompt_length):
        length = row.prompt_length
        padded = (len(groups[-1]) + 1) * length if groups else 0
        fits = length + max(most_new, row.max_new_tokens) <= context
        small = padded <= PREFILL_GROUP_TOKENS and padded <= PREFILL_GROUP_PADDING * (real + length)
        if groups and fits and small:
            groups[-1].append(row)
            real += length
            most_new = max(most_new, row.max_new_tokens)
        else:
            groups.append([row])
            real, most_new = length, row.max_new_tokens
    return groups


def shared_padding(mask: np.ndarray) -> int:
    """Leading columns that are padding in every row: no row needs them."""
    return int(np.argmax(mask != 0, axis=1).min())


def fill_holes(keep: list[int]) -> list[int]:
    """The rows that stay, in the order that moves the fewest: a row below len(keep) keeps its
    place, and the rows past it fill the places of the rows that left."""
    staying = {row for row in keep if row < len(keep)}
    movers = iter(row for row in keep if row >= len(keep))
    return [row if row in staying else next(movers) for row in range(len(keep))]


def cache_capacity(columns: int) -> int:
    """The cache columns to ask for when `columns` are needed: rounded up to CAPACITY_STEP."""
    return -(-columns // CAPACITY_STEP) * CAPACITY_STEP
