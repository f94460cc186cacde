"""The continuous-batching engine against `CausalLM.generate` run on each request alone."""

from __future__ import annotations

import asyncio
import threading
import time
from types import SimpleNamespace

import pytest
from runtime_helpers import export_tiny, train_tokenizer

from gptneo_onnx.runtime import CausalLM, GenerationConfig
from gptneo_onnx.serve import (
    Draining,
    Engine,
    EngineLimits,
    EngineRequest,
    FinishEvent,
    QueueFull,
    RequestTooLarge,
    TokenEvent,
)
from gptneo_onnx.serve import engine as engine_module
from gptneo_onnx.serve.batch_layout import cache_capacity, fill_holes, prefill_groups
from gptneo_onnx.serve.engine import BatchRun

MODEL = {"vocab_size": 320, "initializer_range": 0.5}
NO_EOS: list[int] = []  # rows that must run to max_new_tokens


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("engine")
    tokenizer = train_tokenizer(root / "tokenizer.json")
    portable = export_tiny(
        "causal-lm", root / "portable", tokenizer, export_options={"validate": False}, **MODEL
    )
    options = {"validate": False, "optimize": True, "windowed_local_cache": True}
    optimized = export_tiny("causal-lm", root / "optimized", tokenizer, export_options=options, **MODEL)
    return {"portable": portable[1], "optimized": optimized[1]}


@pytest.fixture(scope="module")
def model(folders):
    return CausalLM.load(folders["portable"], intra_op_threads=1)


def mixed_requests(model: CausalLM) -> list[EngineRequest]:
    """8 requests: prompt lengths 2-19, 6-20 new tokens, greedy and seeded sampling, a stop
    string, min_new_tokens and EOS."""
    prompts = [[(7 * i + 3 * j) % 300 + 5 for j in range(2 + (i * 5) % 18)] for i in range(8)]
    sampling = dict(do_sample=True, temperature=0.8, top_k=40, top_p=0.9)
    configs = [
        dict(max_new_tokens=20, eos_token_id=NO_EOS),
        dict(max_new_tokens=16, eos_token_id=NO_EOS, seed=1, **sampling),
        dict(max_new_tokens=18, eos_token_id=NO_EOS, repetition_penalty=1.3),
        dict(max_new_tokens=14, eos_token_id=NO_EOS, seed=2, **sampling),
        dict(max_new_tokens=20, min_new_tokens=5),  # default EOS, held off for 5 tokens
        dict(max_new_tokens=12, eos_token_id=NO_EOS, seed=3, do_sample=True),
        dict(max_new_tokens=17, eos_token_id=NO_EOS),
        dict(max_new_tokens=6, eos_token_id=NO_EOS, seed=4, **sampling),
    ]
    requests = [EngineRequest(p, model.generation_config(**c)) for p, c in zip(prompts, configs)]
    # a stop string taken from what request 6 generates anyway, so it is hit mid-way
    text = model.generate(prompts[6], requests[6].config).texts[0]
    requests[6].config.stop_strings = [text[4:6]]
    return requests


def decode_sizes(sizes: list[int]):
    """An `on_batch` that keeps the rows of each decode step in `sizes`."""

    def on_batch(run: BatchRun) -> None:
        if run.phase == "decode":
            sizes.append(run.rows)

    return on_batch


def run_all(engine: Engine, requests: list[EngineRequest]) -> list[tuple[list[int], FinishEvent]]:
    handles = [engine.submit(request) for request in requests]
    engine.start()
    results = []
    for handle in handles:
        events = list(handle)
        tokens = [event.token_id for event in events if isinstance(event, TokenEvent)]
        assert "".join(e.text for e in events[:-1]) == events[-1].text
        results.append((tokens, events[-1]))
    engine.stop()
    return results


def expected(model: CausalLM, request: EngineRequest) -> tuple[list[int], str, str]:
    result = model.generate(request.prompt_ids, request.config)
    reason = {"eos": "stop", "stop_string": "stop", "length": "length"}[result.finish_reasons[0]]
    return result.sequences[0], result.texts[0], reason


