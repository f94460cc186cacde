"""The KV cache as an object: one class per cache mode (docs/sidecar.md) behind one interface.

A session builds a step's token inputs and calls `cache.run(session, inputs, attention_mask)`:
the cache adds its `feeds` (past tensors or bound buffers, and the local layers' mask), runs the
graph, `absorb`s the presents and `trim`s the local layers' rows. Rows leave a running batch with
`select`, join it with `extend` (left padding realigned, as TGI's CausalLMBatch filter and
concatenate), or both in one copy with `regroup`; they are reordered for beam search with
`reorder`, and the newest rows (refused prompt-lookup drafts) go again with `drop_newest`.

Layout: each value is (B, H, rows, D). Row t of a global layer is column t of the attention mask,
left padding included; the local layers of a windowed export hold only the newest `local_rows`
columns (runtime/local_window.py).

- `ConcatCache`: host arrays; the graph returns present = concat(past, new), fed back next step.
- `BoundConcatCache`: the same with OrtValues where the provider runs (IO binding), so only the
  logits come back to the host; a device cache keeps every local row.
- `SharedBufferCache`: one (B, H, capacity, D) buffer per tensor, bound once as both past and
  present and written in place by the graph.
- `RaggedCache`: shared buffers whose rows end at their own columns, left-aligned, for exports
  whose graph reads each row up to its mask's last real column (`cache.ragged_rows`).
"""

from __future__ import annotations

import mmap
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import onnxruntime as ort

from gptneo_onnx.runtime.cache_spec import CacheSpec, bind_host_inputs
from gptneo_onnx.runtime.errors import InputError


