"""The windowed local cache rules (runtime/local_window.py) on hand-computed cases."""

from __future__ import annotations

import numpy as np

from gptneo_onnx.runtime.local_window import LocalWindow

CACHE = {
    "local_window": {"input": "local_attention_mask", "window": 8, "min_rows": 7},
    "layers": [
        {"window": None, "past_key": "k0", "past_value": "v0"},
        {"window": 8, "past_key": "k1", "past_value": "v1"},
    ],
}


def test_from_cache_reads_the_sidecar_and_names_only_local_layers():
    local = LocalWindow.from_cache(CACHE)
    assert (local.input, local.window, local.min_rows, local.slack) == ("local_attention_mask", 8, 7, 2)
    assert local.past_names == {"k1", "v1"}
    assert LocalWindow.from_cache({"layers": CACHE["layers"]}) is None  # format 1: no windowed cache


def test_rows_are_kept_until_min_rows_plus_slack_then_cut_to_min_rows():
    local = LocalWindow.from_cache(CACHE)
    assert [local.rows_to_keep(rows) for rows in (3, 7, 8, 9, 10, 40)] == [3, 7, 8, 9, 7, 7]


def test_mask_is_the_tail_covering_held_rows_and_new_tokens():
    local = LocalWindow.from_cache(CACHE)
    mask = np.array([[0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]])
    np.testing.assert_array_equal(local.mask(mask, local_rows=3, new=1), mask[:, 2:])
    np.testing.assert_array_equal(local.mask(mask, local_rows=0, new=6), mask)


def test_move_newest_to_front_handles_overlapping_rows():
    local = LocalWindow.from_cache(CACHE)
    buffer = np.arange(2 * 3 * 12 * 2, dtype=np.float32).reshape(2, 3, 12, 2)
    expected = buffer[:, :, 3:10].copy()  # 10 rows held, keep the newest 7: rows 3..9 (overlap 3..6)
    local.move_newest_to_front(buffer, local_rows=10, keep=7)
    np.testing.assert_array_equal(buffer[:, :, :7], expected)