@pytest.mark.parametrize(
    ("flavor", "policy", "ragged"),
    [
        ("portable", "continuous", False),
        ("optimized", "continuous", True),
        ("optimized", "continuous-padded", False),
    ],
)
def test_a_crowd_gives_each_request_what_it_gets_alone(folders, flavor, policy, ragged):
    """8 concurrent mixed requests: greedy and seeded rows equal `generate` on each prompt alone
    (the optimized export runs a shared-buffer, windowed cache: rows join and leave it, ragged
    or left-padded)."""
    model = CausalLM.load(folders[flavor], intra_op_threads=1)
    requests = mixed_requests(model)
    sizes: list[int] = []
    engine = Engine(model, EngineLimits(max_concurrent=8), policy, on_batch=decode_sizes(sizes))
    assert engine.ragged_rows == ragged
    results = run_all(engine, requests)
    reasons = []
    for request, (tokens, finish) in zip(requests, results):
        want_tokens, want_text, want_reason = expected(model, request)
        assert tokens == want_tokens and finish.text == want_text and finish.finish_reason == want_reason
        assert (finish.prompt_tokens, finish.completion_tokens) == (len(request.prompt_ids), len(tokens))
        reasons.append(finish.finish_reason)
    assert reasons[6] == "stop" and reasons.count("length") >= 6
    assert sum(sizes) / len(sizes) >= 4 and max(sizes) == 8 and min(sizes) < 8  # rows left early


@pytest.mark.parametrize("policy", ["static", "sequential"])
def test_static_and_sequential_policies_give_the_same_tokens(model, policy):
    requests = mixed_requests(model)
    sizes: list[int] = []
    crowd = run_all(Engine(model, EngineLimits(max_concurrent=8), on_batch=decode_sizes(sizes)), requests)
    other: list[int] = []
    engine = Engine(model, EngineLimits(max_concurrent=8), policy, on_batch=decode_sizes(other))
    results = run_all(engine, requests)
    assert [tokens for tokens, _ in results] == [tokens for tokens, _ in crowd]
    # static: one batch of 8 that keeps its finished rows until the longest is done; sequential: 1
    assert set(other) == ({8} if policy == "static" else {1})
    assert len(other) == (19 if policy == "static" else sum(len(t) - 1 for t, _ in crowd))


def test_a_static_batch_waits_for_its_slots_to_fill_but_not_longer(model, monkeypatch):
    """Static batching waits (up to STATIC_BATCH_WAIT_S) for the slots to fill, from the first
    request and from the end of the last batch: a request 0.2 s later joins the first one's
    batch, a request that queued longer than the wait while a batch ran still waits for a
    partner, and a full batch starts at once."""
    monkeypatch.setattr(engine_module, "STATIC_BATCH_WAIT_S", 2.0)
    short, long = (model.generation_config(max_new_tokens=n, eos_token_id=NO_EOS) for n in (3, 30))
    sizes: list[int] = []

    def slow_steps(run: BatchRun) -> None:
        if run.phase == "decode":
            sizes.append(run.rows)
            time.sleep(0.1)  # the long row's batch lasts ~2.9 s, longer than the wait

    engine = Engine(model, EngineLimits(max_concurrent=2), "static", on_batch=slow_steps)
    engine.start()
    first = engine.submit(EngineRequest([5, 6, 7], short))
    time.sleep(0.2)
    second = engine.submit(EngineRequest([9, 8], long))
    streams = [list(first)]
    third = engine.submit(EngineRequest([4, 4, 2], short))  # queued while the long row runs
    streams.append(list(second))
    time.sleep(0.2)
    fourth = engine.submit(EngineRequest([7], short))
    events = iter(fourth)
    streams += [list(third), [next(events)]]
    first_token_seconds = time.monotonic() - fourth.submitted
    streams[-1] += list(events)
    engine.stop()
    # two batches of two rows: 29 steps (the long row), then 2; the full one did not wait
    assert sizes == [2] * (29 + 2) and first_token_seconds < 1.0
    prompts = ([5, 6, 7], [9, 8], [4, 4, 2], [7])
    for prompt, config, stream in zip(prompts, (short, long, short, short), streams):
        assert [e.token_id for e in stream[:-1]] == model.generate(prompt, config).sequences[0]


@pytest.mark.parametrize(
    ("flavor", "policy"),
    [
        ("optimized", "continuous"),
        ("optimized", "continuous-padded"),
        ("optimized", "static"),
        ("portable", "static"),
    ],
)
def test_rows_near_the_context_run_to_their_end_in_any_batch(folders, flavor, policy):
    """Rows whose own tokens fill the 64-position context, batched with longer prompts: padding
    takes a left-padded batch past 64 columns, and a ragged row's prefill padding must still fit
    the context. Every row ends as it does alone."""
    model = CausalLM.load(folders[flavor], intra_op_threads=1)
    lengths = [(40, 24), (20, 44), (3, 60), (60, 4), (21, 40)]  # (prompt, new tokens): <= 64 each
    requests = [
        EngineRequest([(11 * i + j) % 300 + 5 for j in range(n)], model.generation_config(
            max_new_tokens=new, eos_token_id=NO_EOS))
        for i, (n, new) in enumerate(lengths)
    ]  # fmt: skip
    results = run_all(Engine(model, EngineLimits(max_concurrent=8), policy), requests)
    for request, (tokens, finish) in zip(requests, results):
        assert finish.finish_reason == "length", finish.error
        assert tokens == expected(model, request)[0]