class KVCache:
    """One batch's past keys and values; `values` are keyed by the graph's past input names.

    `run` and `drop_newest` change the cache in place; `select`, `extend` and `reorder` return a
    new cache (the old one may share buffers with it and should not be run again).
    """

    mode: ClassVar[str]

    in_place: ClassVar[bool] = False  # trims in place (shared buffers) or replaces the arrays
    # rows end at their own columns (RaggedCache) or all at `length`, left-padded
    ragged: ClassVar[bool] = False

    def __init__(
        self, spec: CacheSpec, values: dict[str, Any], length: int = 0, local_rows: int | None = None
    ):
        self.spec = spec
        self.values = values
        self.length = length  # past_sequence_length: mask columns cached
        # rows the local layers of a windowed cache hold: the newest `local_rows` columns
        self.local_rows = length if local_rows is None else local_rows

    @classmethod
    def empty(cls, spec: CacheSpec, batch: int, capacity: int | None = None) -> KVCache:
        arrays = {
            past: np.zeros((batch, spec.num_heads, 0, spec.head_dim), spec.dtype) for past, _ in spec.names
        }
        return cls.from_host(spec, arrays, 0, 0, capacity)

    @classmethod
    def from_host(
        cls,
        spec: CacheSpec,
        arrays: dict[str, np.ndarray],
        length: int,
        local_rows: int,
        capacity: int | None = None,
    ) -> KVCache:
        """A cache of this mode holding `arrays` (each (B, H, rows, D), the filled rows only)."""
        raise NotImplementedError

    def host_arrays(self) -> dict[str, np.ndarray]:
        """The filled rows of each value as host arrays (views where the values live on the host)."""
        raise NotImplementedError

    # ---- one step ------------------------------------------------------------------------------
    @property
    def batch(self) -> int:
        value = next(iter(self.values.values()))
        return int(value.shape()[0] if isinstance(value, ort.OrtValue) else value.shape[0])

    def row_ends(self) -> np.ndarray:
        """Each row's columns: where its next token goes (all at `length` here)."""
        return np.full(self.batch, self.length, np.int64)

    def rows(self, name: str) -> int:
        """Rows held by the value `name` (local layers of a windowed cache hold fewer)."""
        return self.local_rows if self.spec.is_local(name) else self.length

    def feeds(self, attention_mask: np.ndarray, new: int) -> dict[str, Any]:
        """The run's inputs besides the tokens: the local layers' mask (windowed exports)."""
        local = self.spec.local
        return {} if local is None else {local.input: local.mask(attention_mask, self.local_rows, new)}

    def next_mask(self, attention_mask: np.ndarray) -> np.ndarray:
        """The mask for a one-token step on this cache: `attention_mask` (its rows' columns so
        far) with each row's next column set; here, one column of ones appended."""
        return np.concatenate([attention_mask, np.ones((self.batch, 1), np.int64)], axis=1)

    def layout_mask(self, masks: list[np.ndarray]) -> np.ndarray:
        """The attention mask of a batch `regroup` returned, from its parts' masks in order (the
        kept rows' with the dropped columns gone, then each joining cache's): left-padded here."""
        return np.concatenate([np.pad(mask, ((0, 0), (self.length - mask.shape[1], 0))) for mask in masks])

    def run(
        self,
        session: ort.InferenceSession,
        inputs: dict[str, np.ndarray],
        attention_mask: np.ndarray,
        spare: int = 0,
    ) -> np.ndarray:
        """Run the graph on `inputs` (token ids, mask, positions, optionally `num_logits_to_keep`)
        on top of this cache; returns the logits (B, S or min(K, S), V) float32 and leaves the new
        rows in the cache. `spare`: newest rows the caller may `drop_newest` after this step."""
        new = attention_mask.shape[1] - self.length
        logits, outputs = self.execute(session, {**inputs, **self.feeds(attention_mask, new)}, new)
        self.absorb(outputs, new)
        self.trim(spare)
        return logits

    def execute(
        self, session: ort.InferenceSession, feeds: dict[str, Any], new: int
    ) -> tuple[np.ndarray, dict]:
        """Run the graph; returns the logits and the presents by past name."""
        raise NotImplementedError

    def absorb(self, outputs: dict[str, Any], new: int) -> None:
        """Take the presents as the next pasts (a shared buffer already holds them)."""
        self.values.update(outputs)
        self.length += new
        self.local_rows += new

    def trim(self, spare: int = 0) -> None:
        """Windowed local cache on the host: past `min_rows + spare + slack`, keep the newest
        `min_rows + spare` (`spare` rows may be dropped again, and min_rows must remain)."""
        local = self.spec.local
        if local is None or not self.spec.on_host:
            return
        if local.rows_to_keep(self.local_rows, spare) == self.local_rows:
            return
        arrays = {name: value for name, value in self.host_arrays().items() if self.spec.is_local(name)}
        self.local_rows = local.trim(arrays, self.local_rows, self.in_place, spare)
        self.store_local(arrays)

    def store_local(self, arrays: dict[str, np.ndarray]) -> None:
        """Keep the trimmed local arrays (concat modes replace their values)."""
        self.values.update(arrays)

    def drop_newest(self, count: int) -> None:
        """Forget the newest `count` rows of every row (prompt lookup's refused drafts), in place:
        the caller drops their columns from its attention mask."""
        if not (isinstance(count, int) and 0 <= count <= min(self.length, self.local_rows)):
            raise InputError(f"count must be in [0, {min(self.length, self.local_rows)}], got {count!r}")
        if count:
            self.length -= count
            self.local_rows -= count
            self.cut(count)

    def cut(self, count: int) -> None:
        """Remove the newest `count` rows from each value (`length` is already lowered)."""
        raise NotImplementedError

    # ---- rows leave, join, reorder ---------------------------------------------------------------
    def capacity(self) -> int | None:
        return None

    def select(self, rows: list[int] | np.ndarray, drop: int = 0, capacity: int | None = None) -> KVCache:
        """Keep these batch rows, in this order; `drop` leading columns (left padding of every kept
        row) go too, so the caller drops them from its attention mask. `capacity`: the new shared
        buffers' rows (default: as now); size it to what the rows still need."""
        return self.regroup(rows, drop, (), capacity or self.capacity())

    def reorder(self, indices: list[int] | np.ndarray) -> KVCache:
        """Beam search: row i of the new cache is row `indices[i]` of this one."""
        return self.select(indices)

    def extend(self, *others: KVCache, capacity: int | None = None) -> KVCache:
        """These rows, then the others' rows: one batch `max(length)` columns long. A shorter cache's
        rows are left-padded with zeros; left-pad its attention mask by `length - its length`.
        `capacity`: the shared buffers' rows (default: the largest of the caches')."""
        return self.regroup(range(self.batch), 0, others, capacity)

    def regroup(
        self,
        rows: list[int] | range | np.ndarray,
        drop: int = 0,
        others: tuple[KVCache, ...] | list[KVCache] = (),
        capacity: int | None = None,
    ) -> KVCache:
        """`select(rows, drop)` then `extend(*others)` in one copy: a server's batch, where rows
        leave and join between two steps."""
        return self._copied(self._layout(rows, drop, others), others, capacity)

    def _layout(self, rows, drop: int, others) -> _Layout:
        """Checks a regroup and works out the new batch's columns."""
        if any(type(cache) is not type(self) or cache.spec != self.spec for cache in [self, *others]):
            raise InputError("extend joins caches of one model and one cache mode")
        if not 0 <= drop <= self.length:
            raise InputError(f"drop must be in [0, {self.length}], got {drop}")
        own_length = self.length - drop
        own_local = min(self.local_rows, own_length)
        # Local layers: the most rows any cache holds. Zero rows in front of an untrimmed cache
        # fall on its left padding; in front of a trimmed one (>= min_rows rows), outside the window.
        return _Layout(
            rows=np.asarray(rows, dtype=np.int64),
            own_length=own_length,
            own_local=own_local,
            length=max([own_length, *(cache.length for cache in others)]),
            local_rows=max([own_local, *(cache.local_rows for cache in others)]),
        )

    def _copied(self, layout: _Layout, others, capacity: int | None) -> KVCache:
        """The regrouped batch in new arrays."""
        own = self.host_arrays()
        hosts = [cache.host_arrays() for cache in others]
        arrays = {}
        for name, _ in self.spec.names:
            kept, width = layout.widths(self.spec.is_local(name))
            array = own[name]
            parts = [array[layout.rows][:, :, array.shape[2] - kept :], *(host[name] for host in hosts)]
            if len(parts) == 1:
                arrays[name] = np.ascontiguousarray(parts[0])
                continue
            batch = sum(part.shape[0] for part in parts)
            joined = np.zeros((batch, self.spec.num_heads, width, self.spec.head_dim), self.spec.dtype)
            start = 0
            for part in parts:  # right-aligned: zero rows in front of the shorter ones
                joined[start : start + part.shape[0], :, width - part.shape[2] :] = part
                start += part.shape[0]
            arrays[name] = joined
        capacity = capacity or max(cache.capacity() or 0 for cache in [self, *others]) or None
        return self.from_host(self.spec, arrays, layout.length, layout.local_rows, capacity)


