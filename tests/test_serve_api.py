"""The OpenAI surface of `gptneo-onnx serve`, driven by the official `openai` client and raw HTTP,
checked against the runtime's own `generate()` (an independent path: no engine, no HTTP)."""

from __future__ import annotations

import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import pytest

pytest.importorskip("fastapi")
openai = pytest.importorskip("openai")
from fastapi.testclient import TestClient  # noqa: E402
from prometheus_client.parser import text_string_to_metric_families  # noqa: E402
from serve_helpers import app_server, export_tiny_lm  # noqa: E402

from gptneo_onnx.runtime import CausalLM  # noqa: E402
from gptneo_onnx.serve.api import ServerState  # noqa: E402
from gptneo_onnx.serve.engine import EngineLimits  # noqa: E402

PROMPTS = [
    "Once upon a time",
    "Le café est",
    "The quick brown fox jumps over",
    "東京 and",
    "Alice met Bob",
    "Straße, naïve,",
    "emoji 🚀",
    "there was a little robot named",
]
NAME = "tiny"


@pytest.fixture(scope="module")
def export(tmp_path_factory):
    return export_tiny_lm(tmp_path_factory.getbasetemp() / "serve-lm")


@pytest.fixture(scope="module")
def model(export):
    return CausalLM.load(export, intra_op_threads=1)


def state_for(export, **limits) -> ServerState:
    return ServerState(lambda: CausalLM.load(export, intra_op_threads=1), NAME, EngineLimits(**limits))


@pytest.fixture(scope="module")
def server(export):
    with app_server(state_for(export, max_concurrent=8, max_queue=16)) as url:
        yield url


def client(url: str):
    return openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=60)


def greedy(model: CausalLM, prompt: str, tokens: int, forced: bool = False):
    extra = {"min_new_tokens": tokens} if forced else {}
    return model.generate(prompt, max_new_tokens=tokens, do_sample=False, **extra)


def openai_reason(runtime_reason: str) -> str:
    return "length" if runtime_reason == "length" else "stop"


def test_streamed_completion_equals_greedy_generate(server, model):
    prompt, tokens = PROMPTS[0], 24
    expected = greedy(model, prompt, tokens)
    stream = client(server).completions.create(
        model=NAME, prompt=prompt, max_tokens=tokens, temperature=0, stream=True,
        stream_options={"include_usage": True},
    )  # fmt: skip
    pieces, reasons, usage = [], [], None
    for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage
        for choice in chunk.choices:
            pieces.append(choice.text)
            reasons.append(choice.finish_reason)
    assert "".join(pieces) == expected.texts[0]
    assert [reason for reason in reasons if reason] == [openai_reason(expected.finish_reasons[0])]
    assert usage.prompt_tokens == len(model.tokenizer.encode(prompt).ids)
    assert usage.completion_tokens == len(expected.sequences[0])
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens
    # The raw stream: server-sent events, the last one `data: [DONE]`.
    body = {"model": NAME, "prompt": prompt, "max_tokens": 4, "temperature": 0, "stream": True}
    with httpx.stream("POST", f"{server}/v1/completions", json=body, timeout=30) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        events = [line for line in response.iter_lines() if line]
    assert events[-1] == "data: [DONE]"
    assert all(event.startswith("data: ") for event in events)


def test_whole_completion_equals_generate_for_text_and_token_ids(server, model):
    ids = [model.tokenizer.encode(prompt).ids for prompt in PROMPTS[2:4]]
    for prompt in (PROMPTS[2:4], ids, ids[0]):
        answer = client(server).completions.create(model=NAME, prompt=prompt, max_tokens=16, temperature=0)
        choices = sorted(answer.choices, key=lambda choice: choice.index)
        assert [choice.index for choice in choices] == list(range(len(choices)))
        for choice, text in zip(choices, PROMPTS[2:4]):
            expected = greedy(model, text, 16)
            assert choice.text == expected.texts[0]
            assert choice.finish_reason == openai_reason(expected.finish_reasons[0])
        assert answer.usage.prompt_tokens == sum(len(row) for row in ids[: len(choices)])
    echoed = client(server).completions.create(
        model=NAME, prompt=PROMPTS[1], max_tokens=6, temperature=0, echo=True
    )
    assert echoed.choices[0].text == PROMPTS[1] + greedy(model, PROMPTS[1], 6).texts[0]


