"""KV cache rows leave, join and reorder (runtime/kv_cache.py): every step's logits equal a
from-scratch forward of that row alone, for each cache mode, with a window shorter than the rows."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import tiny_hf_model

from gptneo_onnx.export import export
from gptneo_onnx.reference import from_transformers
from gptneo_onnx.runtime import CausalLM, InputError

MODES = [
    ("portable", "concat", None),
    ("portable", "concat", True),  # IO-bound concat (OrtValues)
    ("optimized", "shared-buffer", None),
    ("optimized", "concat", None),
]


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("kv-cache")
    reference = from_transformers(tiny_hf_model("causal-lm"))  # window 4
    options = {"progress": False, "validate": False, "windowed_local_cache": True}
    export(reference, root / "portable", **options)
    export(reference, root / "optimized", optimize=True, **options)
    return root


class Batch:
    """A cache, its left-padded attention mask, and each row's real tokens so far."""

    def __init__(self, model: CausalLM, prompts: list[list[int]]):
        longest = max(map(len, prompts))
        ids = np.array([[0] * (longest - len(p)) + p for p in prompts])
        self.mask = np.arange(longest)[None, :] >= (longest - np.array([len(p) for p in prompts]))[:, None]
        self.mask = self.mask.astype(np.int64)
        self.model, self.rows = model, [list(p) for p in prompts]
        self.logits, self.cache = model.forward(ids, self.mask, capacity=40)

    def step(self, tokens: list[int]) -> np.ndarray:
        self.mask = np.concatenate([self.mask, np.ones((len(tokens), 1), np.int64)], axis=1)
        for row, token in zip(self.rows, tokens):
            row.append(token)
        logits, self.cache = self.model.forward(np.array(tokens)[:, None], self.mask, past=self.cache)
        assert self.cache.length == self.mask.shape[1]
        return logits[:, -1]

    def check(self, logits: np.ndarray) -> None:
        """Each row's logits are those of a fresh forward over that row's tokens alone."""
        for row, got in zip(self.rows, logits):
            ids = np.array([row])
            alone, _ = self.model.forward(ids, np.ones_like(ids))
            np.testing.assert_allclose(got, alone[0, -1], atol=1e-4)


@pytest.mark.parametrize(("flavor", "mode", "io_binding"), MODES, ids=["-".join(map(str, m)) for m in MODES])
def test_rows_join_leave_and_reorder_like_fresh_runs(folders, flavor, mode, io_binding):
    model = CausalLM.load(folders / flavor, cache_mode=mode, io_binding=io_binding, intra_op_threads=1)
    assert model.cache_mode == mode
    rng = np.random.default_rng(0)
    batch = Batch(model, [rng.integers(3, 97, 12).tolist(), rng.integers(3, 97, 3).tolist()])
    for _ in range(3):
        batch.check(batch.step(rng.integers(3, 97, 2).tolist()))
    assert batch.cache.local_rows < batch.cache.length  # the window (4) is shorter: local rows trimmed

    # join: a 2-token row (untrimmed, fewer local rows) and a 4-token one (untrimmed, more)
    joining = [Batch(model, [rng.integers(3, 97, n).tolist()]) for n in (2, 4)]
    length = batch.cache.length
    held = [batch.cache.local_rows, *(other.cache.local_rows for other in joining)]
    batch.cache = batch.cache.extend(*(other.cache for other in joining))
    assert batch.cache.local_rows == max(held) and batch.cache.length == length
    pad = [np.pad(other.mask, ((0, 0), (length - other.mask.shape[1], 0))) for other in joining]
    batch.mask = np.concatenate([batch.mask, *pad])
    batch.rows += [row for other in joining for row in other.rows]
    for _ in range(4):
        batch.check(batch.step(rng.integers(3, 97, 4).tolist()))

    # leave: the long row goes, so the left padding nobody needs is dropped
    keep = [1, 3, 2]
    drop = int(np.argmax(batch.mask[keep] != 0, axis=1).min())
    assert drop > 0
    batch.cache = batch.cache.select(keep, drop)
    batch.mask, batch.rows = batch.mask[keep][:, drop:], [batch.rows[i] for i in keep]
    batch.check(batch.step(rng.integers(3, 97, 3).tolist()))

    # leave and join in one copy (a server's step): row 0 goes, a 6-token row comes in
    joining = Batch(model, [rng.integers(3, 97, 6).tolist()])
    keep = [2, 1]
    drop = int(np.argmax(batch.mask[keep] != 0, axis=1).min())
    batch.cache = batch.cache.regroup(keep, drop, [joining.cache])
    masks = [batch.mask[keep][:, drop:], joining.mask]
    length = max(mask.shape[1] for mask in masks)
    assert batch.cache.length == length and batch.cache.batch == 3
    batch.mask = np.concatenate([np.pad(m, ((0, 0), (length - m.shape[1], 0))) for m in masks])
    batch.rows = [batch.rows[i] for i in keep] + joining.rows
    for _ in range(3):
        batch.check(batch.step(rng.integers(3, 97, 3).tolist()))

    # beam-search reorder: rows repeat and swap
    order = [2, 2, 0]
    batch.cache = batch.cache.reorder(order)
    batch.mask, batch.rows = batch.mask[order], [list(batch.rows[i]) for i in order]
    for _ in range(3):
        batch.check(batch.step(rng.integers(3, 97, 3).tolist()))