@dataclass(frozen=True)
class _Layout:
    """A regroup: the kept batch rows (in their new order) and the columns before and after."""

    rows: np.ndarray
    own_length: int  # columns of the kept rows (left padding dropped)
    own_local: int  # local-layer rows of the kept rows
    length: int  # the new batch's columns
    local_rows: int  # the new batch's local-layer rows

    def widths(self, local: bool) -> tuple[int, int]:
        """(kept rows' filled rows, the new batch's) of a local or a global value."""
        return (self.own_local, self.local_rows) if local else (self.own_length, self.length)


class ConcatCache(KVCache):
    """Host arrays, fed to `session.run`; the presents come back as the next pasts."""

    mode = "concat"

    @classmethod
    def from_host(cls, spec, arrays, length, local_rows, capacity=None):  # noqa: D102
        return cls(spec, dict(arrays), length, local_rows)

    def host_arrays(self) -> dict[str, np.ndarray]:
        return dict(self.values)

    def cut(self, count: int) -> None:  # noqa: D102
        self.values = {
            name: np.ascontiguousarray(a[:, :, : self.rows(name)]) for name, a in self.values.items()
        }

    def execute(self, session, feeds, new):  # noqa: D102
        names = self.spec.output_names()
        outputs = session.run(names, {**feeds, **self.values})
        presents = {past: value for (past, _), value in zip(self.spec.names, outputs[1:])}
        return outputs[0].astype(np.float32, copy=False), presents


