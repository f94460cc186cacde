"""The serving engine: one thread owns a CausalLM and runs iteration-level continuous batching.

Between two decode steps, finished, cancelled and timed-out rows leave the batch at once, and
the waiting requests that take the free slots are prefilled together, in groups of similar
length (one left-padded batch per group, logits of the last position only), and join it: one
`KVCache.regroup` (a shared-buffer cache moves the rows inside its own buffers). Where the
export offers it, the batch is a RaggedCache: each row is as long as itself and keeps its
columns, so a short row's attention does not read the longest row's length. Otherwise rows are
left-padded to the longest, and a regroup drops the left padding no remaining row needs. A
prefill stalls every running row, and one run for several prompts costs less than one run each.
Each row keeps its own sampling state (serve/row.py). Each prefill, decode step and regroup is
reported (`on_batch`) with its rows and seconds, so the server's metrics show where the engine's
time goes. Policies, for the serving benchmark:
- "continuous": rows join whenever a slot is free;
- "static": a batch is formed from the waiting requests and runs until every row has finished
  (finished rows stay in the batch, as in a batched `generate`); like a dynamic batcher's
  max_batch_delay, it waits up to STATIC_BATCH_WAIT_S for the slots to fill (from the first
  request, or from the end of the last batch), so a batch is not started by whichever request
  came first;
- "sequential": one request at a time;
- "continuous-padded": continuous, with the rows left-padded to the longest even where the
  export offers ragged rows: the layout of older exports, the benchmark's baseline for them.
"""

from __future__ import annotations

import math
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np

from gptneo_onnx.runtime import CausalLM, GenerationConfigError, InputError, KVCache
from gptneo_onnx.serve.batch_layout import (
    cache_capacity,
    fill_holes,
    prefill_groups,
    shared_padding,
)
from gptneo_onnx.serve.requests import (
    Draining,
    EngineEvent,
    EngineLimits,
    EngineRequest,
    FinishEvent,
    PromptEvent,
    QueueFull,
    RequestHandle,
    RequestTooLarge,
    TokenEvent,
)
from gptneo_onnx.serve.row import Row

__all__ = [
    "BatchRun",
    "Draining",
    "Engine",
    "EngineEvent",
    "EngineLimits",
    "EngineRequest",
    "EngineStats",
    "FinishEvent",
    "PromptEvent",
    "QueueFull",
    "RequestHandle",
    "RequestTooLarge",
    "TokenEvent",
]

POLICIES = ("continuous", "static", "sequential", "continuous-padded")
IDLE_WAIT_S = 0.05  # how often an idle engine looks at its queue's deadlines
PHASES = ("prefill", "decode", "regroup")
STATIC_BATCH_WAIT_S = 0.05  # the clients a batch's end released have sent their next requests by then


@dataclass(frozen=True)
class BatchRun:
    """One piece of the engine's work, for metrics: a prefill run (with its first tokens), a
    decode step (with each row's next token), or a regroup (rows joining or leaving the cache)."""

    phase: str  # one of PHASES
    rows: int  # rows prefilled, in the step, or in the batch after the regroup
    seconds: float


@dataclass
class _Prefilled:
    """Rows, their KV cache, attention mask and next input tokens: one part of the next batch."""

    rows: list[Row]
    cache: KVCache
    mask: np.ndarray
    next_tokens: np.ndarray


@dataclass
class EngineStats:
    running: int  # requests prefilled or in the batch
    waiting: int  # requests queued for a slot
    draining: bool