def test_stop_strings_and_logprobs(server, model):
    prompt, tokens = PROMPTS[4], 20
    expected = greedy(model, prompt, tokens, forced=True)
    stop = expected.texts[0][5:8]
    answer = client(server).completions.create(
        model=NAME, prompt=prompt, max_tokens=tokens, temperature=0, stop=[stop], logprobs=2,
        extra_body={"min_tokens": tokens},
    )  # fmt: skip
    choice = answer.choices[0]
    assert choice.text == expected.texts[0][: expected.texts[0].index(stop)]
    assert choice.finish_reason == "stop"
    # logprobs are log-softmax of the raw logits: recompute them with one forward pass, no cache.
    prompt_ids = model.tokenizer.encode(prompt).ids
    generated = expected.sequences[0][: len(choice.logprobs.token_logprobs)]
    ids = np.array([prompt_ids + generated])
    logits, _ = model.forward(ids, np.ones_like(ids))
    reference = logits[0, len(prompt_ids) - 1 : -1].astype(np.float64)
    reference = (
        reference
        - np.log(np.exp(reference - reference.max(-1, keepdims=True)).sum(-1, keepdims=True))
        - reference.max(-1, keepdims=True)
    )
    for step, (token, logprob, top) in enumerate(
        zip(generated, choice.logprobs.token_logprobs, choice.logprobs.top_logprobs)
    ):
        assert logprob == pytest.approx(reference[step, token], abs=1e-4)
        assert sorted(top.values(), reverse=True) == pytest.approx(
            np.sort(reference[step])[::-1][:2], abs=1e-4
        )
    assert choice.logprobs.text_offset == sorted(choice.logprobs.text_offset)


def test_logit_bias_equals_generate_with_the_same_bias(server, model):
    """The official client's logit_bias (token id strings -> bias) reaches the row's processors:
    the answer equals generate() with that bias, and differs from the unbiased one."""
    prompt, tokens = PROMPTS[3], 12
    plain = greedy(model, prompt, tokens, forced=True)
    bias = {plain.sequences[0][1]: -100.0, plain.sequences[0][4]: -100.0}
    expected = model.generate(prompt, max_new_tokens=tokens, min_new_tokens=tokens, logit_bias=bias)
    answer = client(server).completions.create(
        model=NAME, prompt=prompt, max_tokens=tokens, temperature=0,
        logit_bias={str(token): value for token, value in bias.items()}, extra_body={"min_tokens": tokens},
    )  # fmt: skip
    assert answer.choices[0].text == expected.texts[0] != plain.texts[0]
    assert not set(bias) & set(expected.sequences[0])


def test_presence_and_frequency_penalties_equal_generate_with_them(server, model):
    """OpenAI's penalties reach the row's processors: greedy and seeded sampling answers equal
    generate() with the same penalties, and the greedy one differs from the plain one."""
    prompt, tokens = PROMPTS[3], 16
    penalties = {"presence_penalty": 1.5, "frequency_penalty": 0.7}
    plain = greedy(model, prompt, tokens, forced=True)
    for sampling in ({"temperature": 0}, {"temperature": 0.8, "seed": 11}):
        runtime = {"do_sample": True, "temperature": 0.8, "seed": 11} if sampling["temperature"] else {}
        expected = model.generate(
            prompt, max_new_tokens=tokens, min_new_tokens=tokens, top_k=0, **penalties, **runtime
        )
        answer = client(server).completions.create(
            model=NAME,
            prompt=prompt,
            max_tokens=tokens,
            extra_body={"min_tokens": tokens},
            **penalties,
            **sampling,
        )
        assert answer.choices[0].text == expected.texts[0]
        if not sampling["temperature"]:
            assert answer.choices[0].text != plain.texts[0]


def test_tokenizer_routes_match_the_exports_tokenizer(server, model):
    """vLLM's /tokenize, /detokenize and /tokenizer_info, as lm-eval's remote tokenizer reads them."""
    tokenizer = model.tokenizer
    for prompt in PROMPTS:
        answer = httpx.post(f"{server}/tokenize", json={"model": NAME, "prompt": prompt}).json()
        assert answer == {"count": len(tokenizer.encode(prompt).ids), "max_model_len": 2048,
                          "tokens": tokenizer.encode(prompt).ids}  # fmt: skip
        back = httpx.post(f"{server}/detokenize", json={"tokens": answer["tokens"]}).json()
        assert back == {"prompt": prompt}
    info = httpx.get(f"{server}/tokenizer_info").json()
    assert info["model_max_length"] == 2048 and info["vocab_size"] == 320
    eos = httpx.post(f"{server}/tokenize", json={"prompt": info["eos_token"], "add_special_tokens": False})
    assert eos.json()["tokens"] == model.manifest.eos_token_ids  # lm-eval finds the EOS id so
    assert_openai_error(httpx.post(f"{server}/detokenize", json={"tokens": [5, 320]}), 400)
    assert_openai_error(httpx.post(f"{server}/tokenize", json={"model": "other", "prompt": "x"}), 404)