def test_a_ragged_batch_grows_by_copies_where_the_whole_context_is_refused(folders, monkeypatch):
    """Strict overcommit refuses buffers for every slot and the whole context: the engine falls
    back to buffers sized to what the rows need, and every row still ends as it does alone."""
    model = CausalLM.load(folders["optimized"], intra_op_threads=1)
    new_cache = model.new_cache
    refused = []

    def no_whole_context(batch, capacity=None, ragged=False):
        if capacity == model.manifest.max_position_embeddings and batch == 8:
            refused.append(batch)
            raise MemoryError("mmap: Cannot allocate memory")
        return new_cache(batch, capacity, ragged)

    monkeypatch.setattr(model, "new_cache", no_whole_context)
    requests = mixed_requests(model)
    engine = Engine(model, EngineLimits(max_concurrent=8))
    results = run_all(engine, requests)
    assert refused == [8] and engine.ragged_rows  # refused once: later batches do not ask again
    assert [tokens for tokens, _ in results] == [expected(model, request)[0] for request in requests]


def test_cancelling_frees_the_slot_before_the_next_step(model):
    config = model.generation_config(max_new_tokens=30, eos_token_id=NO_EOS)
    handles, steps = [], []

    def on_batch(run: BatchRun) -> None:
        if run.phase == "decode":
            steps.append(run.rows)
        if len(steps) == 3:
            handles[0].cancel()  # during the 3rd step: the 4th must run without this row

    engine = Engine(model, EngineLimits(max_concurrent=1, max_queue=1), on_batch=on_batch)
    handles += [engine.submit(EngineRequest([5, 6, 7], config)), engine.submit(EngineRequest([9, 8], config))]
    engine.start()
    first, second = list(handles[0]), list(handles[1])
    engine.stop()
    assert first[-1].finish_reason == "cancelled" and first[-1].completion_tokens == 4  # prefill + 3 steps
    assert len(first) == 5
    assert [e.token_id for e in second[:-1]] == model.generate([9, 8], config).sequences[0]
    assert len(steps) == 3 + 29  # the queued request ran its 29 steps right after


def test_a_full_queue_refuses_with_a_retry_hint_and_limits_are_named(model):
    config = model.generation_config(max_new_tokens=4)
    engine = Engine(
        model, EngineLimits(max_concurrent=1, max_queue=1, max_input_tokens=8, max_total_tokens=12)
    )
    handles = [engine.submit(EngineRequest([5, 6], config)) for _ in range(2)]
    with pytest.raises(QueueFull) as full:
        engine.submit(EngineRequest([5, 6], config))
    assert full.value.retry_after >= 1
    with pytest.raises(RequestTooLarge, match="max_input_tokens"):
        engine.submit(EngineRequest(list(range(5, 14)), config))
    with pytest.raises(RequestTooLarge, match="max_total_tokens"):
        engine.submit(EngineRequest(list(range(5, 13)), model.generation_config(max_new_tokens=5)))
    assert engine.stats.waiting == 2
    engine.start()
    assert [list(handle)[-1].finish_reason for handle in handles] == ["length", "length"]
    engine.stop()


def test_drain_finishes_in_flight_requests_and_refuses_new_ones(model):
    config = model.generation_config(max_new_tokens=12, eos_token_id=NO_EOS)
    engine = Engine(model, EngineLimits(max_concurrent=1, max_queue=2))
    handles = [engine.submit(EngineRequest([5 + i, 6, 7], config)) for i in range(3)]
    engine.start()
    drained = threading.Thread(target=engine.drain, args=(60.0,))
    drained.start()
    while not engine.stats.draining:
        pass
    with pytest.raises(Draining):
        engine.submit(EngineRequest([5], config))
    finishes = [list(handle)[-1] for handle in handles]
    drained.join(60)
    assert [f.finish_reason for f in finishes] == ["length"] * 3 and not drained.is_alive()
    # a drain that runs out of time ends the rest
    engine = Engine(model, EngineLimits(max_concurrent=1, request_timeout=60))
    long = engine.submit(
        EngineRequest([5, 6], model.generation_config(max_new_tokens=60, eos_token_id=NO_EOS))
    )
    engine.start()
    next(iter(long))
    engine.drain(0.0)
    assert list(long)[-1].finish_reason == "cancelled"