class Engine:
    def __init__(
        self,
        model: CausalLM,
        limits: EngineLimits = EngineLimits(),  # noqa: B008 - a frozen-by-convention default
        policy: str = "continuous",
        on_batch: Callable[[BatchRun], None] | None = None,
        ragged_rows: bool | None = None,
    ):
        """`on_batch` is called after each prefill, decode step and regroup (for metrics).
        `ragged_rows`: run the batch in a RaggedCache, each row as long as itself (default:
        where the model offers it, `CausalLM.ragged_rows`, with its cache on the host), or
        left-padded to the longest."""
        if policy not in POLICIES:
            raise ValueError(f"policy must be one of {', '.join(POLICIES)}, got {policy!r}")
        if policy == "continuous-padded":
            policy, ragged_rows = "continuous", False
        if limits.max_concurrent < 1 or limits.max_queue < 0:
            raise ValueError("max_concurrent must be >= 1 and max_queue >= 0")
        self.model, self.limits, self.policy, self.on_batch = model, limits, policy, on_batch
        # by default on the host only: ragged rows on CUDA await scripts/gpu_check.py
        default = model.ragged_rows and model.cache_spec.on_host
        self.ragged_rows = default if ragged_rows is None else ragged_rows
        if self.ragged_rows and not model.ragged_rows:
            raise ValueError(
                "ragged_rows needs an export and cache mode that offer it (CausalLM.ragged_rows)"
            )
        # On the host, a ragged batch's buffers can hold every slot and the whole context from
        # the start: untouched pages cost nothing (kv_cache._untouched_zeros), rows that stay
        # never move, and rows join in place instead of the batch being copied when it grows.
        self._whole_buffers = self.ragged_rows and model.cache_spec.on_host
        self._eos = model.manifest.eos_token_ids
        self._positions = model.manifest.max_position_embeddings
        self._lock = threading.Condition()
        self._waiting: deque[RequestHandle] = deque()
        self._active = 0  # admitted requests not yet finished (prefilling or in the batch)
        self._draining = self._stopping = False
        self._thread: threading.Thread | None = None
        self._mean_seconds = 1.0  # moving mean of request durations, for the Retry-After hint
        self._last_finish = 0.0  # when a request last finished (monotonic): a static batch's end
        # the running batch: rows, their KV cache, attention mask (B, L) and next input token
        self._rows: list[Row] = []
        self._cache: KVCache | None = None
        self._reset_batch()

    # ---- the caller's side -----------------------------------------------------------------------
    @property
    def stats(self) -> EngineStats:
        with self._lock:
            return EngineStats(self._active, len(self._waiting), self._draining)

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="gptneo-onnx-engine", daemon=True)
            self._thread.start()

    def submit(self, request: EngineRequest) -> RequestHandle:
        """Queue a request; raises RequestTooLarge, GenerationConfigError / InputError (bad
        input), Draining or QueueFull before anything runs."""
        self._check(request)
        timeout = self.limits.request_timeout
        with self._lock:
            if self._draining or self._stopping:
                raise Draining("the server is shutting down and admits no new requests")
            limit = self.limits.max_concurrent + self.limits.max_queue
            if self._active + len(self._waiting) >= limit:
                retry = self._mean_seconds * (len(self._waiting) + 1) / self.limits.max_concurrent
                raise QueueFull(
                    f"all {self.limits.max_concurrent} slots and {self.limits.max_queue} queue places "
                    "are taken; retry later",
                    retry_after=float(max(1, math.ceil(retry))),
                )
            handle = RequestHandle(request, None if timeout is None else time.monotonic() + timeout)
            self._waiting.append(handle)
            self._lock.notify_all()
        return handle

    def drain(self, timeout: float) -> None:
        """Admit nothing new, let admitted requests finish for up to `timeout` seconds, then end
        the rest ("cancelled") and stop."""
        deadline = time.monotonic() + timeout
        with self._lock:
            self._draining = True
            self._lock.notify_all()
            while self._active or self._waiting:
                left = deadline - time.monotonic()
                if left <= 0 or self._thread is None:
                    break
                self._lock.wait(left)
        self.stop()

    def stop(self) -> None:
        """End every request now ("cancelled") and stop the engine thread."""
        with self._lock:
            self._stopping = True
            self._lock.notify_all()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join()
        self._end_everything()

    def _check(self, request: EngineRequest) -> None:
        config, prompt = request.config, request.prompt_ids
        config.validate()
        config.check_token_ids(self.model.manifest.vocab_size)
        if config.num_beams != 1 or config.num_return_sequences != 1:
            raise GenerationConfigError("the engine decodes one sequence per request (num_beams=1, n=1)")
        if config.stop_strings:
            self.model.stop_check(config.stop_strings)  # raises without a tokenizer
        if not prompt:
            raise InputError("the prompt is empty")
        vocab = self.model.manifest.vocab_size
        if not all(isinstance(t, (int, np.integer)) and 0 <= t < vocab for t in prompt):
            raise InputError(f"prompt token ids must be integers in [0, {vocab})")
        new_tokens = 0 if request.score_only else config.max_new_tokens
        limits, total = self.limits, len(prompt) + new_tokens
        if limits.max_input_tokens is not None and len(prompt) > limits.max_input_tokens:
            raise RequestTooLarge(
                f"the prompt has {len(prompt)} tokens, over max_input_tokens ({limits.max_input_tokens})"
            )
        for name, limit in (
            ("max_total_tokens", limits.max_total_tokens),
            ("the model's context", self._positions),
        ):
            if limit is not None and total > limit:
                raise RequestTooLarge(
                    f"{len(prompt)} prompt tokens + max_new_tokens {new_tokens} = {total} "
                    f"tokens, over {name} ({limit})"
                )

    # ---- the engine thread -----------------------------------------------------------------------
    def _loop(self) -> None:
        while True:
            with self._lock:
                while not (self._stopping or self._rows or self._waiting):
                    self._lock.wait(IDLE_WAIT_S)
                if self._stopping:
                    return
            try:
                keep = self._leave()  # first, so that the slots it frees are taken at once
                with self._lock:
                    joining = self._admit()
                self._regroup(keep, self._join(joining))
                if self._rows:
                    self._step()
            except Exception as error:  # noqa: BLE001 - the batch fails, the engine goes on
                self._fail_batch(error)

    def _admit(self) -> list[RequestHandle]:
        """Under the lock: take the waiting requests this policy lets in now. A static batch that
        would start short waits (the lock released) and returns none; the loop asks again."""
        now = time.monotonic()
        for handle in list(self._waiting):
            reason = "cancelled" if handle.cancelled.is_set() else None
            if handle.deadline is not None and now > handle.deadline:
                reason = "timeout"
            if reason:
                self._waiting.remove(handle)
                handle.put(FinishEvent(reason, handle.prompt_tokens, 0, ""))
        live = sum(not row.done for row in self._rows)  # finished rows leave with the joining ones
        if self.policy == "continuous":
            free = self.limits.max_concurrent - live
        else:
            free = 0 if live else (1 if self.policy == "sequential" else self.limits.max_concurrent)
        if self.policy == "static" and not live and 0 < len(self._waiting) < free:
            batch_at = max(self._waiting[0].submitted, self._last_finish) + STATIC_BATCH_WAIT_S
            if now < batch_at and not (self._draining or self._stopping):
                self._lock.wait(batch_at - now)  # a new request, a stop, or the time is up
                return []
        joining = [self._waiting.popleft() for _ in range(min(free, len(self._waiting)))]
        for handle in joining:
            handle.admitted = now
        self._active += len(joining)
        return joining

    def _finish(self, row: Row, reason: str, error: str | None = None) -> None:
        row.finish(reason, error)
        with self._lock:
            self._active -= 1
            self._last_finish = time.monotonic()
            seconds = self._last_finish - row.handle.submitted
            self._mean_seconds = 0.8 * self._mean_seconds + 0.2 * seconds
            self._lock.notify_all()

    def _leave(self) -> list[int] | None:
        """Cancelled and timed-out rows finish; returns the rows that stay when some leave (None:
        the batch is unchanged). They leave in `_regroup`, with the joining rows, in one copy."""
        now = time.monotonic()
        for row in self._rows:
            if row.done:
                continue
            if row.handle.cancelled.is_set():
                self._finish(row, "cancelled")
            elif row.handle.deadline is not None and now > row.handle.deadline:
                self._finish(row, "timeout")
        keep = [i for i, row in enumerate(self._rows) if not row.done]
        if self.policy == "static" and keep:
            # a static batch runs until all of its rows have finished; a finished row leaves early
            # only when its next step would take it past the context
            ends = self._cache.row_ends()
            keep = [i for i, row in enumerate(self._rows) if not row.done or ends[i] < self._positions]
        return None if len(keep) == len(self._rows) else keep

    def _join(self, handles: list[RequestHandle]) -> list[_Prefilled]:
        """Prefill the admitted requests and emit their first tokens; returns the rows that go on."""
        rows = []
        for handle in handles:
            config = handle.request.config
            eos = self._eos if config.eos_token_id is None else config.eos_token_id
            row = Row(handle, eos, self.model.tokenizer, self.model.stop_check(config.stop_strings))
            if handle.cancelled.is_set():
                self._finish(row, "cancelled")
            else:
                rows.append(row)
        # a row that scores its prompt is prefilled alone: its logits for every position are
        # (prompt length x vocabulary) floats
        groups = [[row] for row in rows if row.scores_prompt]
        groups += prefill_groups([row for row in rows if not row.scores_prompt], self._positions)
        return [part for group in groups for part in self._prefill(group)]

    def _prefill(self, rows: list[Row]) -> list[_Prefilled]:
        """One left-padded prefill run for `rows` (a row that scores its prompt: alone); returns
        the rows that go on (none or one part)."""
        prompts = [row.handle.request.prompt_ids for row in rows]
        width = max(len(prompt) for prompt in prompts)
        ids = np.zeros((len(rows), width), np.int64)
        mask = np.zeros_like(ids)
        for index, prompt in enumerate(prompts):
            ids[index, width - len(prompt) :], mask[index, width - len(prompt) :] = prompt, 1
        going_on, next_tokens = [], []
        with self._timed("prefill", len(rows)):
            try:
                capacity = self._capacity(width, rows)
                past = self.model.new_cache(len(rows), capacity, ragged=True) if self.ragged_rows else None
                keep = 0 if rows[0].scores_prompt else 1  # 0: every position's logits
                logits, cache = self.model.forward(
                    ids, mask, past=past, capacity=capacity, num_logits_to_keep=keep
                )
            except Exception as error:  # noqa: BLE001 - these requests fail, the engine goes on
                for row in rows:
                    self._finish(row, "error", f"{type(error).__name__}: {error}")
                return []
            for index, row in enumerate(rows):
                if row.scores_prompt:
                    row.handle.put(row.prompt_event(logits[index]))
                if row.score_only:
                    self._finish(row, "length")
                    continue
                token = self._advance(row, logits[index, -1])
                if token is not None:
                    going_on.append(index)
                    next_tokens.append(token)
        if not going_on:
            return []
        rows = [rows[index] for index in going_on]
        if len(going_on) < len(ids):  # some finished at their first token
            mask = mask[going_on]
            drop = 0 if cache.ragged else shared_padding(mask)
            cache = cache.select(going_on, drop, self._capacity(cache.length - drop, rows))
            mask = mask[:, drop:]
        return [_Prefilled(rows, cache, mask, np.asarray(next_tokens, np.int64))]

    def _regroup(self, keep: list[int] | None, joining: list[_Prefilled]) -> None:
        """The next batch: the rows in `keep` (None: every row), dropping the left padding none of
        them needs (not in a ragged cache), then the joining rows; one KVCache.regroup. The rows
        that stay keep their places where they can (`fill_holes`), so a shared buffer moves few."""
        if keep is None:
            if not joining:
                return
            keep = list(range(len(self._rows)))
        with self._timed("regroup", len(keep) + sum(len(part.rows) for part in joining)):
            self._regroup_rows(fill_holes(keep), joining)

    def _regroup_rows(self, keep: list[int], joining: list[_Prefilled]) -> None:
        """`_regroup` with the order of the rows that stay settled."""
        parts, drop = list(joining), 0
        if keep:
            mask = self._mask[keep]
            drop = 0 if self._cache.ragged else shared_padding(mask)  # a ragged row keeps its columns
            kept = [self._rows[i] for i in keep]
            parts.insert(0, _Prefilled(kept, self._cache, mask[:, drop:], self._next[keep]))
        if not parts:
            return self._reset_batch()
        rows = [row for part in parts for row in part.rows]
        length = max(part.mask.shape[1] for part in parts)
        capacity = self._capacity(length, rows)
        others = [part.cache for part in joining]
        if keep:
            self._cache = self._cache.regroup(keep, drop, others, capacity)
        elif self._cache is not None:  # every row left: the joining rows take over its buffers
            self._cache = self._cache.regroup([], self._cache.length, others, capacity)
        elif self._whole_buffers and (empty := self._whole_batch()) is not None:
            self._cache = empty.regroup([], 0, others)  # a new batch: joining rows copied in place
        elif len(others) == 1:
            self._cache = others[0]  # one prefilled group: its cache as it is
        else:
            self._cache = others[0].extend(*others[1:], capacity=capacity)
        self._mask = self._cache.layout_mask([part.mask for part in parts])
        self._next = np.concatenate([part.next_tokens for part in parts])
        self._rows = rows

    def _whole_batch(self) -> KVCache | None:
        """An empty ragged cache for every slot and the whole context, or None where the OS
        refuses that much address space (strict overcommit): batches then grow by copies."""
        try:
            return self.model.new_cache(self.limits.max_concurrent, self._positions, ragged=True)
        except (MemoryError, OSError):
            self._whole_buffers = False
            return None

    def _step(self) -> None:
        """One decode step for the whole batch; each live row takes its next token."""
        with self._timed("decode", len(self._rows)):
            self._mask = self._cache.next_mask(self._mask)
            logits, self._cache = self.model.forward(self._next[:, None], self._mask, past=self._cache)
            for index, row in enumerate(self._rows):
                if row.done:  # a finished row of a static batch: it runs on, its tokens unused
                    continue
                token = self._advance(row, logits[index, -1])
                if token is not None:
                    self._next[index] = token

    @contextmanager
    def _timed(self, phase: str, rows: int) -> Iterator[None]:
        """Report the block's seconds to `on_batch` when it completes (not when it raises)."""
        start = time.perf_counter()
        yield
        if self.on_batch is not None:
            self.on_batch(BatchRun(phase, rows, time.perf_counter() - start))

    def _advance(self, row: Row, logits: np.ndarray) -> int | None:
        """The row takes its next token from its last-position logits and emits it; returns the
        token while the row goes on, None once it has finished (stop, length or error)."""
        try:
            event, reason = row.advance(logits)
        except Exception as error:  # noqa: BLE001 - NaN logits or no token left: this row fails
            self._finish(row, "error", f"{type(error).__name__}: {error}")
            return None
        row.handle.put(event)
        if reason is not None:
            self._finish(row, reason)
            return None
        return event.token_id

    def _capacity(self, columns: int, rows: list[Row]) -> int:
        """Cache columns for a batch `columns` long: those plus the most steps a row has left,
        rounded up (`cache_capacity`). Not the whole context: a cache on a device is copied
        whole whenever rows join or leave. A ragged batch needs no more than the context, as
        each of its rows ends within it (prefill_groups keeps it so)."""
        needed = cache_capacity(columns + max(row.config.max_new_tokens - len(row.generated) for row in rows))
        return min(needed, self._positions) if self.ragged_rows else needed

    def _fail_batch(self, error: Exception) -> None:
        for row in self._rows:
            if not row.done:
                self._finish(row, "error", f"{type(error).__name__}: {error}")
        self._reset_batch()

    def _reset_batch(self) -> None:
        self._rows, self._cache = [], None
        self._mask, self._next = np.zeros((0, 0), np.int64), np.zeros(0, np.int64)

    def _end_everything(self) -> None:
        """After the thread stopped: every request still admitted or waiting ends as cancelled."""
        for row in self._rows:
            if not row.done:
                self._finish(row, "cancelled", "the engine stopped before the request finished")
        self._reset_batch()
        with self._lock:
            waiting, self._waiting = list(self._waiting), deque()
        for handle in waiting:
            handle.put(FinishEvent("cancelled", handle.prompt_tokens, 0, "", "the engine stopped"))