def test_shared_buffer_rows_move_inside_their_buffers_while_they_fit(folders):
    """A server's regroup (rows leave, one joins) reuses the buffers, holes filled by the last
    row; a batch larger than the buffers gets new ones. The logits stay those of fresh forwards."""
    model = CausalLM.load(folders / "optimized", cache_mode="shared-buffer", intra_op_threads=1)
    rng = np.random.default_rng(1)
    batch = Batch(model, [rng.integers(3, 97, n).tolist() for n in (5, 9, 3, 7)])
    batch.check(batch.step(rng.integers(3, 97, 4).tolist()))
    before = batch.cache.host_arrays()

    keep = [0, 3, 2]  # row 1 leaves; row 3 takes its place
    joining = Batch(model, [rng.integers(3, 97, 4).tolist()])
    old = batch.cache
    batch.cache = batch.cache.regroup(keep, 0, [joining.cache])
    after = batch.cache.host_arrays()
    assert all(np.shares_memory(after[name], before[name]) for name in after)
    with pytest.raises(InputError, match="moved into the one regroup returned"):
        old.select([0])  # the old cache's rows were moved: it refuses to be used again
    length = batch.cache.length
    pad = np.pad(joining.mask, ((0, 0), (length - joining.mask.shape[1], 0)))
    batch.mask = np.concatenate([batch.mask[keep], pad])
    batch.rows = [batch.rows[i] for i in keep] + joining.rows
    for _ in range(3):
        batch.check(batch.step(rng.integers(3, 97, 4).tolist()))

    others = [Batch(model, [rng.integers(3, 97, 2).tolist()]) for _ in range(2)]
    grown = batch.cache.extend(*(other.cache for other in others))  # 6 rows: past the buffers' 4
    assert grown.batch == 6
    assert not any(np.shares_memory(grown.host_arrays()[name], after[name]) for name in after)


def test_caches_of_different_models_or_modes_do_not_join(folders):
    concat = CausalLM.load(folders / "optimized", cache_mode="concat")
    shared = CausalLM.load(folders / "optimized", cache_mode="shared-buffer")
    with pytest.raises(InputError, match="one cache mode"):
        concat.new_cache(1).extend(shared.new_cache(1))


DROP_MODES = [*MODES, ("optimized", "shared-buffer", "ragged")]


@pytest.mark.parametrize(
    ("flavor", "mode", "io_binding"), DROP_MODES, ids=["-".join(map(str, m)) for m in DROP_MODES]
)
def test_newest_rows_dropped_like_fresh_runs(folders, flavor, mode, io_binding):
    """Prompt lookup's refused drafts: a 4-token step on a past keeps its rows spare, then
    `drop_newest` removes some; every later step equals a fresh forward over the kept tokens."""
    ragged = io_binding == "ragged"
    io_binding = None if ragged else io_binding
    model = CausalLM.load(folders / flavor, cache_mode=mode, io_binding=io_binding, intra_op_threads=1)
    rng = np.random.default_rng(1)
    tokens = rng.integers(3, 97, 6).tolist()
    past = model.new_cache(1, 40, ragged=True) if ragged else None
    _, cache = model.forward(np.array([tokens]), np.ones((1, 6), np.int64), past=past, capacity=40)
    assert cache.ragged == ragged
    for dropped in (3, 0, 2, 1, 3):
        new = rng.integers(3, 97, 4).tolist()
        tokens += new
        ids = np.array([tokens])
        logits, cache = model.forward(np.array([new]), np.ones_like(ids), past=cache, num_logits_to_keep=4)
        fresh, _ = model.forward(ids, np.ones_like(ids))
        np.testing.assert_allclose(logits, fresh[:, -4:], atol=1e-4)
        cache.drop_newest(dropped)
        del tokens[len(tokens) - dropped :]
        assert cache.length == len(tokens) and cache.local_rows >= 3  # min_rows (window 4) remain
    assert cache.local_rows < cache.length  # local rows were trimmed along the way
    with pytest.raises(InputError, match="count must be in"):
        cache.drop_newest(cache.length + 1)