def test_n_choices_are_seeded_requests(server):
    """n=2 with a seed: choice i is the same request alone with seed + i; usage sums both."""
    request = dict(
        model=NAME, prompt=PROMPTS[6], max_tokens=12, temperature=0.9, extra_body={"min_tokens": 12}
    )
    both = client(server).completions.create(n=2, seed=5, **request)
    alone = [client(server).completions.create(seed=seed, **request).choices[0].text for seed in (5, 6)]
    assert [choice.text for choice in sorted(both.choices, key=lambda c: c.index)] == alone
    assert both.usage.completion_tokens == 24


def test_health_and_requests_are_503_while_loading(export):
    release = threading.Event()

    def slow_load():
        release.wait(timeout=30)
        return CausalLM.load(export, intra_op_threads=1)

    state = ServerState(slow_load, NAME)
    from gptneo_onnx.serve.api import create_app

    with TestClient(create_app(state)) as test_client:
        loading = test_client.get("/health")
        assert loading.status_code == 503 and loading.json()["status"] == "loading"
        refused = test_client.post("/v1/completions", json={"prompt": "hi"})
        assert refused.status_code == 503 and refused.json()["error"]["code"] == "loading"
        release.set()
        for _ in range(300):  # bounded: up to 30 s
            if test_client.get("/health").status_code == 200:
                break
            time.sleep(0.1)
        assert test_client.get("/health").json()["status"] == "ready"


def metric_samples(url: str) -> dict[tuple[str, tuple], float]:
    text = httpx.get(f"{url}/metrics", timeout=10).text
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def test_eight_concurrent_clients_equal_sequential_and_batch(server, model):
    """Mixed lengths, half greedy, half seeded sampling: the crowd's answers equal each request
    alone (greedy ones also equal generate()), and the engine ran batches of >= 4 on average."""
    requests = []
    for index, prompt in enumerate(PROMPTS):
        tokens, sampled = 60 + 12 * (index % 4), index % 2 == 1
        requests.append(
            dict(
                prompt=prompt,
                max_tokens=tokens,
                temperature=0.8 if sampled else 0,
                top_p=0.9 if sampled else 1.0,
                seed=index,
                extra_body={"min_tokens": tokens, "top_k": 40},
            )  # fmt: skip
        )
    openai_client = client(server)

    def complete(request: dict) -> str:
        return openai_client.completions.create(model=NAME, **request).choices[0].text

    alone = [complete(request) for request in requests]
    for request, text in zip(requests, alone):
        if request["temperature"] == 0:
            assert text == greedy(model, request["prompt"], request["max_tokens"], forced=True).texts[0]
    before = metric_samples(server)
    barrier = threading.Barrier(len(requests))

    def crowd_member(request: dict) -> str:
        barrier.wait(timeout=10)
        return complete(request)

    with ThreadPoolExecutor(len(requests)) as pool:
        crowd = list(pool.map(crowd_member, requests))
    after = metric_samples(server)
    assert crowd == alone
    steps = after[("gptneo_onnx_batch_size_count", ())] - before[("gptneo_onnx_batch_size_count", ())]
    rows = after[("gptneo_onnx_batch_size_sum", ())] - before[("gptneo_onnx_batch_size_sum", ())]
    assert steps > 0 and rows / steps >= 4
    # the engine's time by phase: one decode sample per step, prefills and regroups as rows joined
    engine = {
        phase: {
            part: after[(f"gptneo_onnx_engine_duration_seconds_{part}", (("phase", phase),))]
            - before.get((f"gptneo_onnx_engine_duration_seconds_{part}", (("phase", phase),)), 0)
            for part in ("count", "sum")
        }
        for phase in ("prefill", "decode", "regroup")
    }
    assert engine["decode"]["count"] == steps
    assert 1 <= engine["prefill"]["count"] <= len(requests) and engine["regroup"]["count"] >= 1
    assert all(phase["sum"] > 0 for phase in engine.values())


def test_metrics_parse_and_count(server):
    before = metric_samples(server)
    key = ("gptneo_onnx_requests_total", (("endpoint", "/v1/completions"), ("status", "200")))
    answer = client(server).completions.create(model=NAME, prompt=PROMPTS[5], max_tokens=5, temperature=0)
    after = metric_samples(server)
    assert after[key] == before.get(key, 0) + 1
    generated = ("gptneo_onnx_generated_tokens_total", ())
    assert after[generated] - before.get(generated, 0) == answer.usage.completion_tokens
    assert after[("gptneo_onnx_time_to_first_token_seconds_count", ())] > before.get(
        ("gptneo_onnx_time_to_first_token_seconds_count", ()), 0
    )
    assert after[("gptneo_onnx_requests_running", ())] == 0
    assert after[("gptneo_onnx_requests_waiting", ())] == 0


def test_models_and_health(server):
    models = client(server).models
    assert [entry.id for entry in models.list().data] == [NAME]
    assert models.retrieve(NAME).id == NAME
    with pytest.raises(openai.NotFoundError):
        models.retrieve("other")
    assert httpx.get(f"{server}/health").json()["status"] == "ready"


