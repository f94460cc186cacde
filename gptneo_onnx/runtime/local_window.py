"""Windowed caches for GPT-Neo's local layers (the sidecar's `cache.local_window`, format 2).

A local layer attends to the newest `window` tokens only, yet onnxruntime's CPU attention reads
every row of the cache it is given. Exports with a windowed local cache take a separate mask,
`local_attention_mask`, for the local layers, so their caches may hold just the newest rows: any
suffix of the sequence with at least `min_rows` (window - 1) past rows attends exactly like the
whole past. The runner lets those caches grow by `slack` rows, then moves the newest `min_rows`
back to the front: one small copy every `slack` steps, and local attention reads at most
`min_rows + slack` rows however long the sequence gets.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class LocalWindow:
    input: str  # the graph input that masks the local layers' rows
    window: int
    min_rows: int
    past_names: frozenset[str]  # the local layers' past key/value inputs

    @classmethod
    def from_cache(cls, cache: dict) -> LocalWindow | None:
        """From the manifest's `cache` object; None when the export has no windowed local cache."""
        entry = cache.get("local_window")
        if not entry:
            return None
        names = frozenset(
            layer[key]
            for layer in cache["layers"]
            if layer.get("window")
            for key in ("past_key", "past_value")
        )
        return cls(entry["input"], int(entry["window"]), int(entry["min_rows"]), names)

    @property
    def slack(self) -> int:
        return max(1, self.window // 4)

    def mask(self, attention_mask: np.ndarray, local_rows: int, new: int) -> np.ndarray:
        """The local layers' mask: the columns of their `local_rows` cached rows and the `new` tokens."""
        return attention_mask[:, attention_mask.shape[1] - (local_rows + new) :]

    def rows_to_keep(self, local_rows: int, spare: int = 0) -> int:
        """How many of the `local_rows` cached rows to keep: all, until they pass `min_rows +
        spare + slack`. `spare`: newest rows a caller may drop again (rejected drafts), kept
        beyond `min_rows`."""
        floor = self.min_rows + spare
        return floor if local_rows > floor + self.slack else local_rows

    def trim(self, arrays: dict[str, np.ndarray], local_rows: int, in_place: bool, spare: int = 0) -> int:
        """After a step that left `local_rows` rows in the local layers' caches, trim `arrays`
        (keyed by past name; other keys are left alone) as `rows_to_keep` says and return the
        local rows now in them. `in_place` (shared buffers): move the newest rows to the front of
        each buffer; otherwise (concat): replace each local array by a contiguous copy of its
        newest rows."""
        keep = self.rows_to_keep(local_rows, spare)
        if keep == local_rows:
            return local_rows
        for name in self.past_names:
            if in_place:
                self.move_newest_to_front(arrays[name], local_rows, keep)
            else:
                arrays[name] = np.ascontiguousarray(arrays[name][:, :, local_rows - keep : local_rows])
        return keep

    def move_newest_to_front(self, buffer: np.ndarray, local_rows: int, keep: int) -> None:
        """In a (B, H, capacity, D) buffer holding `local_rows` rows, make the newest `keep` the first."""
        # numpy copies overlapping ranges safely
        buffer[:, :, :keep] = buffer[:, :, local_rows - keep : local_rows]