class BoundConcatCache(KVCache):
    """Concat through IO binding: pasts and presents stay where the provider runs (OrtValues)."""

    mode = "concat"

    @classmethod
    def empty(cls, spec: CacheSpec, batch: int, capacity: int | None = None) -> KVCache:
        shape = (batch, spec.num_heads, 0, spec.head_dim)
        make = ort.OrtValue.ortvalue_from_shape_and_type
        return cls(spec, {past: make(shape, spec.dtype.type, *spec.device) for past, _ in spec.names})

    @classmethod
    def from_host(cls, spec, arrays, length, local_rows, capacity=None):  # noqa: D102
        values = {
            name: ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(array), *spec.device)
            for name, array in arrays.items()
        }
        return cls(spec, values, length, local_rows)

    def host_arrays(self) -> dict[str, np.ndarray]:
        return {name: value.numpy() for name, value in self.values.items()}  # a view on the CPU

    def execute(self, session, feeds, new):  # noqa: D102
        binding = session.io_binding()
        bound = bind_host_inputs(binding, feeds)
        for name, value in self.values.items():
            binding.bind_ortvalue_input(name, value)
        binding.bind_output(self.spec.logits, "cpu")
        for _, present in self.spec.names:
            binding.bind_output(present, *self.spec.device)
        session.run_with_iobinding(binding)
        del bound
        outputs = binding.get_outputs()
        presents = {past: value for (past, _), value in zip(self.spec.names, outputs[1:])}
        return outputs[0].numpy().astype(np.float32, copy=False), presents

    def store_local(self, arrays: dict[str, np.ndarray]) -> None:
        self.values.update({name: ort.OrtValue.ortvalue_from_numpy(array) for name, array in arrays.items()})

    def cut(self, count: int) -> None:  # noqa: D102
        # through the host (numpy() of a device value is a copy), as select does
        arrays = {name: array[:, :, : self.rows(name)] for name, array in self.host_arrays().items()}
        self.values = self.from_host(self.spec, arrays, self.length, self.local_rows).values