def test_a_request_past_its_timeout_ends_and_async_iteration_works(model):
    config = model.generation_config(max_new_tokens=40, eos_token_id=NO_EOS)
    engine = Engine(model, EngineLimits(max_concurrent=2, request_timeout=0.0))
    late = engine.submit(EngineRequest([5, 6], config))
    engine.start()
    assert list(late)[-1].finish_reason == "timeout"
    engine.stop()

    async def collect(engine: Engine, request: EngineRequest) -> list:
        return [event async for event in engine.submit(request)]

    engine = Engine(model, EngineLimits(max_concurrent=2))
    engine.start()
    request = EngineRequest([5, 6, 7], model.generation_config(max_new_tokens=9), logprobs=2)
    events = asyncio.run(collect(engine, request))
    engine.stop()
    tokens = [e.token_id for e in events if isinstance(e, TokenEvent)]
    assert tokens == model.generate([5, 6, 7], request.config).sequences[0]
    assert all(e.logprob <= 0 and len(e.top_logprobs) == 2 for e in events[:-1])
    # greedy: the chosen token is the most likely one
    assert all(max(e.top_logprobs.values()) == e.logprob for e in events[:-1])
    assert isinstance(request.config, GenerationConfig)


def test_a_failing_step_ends_its_rows_with_an_error_and_the_engine_goes_on(folders):
    model = CausalLM.load(folders["portable"], intra_op_threads=1)
    forward, calls = model.forward, []

    def broken(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("the device fell over")
        return forward(*args, **kwargs)

    model.forward = broken
    config = model.generation_config(max_new_tokens=8, eos_token_id=NO_EOS)
    engine = Engine(model, EngineLimits(max_concurrent=2))
    failed = [engine.submit(EngineRequest([5 + i, 6], config)) for i in range(2)]
    engine.start()
    finishes = [list(handle)[-1] for handle in failed]
    assert [f.finish_reason for f in finishes] == ["error", "error"]
    assert "the device fell over" in finishes[0].error and engine.stats.running == 0
    again = list(engine.submit(EngineRequest([5, 6], config)))
    engine.stop()
    assert [e.token_id for e in again[:-1]] == model.generate([5, 6], config).sequences[0]


def test_rows_that_stay_keep_their_places_and_capacity_grows_in_steps():
    assert fill_holes([0, 1, 2, 4, 5, 6, 7]) == [0, 1, 2, 7, 4, 5, 6]  # one row moves, not four
    assert fill_holes([3, 5]) == [3, 5]
    assert fill_holes([1, 2, 3]) == [3, 1, 2]
    assert fill_holes([]) == []
    assert [cache_capacity(n) for n in (1, 256, 257, 600)] == [256, 256, 512, 768]


def test_prefill_groups_keep_padding_and_size_bounded():
    rows = [SimpleNamespace(prompt_length=n, max_new_tokens=16) for n in (64, 16, 16, 20, 2000, 30)]
    groups = [[row.prompt_length for row in group] for group in prefill_groups(rows, 2048)]
    # 4 x 30 padded tokens <= 1.5 x 82 real ones; 5 x 64 > 1.5 x 146; 2 x 2000 > 2048
    assert groups == [[16, 16, 20, 30], [64], [2000]]
    # a row's padding + prompt + new tokens stay within the context: 30 + 40 > 64
    rows[0].max_new_tokens, rows[5].max_new_tokens = 10, 40
    groups = [[row.prompt_length for row in group] for group in prefill_groups(rows[1:4] + rows[5:], 64)]
    assert groups == [[16, 16, 20], [30]]


def test_requests_admitted_together_share_prefill_runs(folders):
    """8 requests waiting at start: fewer prefill runs than requests, every row as it is alone.
    The engine reports each run it made (`on_batch`), with its rows, as the model saw them."""
    model = CausalLM.load(folders["portable"], intra_op_threads=1)
    requests = mixed_requests(model)
    prefills: list[int] = []
    steps: list[int] = []
    forward = model.forward

    def counting_forward(input_ids, attention_mask, *args, past=None, **options):
        (steps if past is not None else prefills).append(len(input_ids))
        return forward(input_ids, attention_mask, *args, past=past, **options)

    model.forward = counting_forward
    runs: list[BatchRun] = []
    results = run_all(Engine(model, EngineLimits(max_concurrent=8), on_batch=runs.append), requests)
    model.forward = forward
    assert sum(prefills) == 8 and len(prefills) < 8 and max(prefills) > 1
    assert [run.rows for run in runs if run.phase == "prefill"] == prefills
    assert [run.rows for run in runs if run.phase == "decode"] == steps
    regroups = [run for run in runs if run.phase == "regroup"]
    assert regroups and regroups[0].rows == 8 and all(run.seconds > 0 for run in runs)
    for request, (tokens, _) in zip(requests, results):
        assert tokens == expected(model, request)[0]