def test_metrics_time_the_queue_and_count_how_completions_end(export):
    """One slot: one of two simultaneous requests waits about as long as the other runs, and
    the queue, duration and finish-reason metrics say so."""
    with app_server(state_for(export, max_concurrent=1, max_queue=4)) as url:
        body = {"model": NAME, "prompt": PROMPTS[0], "max_tokens": 500, "min_tokens": 500, "temperature": 0}
        started = time.perf_counter()
        with ThreadPoolExecutor(2) as pool:
            first = pool.submit(httpx.post, f"{url}/v1/completions", json=body, timeout=60)
            second = pool.submit(
                httpx.post, f"{url}/v1/completions", json={**body, "stop": ["zzz"]}, timeout=60
            )
            first.result(), second.result()
        both_took = time.perf_counter() - started
        samples = metric_samples(url)
    assert samples[("gptneo_onnx_request_queue_seconds_count", ())] == 2
    assert samples[("gptneo_onnx_completions_finished_total", (("reason", "length"),))] == 2
    assert samples[("gptneo_onnx_request_duration_seconds_count", ())] == 2
    queued = samples[("gptneo_onnx_request_queue_seconds_sum", ())]
    durations = samples[("gptneo_onnx_request_duration_seconds_sum", ())]
    # one waited as long as the other ran: both arrived together, so the summed durations are the
    # wall time plus that wait (a ratio of the sum drifted with how long each one ran)
    assert queued == pytest.approx(durations - both_took, abs=0.1 * both_took)
    assert 0.2 * durations < queued < durations < 2 * both_took


def assert_openai_error(response: httpx.Response, status: int, code: str | None = None) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["message"]
    if code is not None:
        assert error["code"] == code
    return error


@pytest.mark.parametrize(
    "body, param",
    [
        ({"prompt": "hi", "temperature": 5}, "temperature"),
        ({"prompt": "hi", "temperature": -1}, "temperature"),
        ({"prompt": "hi", "n": 0}, "n"),
        ({"prompt": "hi", "stop": ["a", "b", "c", "d", "e"]}, "stop"),
        ({"prompt": "hi", "max_tokens": 0}, "max_tokens"),
        ({"prompt": [], "max_tokens": 3}, "prompt"),
        ({"prompt": [100000], "max_tokens": 3}, None),  # outside the vocabulary
        ({"prompt": "", "max_tokens": 3}, None),
        ({"max_tokens": 3}, "prompt"),
        ({"prompt": "hi", "logit_bias": {"x": 1}}, "logit_bias"),
        ({"prompt": "hi", "logit_bias": {"5": 101}}, "logit_bias"),
        ({"prompt": "hi", "logit_bias": {"100000": 1}}, None),  # outside the vocabulary
        ({"prompt": "hi", "suffix": " end"}, "suffix"),
        ({"prompt": "hi", "presence_penalty": 2.5}, "presence_penalty"),
        ({"prompt": "hi", "frequency_penalty": -3}, "frequency_penalty"),
    ],
)
def test_invalid_requests_are_openai_400s(server, body, param):
    response = httpx.post(f"{server}/v1/completions", json={"model": NAME, **body}, timeout=10)
    assert assert_openai_error(response, 400)["param"] == param


def test_over_long_input_malformed_json_unknown_model_and_oversized_body(server):
    long_prompt = list(range(3, 300)) * 7  # 2,079 tokens: past the 2,048-token context
    response = httpx.post(f"{server}/v1/completions", json={"model": NAME, "prompt": long_prompt}, timeout=10)
    assert_openai_error(response, 400, "context_length_exceeded")
    response = httpx.post(
        f"{server}/v1/completions", content=b'{"prompt": "hi",', headers={"content-type": "application/json"}
    )
    assert_openai_error(response, 400, "invalid_json")
    response = httpx.post(f"{server}/v1/completions", json={"model": "other", "prompt": "hi"})
    assert_openai_error(response, 404, "model_not_found")
    assert_openai_error(httpx.get(f"{server}/v1/nothing-here"), 404)
    chat = {"model": NAME, "messages": [{"role": "user", "content": "hi"}]}
    error = assert_openai_error(
        httpx.post(f"{server}/v1/chat/completions", json=chat), 404, "unsupported_endpoint"
    )
    assert "/v1/completions" in error["message"]
    oversized = json.dumps({"model": NAME, "prompt": "x" * (5 * 2**20)})
    response = httpx.post(
        f"{server}/v1/completions", content=oversized, headers={"content-type": "application/json"}
    )
    assert_openai_error(response, 413)
    with pytest.raises(openai.BadRequestError):  # the client raises on the 400 at once (no retry)
        client(server).completions.create(model=NAME, prompt="hi", temperature=7)