class SharedBufferCache(KVCache):
    """One (B, H, capacity, D) buffer per tensor, bound as both past and present once per cache
    and written in place; a step rebinds only the token inputs and the logits.

    On the CPU, rows that leave and join move inside the same buffers where they fit (`regroup`):
    the buffers keep the most rows and columns the batch has had, and the values view their first
    `batch` rows. A fresh buffer costs a page fault per 4 KiB written, about as much as the copy.
    """

    mode = "shared-buffer"

    in_place = True

    def __init__(self, spec, values, length=0, local_rows=None, buffers=None):  # noqa: D107
        super().__init__(spec, values, length, local_rows)
        self._binding: ort.IOBinding | None = None
        self._buffers: dict[str, np.ndarray] | None = buffers  # on the CPU: what the values view
        self._moved = False  # its rows moved into the cache an in-place regroup returned

    @classmethod
    def from_host(cls, spec, arrays, length, local_rows, capacity=None):  # noqa: D102
        values, buffers = _new_buffers(spec, arrays, length, capacity)
        return cls(spec, values, length, local_rows, buffers)

    def capacity(self) -> int:
        return int(next(iter(self.values.values())).shape()[2])

    def host_arrays(self) -> dict[str, np.ndarray]:
        self._check_not_moved()
        # numpy() of a CPU OrtValue is a view of it: trimming on the host works in place.
        return {name: value.numpy()[:, :, : self.rows(name)] for name, value in self.values.items()}

    def _check_not_moved(self) -> None:
        if self._moved:
            raise InputError("this cache's rows moved into the one regroup returned: use that one")

    def regroup(self, rows, drop=0, others=(), capacity=None):  # noqa: D102
        self._check_not_moved()
        layout = self._layout(rows, drop, others)
        batch = len(layout.rows) + sum(other.batch for other in others)
        if not self._fits_in_place(layout, batch, others, capacity):
            return self._copied(layout, others, capacity)
        hosts = [other.host_arrays() for other in others]
        values = {}
        for name, buffer in self._buffers.items():
            kept, width = layout.widths(self.spec.is_local(name))
            source = self.rows(name) - kept  # the kept rows' first column
            target = width - kept  # right-aligned in the new batch
            # Row i of the new batch comes from row rows[i] >= i, never one written already.
            for index, row in enumerate(layout.rows):
                if index != row or source != target:
                    buffer[index, :, target:width] = buffer[row, :, source : source + kept]
                buffer[index, :, :target] = 0
            start = len(layout.rows)
            for host in hosts:
                part = host[name]
                end, pad = start + part.shape[0], width - part.shape[2]
                buffer[start:end, :, pad:width] = part
                buffer[start:end, :, :pad] = 0
                start = end
            values[name] = ort.OrtValue.ortvalue_from_numpy(buffer[:batch])
        self._moved = True
        return type(self)(self.spec, values, layout.length, layout.local_rows, self._buffers)

    def _fits_in_place(self, layout: _Layout, batch: int, others, capacity: int | None) -> bool:
        """Whether the new batch (`batch` rows) fits this cache's buffers, moving each row at most once."""
        if self._buffers is None or any(other is self for other in others):
            return False
        buffer = next(iter(self._buffers.values()))
        rows_ok = bool(np.all(layout.rows >= np.arange(len(layout.rows)))) and (
            not len(layout.rows) or int(layout.rows.max()) < self.batch
        )
        columns = max(capacity or 0, layout.length)
        return rows_ok and batch <= buffer.shape[0] and columns <= buffer.shape[2]

    def execute(self, session, feeds, new):  # noqa: D102
        self._check_not_moved()
        if self.length + new > self.capacity():
            raise InputError(
                f"{self.length + new} tokens exceed the cache capacity ({self.capacity()}); "
                "pass a larger capacity at the prefill"
            )
        binding = self._binding
        if binding is None:
            binding = self._binding = session.io_binding()
            for past, present in self.spec.names:
                binding.bind_ortvalue_input(past, self.values[past])
                binding.bind_ortvalue_output(present, self.values[past])
        bound = bind_host_inputs(binding, feeds)
        logits = np.empty((self.batch, self.spec.logits_rows(feeds, new), self.spec.vocab_size), np.float32)
        binding.bind_ortvalue_output(self.spec.logits, ort.OrtValue.ortvalue_from_numpy(logits))
        session.run_with_iobinding(binding)
        del bound
        return logits, {}

    def store_local(self, arrays: dict[str, np.ndarray]) -> None:
        pass  # trimmed in place

    def cut(self, count: int) -> None:
        pass  # the rows past `length` are written over by the next step