class RaggedBatch(Batch):
    """A Batch in a RaggedCache: each row as long as itself, masks built by the cache."""

    def __init__(self, model: CausalLM, prompts: list[list[int]]):
        longest = max(map(len, prompts))
        ids = np.array([[0] * (longest - len(p)) + p for p in prompts])
        starts = longest - np.array([len(p) for p in prompts])
        self.mask = (np.arange(longest)[None, :] >= starts[:, None]).astype(np.int64)
        self.model, self.rows = model, [list(p) for p in prompts]
        past = model.new_cache(len(prompts), 40, ragged=True)
        self.logits, self.cache = model.forward(ids, self.mask, past=past)

    def step(self, tokens: list[int]) -> np.ndarray:
        self.mask = self.cache.next_mask(self.mask)
        for row, token in zip(self.rows, tokens):
            row.append(token)
        logits, self.cache = self.model.forward(np.array(tokens)[:, None], self.mask, past=self.cache)
        # each row ends at its own last real column; the batch is as wide as its longest row
        last_real = self.mask.shape[1] - 1 - np.argmax(self.mask[:, ::-1], axis=1)
        assert (self.cache.ends == last_real + 1).all() and self.cache.length == self.mask.shape[1]
        return logits[:, -1]

    def regroup(self, keep: list[int], others: list[RaggedBatch]) -> None:
        self.cache = self.cache.regroup(keep, 0, [other.cache for other in others])
        self.mask = self.cache.layout_mask([self.mask[keep], *(other.mask for other in others)])
        self.rows = [list(self.rows[i]) for i in keep] + [row for other in others for row in other.rows]


def test_ragged_rows_join_leave_and_reorder_like_fresh_runs(folders):
    """A server's batch in a RaggedCache: rows of 2-16 tokens join, leave and reorder; each step's
    logits equal a fresh forward of the row alone, while every row ends at its own column and the
    windowed local layers are trimmed row by row."""
    model = CausalLM.load(folders / "optimized", cache_mode="shared-buffer", intra_op_threads=1)
    assert model.ragged_rows
    rng = np.random.default_rng(2)
    batch = RaggedBatch(model, [rng.integers(3, 97, 12).tolist(), rng.integers(3, 97, 3).tolist()])
    for _ in range(3):
        batch.check(batch.step(rng.integers(3, 97, 2).tolist()))
    assert batch.cache.ends.tolist() == [15, 15]  # one prefill: both rows end together
    batch.regroup([0, 1], [RaggedBatch(model, [rng.integers(3, 97, n).tolist()]) for n in (2, 5)])
    assert batch.cache.ends.tolist() == [15, 15, 2, 5]  # joining rows start at column 0
    for _ in range(4):
        batch.check(batch.step(rng.integers(3, 97, 4).tolist()))
    starts = batch.cache.local_starts
    assert (starts > 0).any() and len(set(starts.tolist())) > 1  # trimmed rows, at their own steps

    # the longest rows leave: the batch narrows to its longest remaining row; one joins in place
    buffers = batch.cache.host_arrays()
    batch.regroup([3, 2], [RaggedBatch(model, [rng.integers(3, 97, 16).tolist()])])
    assert batch.cache.ends.tolist() == [9, 6, 16] and batch.mask.shape == (3, 16)
    after = batch.cache.host_arrays()
    assert all(np.shares_memory(after[name], buffers[name]) for name in after)
    for _ in range(3):
        batch.check(batch.step(rng.integers(3, 97, 3).tolist()))

    # beam-search reorder (rows repeat: new buffers), then every row leaves and two join
    batch.regroup([2, 2, 0], [])
    batch.check(batch.step(rng.integers(3, 97, 3).tolist()))
    batch.regroup([], [RaggedBatch(model, [rng.integers(3, 97, n).tolist() for n in (4, 7)])])
    assert batch.cache.ends.tolist() == [7, 7]
    for _ in range(3):
        batch.check(batch.step(rng.integers(3, 97, 2).tolist()))


def test_a_ragged_cache_refuses_a_padded_mask_and_a_drop(folders):
    """A mask whose rows do not end where the cache's rows end would write tokens at the wrong
    columns: refused with what to do. Dropping columns would move rows: refused too."""
    model = CausalLM.load(folders / "optimized", cache_mode="shared-buffer", intra_op_threads=1)
    batch = RaggedBatch(model, [[5, 6, 7, 8]])
    other = RaggedBatch(model, [[9, 10]])
    batch.regroup([0], [other])
    padded = np.concatenate([batch.mask, np.ones((2, 1), np.int64)], axis=1)  # a left-padded batch's step
    with pytest.raises(InputError, match="build the mask with cache.next_mask"):
        model.forward(np.array([[3], [4]]), padded, past=batch.cache)
    with pytest.raises(InputError, match="drop must be 0"):
        batch.cache.select([0, 1], drop=1)
    batch.check(batch.step([3, 4]))  # the refusals changed nothing


def test_ragged_caches_need_an_export_that_offers_them(folders):
    """Exports made before `cache.ragged_rows` (their GQA reads every row to the last column)
    and concat caches run left-padded batches only."""
    concat = CausalLM.load(folders / "optimized", cache_mode="concat")
    assert not concat.ragged_rows
    with pytest.raises(InputError, match="ragged caches need the shared-buffer cache mode"):
        concat.new_cache(1, ragged=True)
    older = CausalLM.load(folders / "optimized", cache_mode="shared-buffer")
    del older.manifest.raw["cache"]["ragged_rows"]
    assert not older.ragged_rows
    assert not CausalLM.load(folders / "portable").ragged_rows