class RaggedCache(SharedBufferCache):
    """Shared buffers whose rows end where each row ends (exports with `cache.ragged_rows`).

    Row b holds columns `[0, ends[b])` of its attention mask, left-aligned; the mask's later
    columns are zero, and the graph reads and writes the row only up to its last real column. A
    batch is as wide as its longest row, yet a short row's attention reads only its own columns,
    and rows that stay through a regroup do not move along the sequence. Left padding inside a
    row (its prefill's) stays where it is, masked. The caller builds each step's mask with
    `next_mask`, and the masks of a regroup's parts with `layout_mask`.

    Local layers of a windowed export: row b's local buffers hold its mask columns
    `[local_starts[b], ends[b])` at `[0, ends[b] - local_starts[b])`, trimmed row by row.
    """

    ragged = True

    def __init__(self, spec, values, ends, local_starts, buffers=None):  # noqa: D107
        self.ends = np.array(ends, np.int64)
        self.local_starts = np.array(local_starts, np.int64)
        super().__init__(spec, values, 0, 0, buffers)
        self._sync()

    def _sync(self) -> None:
        """`length` and `local_rows`: the most columns any row holds (the buffers' used width)."""
        self.length = int(self.ends.max(initial=0))
        self.local_rows = int((self.ends - self.local_starts).max(initial=0))

    def row_ends(self) -> np.ndarray:  # noqa: D102
        return self.ends.copy()

    def held(self, name: str) -> np.ndarray:
        """Columns each row holds in the value `name`."""
        return self.ends - self.local_starts if self.spec.is_local(name) else self.ends

    @classmethod
    def from_host(cls, spec, arrays, length, local_rows, capacity=None):  # noqa: D102
        values, buffers = _new_buffers(spec, arrays, length, capacity)
        batch = next(iter(arrays.values())).shape[0]
        return cls(spec, values, [length] * batch, [length - local_rows] * batch, buffers)

    # ---- one step ------------------------------------------------------------------------------
    def next_mask(self, attention_mask: np.ndarray) -> np.ndarray:
        """The mask for a one-token step: each row's next column set, `length + 1` columns."""
        width = self.length + 1
        mask = np.zeros((self.batch, width), np.int64)
        kept = min(width, attention_mask.shape[1])
        mask[:, :kept] = attention_mask[:, :kept]
        mask[np.arange(self.batch), self.ends] = 1
        return mask

    def layout_mask(self, masks: list[np.ndarray]) -> np.ndarray:
        """Left-aligned, `length` columns: the zero columns past every row's end are cut."""
        return np.concatenate([_fit_right(mask, self.length) for mask in masks])

    def feeds(self, attention_mask: np.ndarray, new: int) -> dict[str, Any]:
        """Checks that each row's new tokens end at its last real column; the local layers'
        mask takes each row's local columns, left-aligned."""
        ends = self.ends + new
        last_real = attention_mask.shape[1] - 1 - np.argmax(attention_mask[:, ::-1] != 0, axis=1)
        if not np.array_equal(last_real, ends - 1):
            raise InputError(
                f"the attention mask's last real column per row is {last_real.tolist()}, but this "
                f"ragged cache's rows end at {(ends - 1).tolist()} after the step; build the mask "
                "with cache.next_mask"
            )
        local = self.spec.local
        if local is None:
            return {}
        local_mask = np.zeros((self.batch, self.local_rows + new), np.int64)
        for row, (start, end) in enumerate(zip(self.local_starts, ends)):
            local_mask[row, : end - start] = attention_mask[row, start:end]
        return {local.input: local_mask}

    def absorb(self, outputs: dict[str, Any], new: int) -> None:
        self.ends += new
        self._sync()

    def trim(self, spare: int = 0) -> None:
        """Each row's local buffers, as `KVCache.trim` trims a batch's."""
        local = self.spec.local
        if local is None or self._buffers is None:
            return
        for row, held in enumerate(self.ends - self.local_starts):
            keep = local.rows_to_keep(int(held), spare)
            if keep == held:
                continue
            for name in local.past_names:
                local.move_newest_to_front(self._buffers[name][row : row + 1], int(held), keep)
            self.local_starts[row] = self.ends[row] - keep
        self._sync()

    def drop_newest(self, count: int) -> None:  # noqa: D102
        fewest = int((self.ends - self.local_starts).min()) if self.batch else 0  # local rows <= ends
        if not (isinstance(count, int) and 0 <= count <= fewest):
            raise InputError(f"count must be in [0, {fewest}], got {count!r}")
        self.ends -= count
        self._sync()

    # ---- rows leave, join, reorder ---------------------------------------------------------------
    def regroup(self, rows, drop=0, others=(), capacity=None):
        """Rows keep their columns: `drop` must be 0 unless no row stays. Joining rows (of other
        ragged caches) start at column 0. In place where the new batch fits these buffers."""
        self._check_not_moved()
        rows = np.asarray(rows, dtype=np.int64)
        if any(type(cache) is not type(self) or cache.spec != self.spec for cache in others):
            raise InputError("extend joins ragged caches of one model")
        if drop and len(rows):
            raise InputError("a ragged cache keeps each row's columns: drop must be 0")
        if len(rows) and (rows.min() < 0 or rows.max() >= self.batch):
            raise InputError(f"rows must be in [0, {self.batch})")
        ends = np.concatenate([self.ends[rows], *(other.ends for other in others)])
        starts = np.concatenate([self.local_starts[rows], *(other.local_starts for other in others)])
        length, batch = int(ends.max(initial=0)), len(ends)
        in_place = (
            self._buffers is not None
            and not any(other is self for other in others)
            and bool(np.all(rows >= np.arange(len(rows))))
            and batch <= next(iter(self._buffers.values())).shape[0]
            and max(capacity or 0, length) <= self.capacity()
        )
        if in_place:
            buffers = self._buffers
            for name, buffer in buffers.items():
                held = self.held(name)
                for index, row in enumerate(rows):  # row i comes from rows[i] >= i, not yet written
                    if index != row:
                        buffer[index, :, : held[row]] = buffer[row, :, : held[row]]
        else:
            capacity = max(capacity or max(cache.capacity() for cache in [self, *others]), length)
            own = self.host_arrays()
            buffers = {}
            for name, _ in self.spec.names:
                shape = (batch, self.spec.num_heads, capacity, self.spec.head_dim)
                buffer = buffers[name] = _untouched_zeros(shape, self.spec.dtype)
                buffer[: len(rows), :, : own[name].shape[2]] = own[name][rows]
        start = len(rows)
        for other in others:
            for name, array in other.host_arrays().items():
                buffers[name][start : start + other.batch, :, : array.shape[2]] = array
            start += other.batch
        if in_place:
            self._moved = True
        values = {
            name: ort.OrtValue.ortvalue_from_numpy(buffer[:batch], *self.spec.device)
            for name, buffer in buffers.items()
        }
        return type(self)(self.spec, values, ends, starts, buffers if self.spec.on_host else None)


def _new_buffers(spec: CacheSpec, arrays: dict[str, np.ndarray], length: int, capacity: int | None):
    """(OrtValues, host buffers or None) of `capacity` columns holding `arrays` (B, H, rows, D)."""
    capacity = capacity or length
    if capacity < length:
        raise InputError(f"capacity {capacity} is below the {length} cached tokens")
    values, buffers = {}, {}
    for name, array in arrays.items():
        batch = array.shape[0]
        buffer = _untouched_zeros((batch, spec.num_heads, capacity, spec.head_dim), spec.dtype)
        buffer[:, :, : array.shape[2]] = array
        values[name] = ort.OrtValue.ortvalue_from_numpy(buffer, *spec.device)
        buffers[name] = buffer
    return values, buffers if spec.on_host else None


def _fit_right(mask: np.ndarray, width: int) -> np.ndarray:
    """`mask` cut or zero-padded on the right to `width` columns."""
    return np.pad(mask[:, :width], ((0, 0), (0, max(0, width - mask.shape[1]))))


def _untouched_zeros(shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
    """A zero array in anonymous memory that the OS maps page by page as it is written, so
    capacity that is never reached costs nothing. np.zeros asks for huge pages for big arrays: a
    fault then clears 2 MiB (or stalls to compact memory) while a cache writes only the first
    columns of each (batch, head) block; 8 rows of 125m at 512 columns took 0.3-0.7 s that way
    and ~0.1 s here."""
    count = int(np.prod(shape))
    memory = mmap.mmap(-1, max(1, count * np.dtype(dtype).itemsize))
    return np.frombuffer(memory, dtype, count).reshape(shape)


def cache_class(mode: str, io_binding: bool) -> type[KVCache]:
    """The class for a cache mode; `io_binding` keeps a concat cache where the provider runs."""
    if mode == "shared-buffer":
        return SharedBufferCache
    return BoundConcatCache if io_binding else ConcatCache


def resolve_cache_mode(requested: str, offered: list[str]) -> str:
    """The cache mode to run: `auto` takes shared buffers where the export offers them."""
    if requested == "auto":
        return "shared-buffer" if "shared-buffer" in offered else "concat"
    if requested not in offered:
        raise InputError(f"cache_mode {requested!r} is not offered by this export; it offers {offered}")
    return requested
