"""Scoring prompts through /v1/completions (`echo` with `logprobs`, `max_tokens` 0 or 1), as
lm-evaluation-harness's `local-completions` model computes log-likelihoods, checked against
transformers' log-softmax on the same weights, on both export flavors."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import pytest
import torch

pytest.importorskip("fastapi")
openai = pytest.importorskip("openai")
from runtime_helpers import export_tiny, train_tokenizer  # noqa: E402
from serve_helpers import app_server  # noqa: E402

from gptneo_onnx.runtime import CausalLM  # noqa: E402
from gptneo_onnx.serve.api import ServerState  # noqa: E402
from gptneo_onnx.serve.engine import EngineLimits  # noqa: E402

# Window 4 and larger weights than the default init: prompts cross the local window, and the
# logits spread as a trained model's do. The context (64) bounds the longest prompt.
MODEL = {"vocab_size": 320, "initializer_range": 0.5, "max_position_embeddings": 64}
NAME = "tiny"
FLAVORS = {"portable": {}, "optimized": {"optimize": True, "windowed_local_cache": True}}


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    root = tmp_path_factory.mktemp("scoring")
    tokenizer = train_tokenizer(root / "tokenizer.json")
    folders = {}
    for flavor, options in FLAVORS.items():
        hf_model, folders[flavor] = export_tiny(
            "causal-lm", root / flavor, tokenizer, export_options={"validate": False, **options}, **MODEL
        )
    return hf_model, folders


@pytest.fixture(scope="module", params=sorted(FLAVORS))
def served(request, exports):
    """(base URL, CausalLM, transformers model) for one flavor."""
    hf_model, folders = exports
    folder = folders[request.param]
    state = ServerState(
        lambda: CausalLM.load(folder, intra_op_threads=1), NAME, EngineLimits(max_concurrent=4)
    )
    with app_server(state) as url:
        yield url, CausalLM.load(folder, intra_op_threads=1), hf_model


def reference_logprobs(hf_model, ids: list[int]) -> np.ndarray:
    """transformers' log-softmax at every position of `ids` (L, V), in float64."""
    with torch.no_grad():
        logits = hf_model(torch.tensor([ids])).logits[0].double()
    return torch.log_softmax(logits, dim=-1).numpy()


def lm_eval_loglikelihood(choice: dict, ctxlen: int) -> tuple[float, bool]:
    """lm-evaluation-harness's LocalCompletionsAPI.parse_logprobs, for one choice."""
    token_logprobs = choice["logprobs"]["token_logprobs"][ctxlen:-1]
    top_logprobs = choice["logprobs"]["top_logprobs"][ctxlen:-1]
    is_greedy = all(token == max(top.values()) for token, top in zip(token_logprobs, top_logprobs))
    return sum(token_logprobs), is_greedy


def test_lm_eval_loglikelihood_requests_score_like_transformers(served):
    """lm-eval's payload (token-id prompts in one request, echo, logprobs 1, max_tokens 1), sent
    while generating requests share the engine: every prompt token's logprob is transformers',
    the first is null, and the log-likelihood and greedy flag lm-eval reads off them are right."""
    url, model, hf_model = served
    rng = np.random.default_rng(3)
    # (context, continuation) token ids; one continuation is the model's own greedy choice
    pairs = [
        (rng.integers(3, 320, n).tolist(), rng.integers(3, 320, m).tolist()) for n, m in ((5, 3), (20, 9))
    ]
    greedy_context = rng.integers(3, 320, 30).tolist()
    pairs.append((greedy_context, model.generate(greedy_context, max_new_tokens=6).sequences[0]))
    prompts = [context + continuation for context, continuation in pairs]
    payload = {
        "model": NAME, "prompt": prompts, "temperature": 0, "max_tokens": 1, "logprobs": 1,
        "seed": 1234, "echo": True,
    }  # fmt: skip
    generating = {"model": NAME, "prompt": [9, 8, 7, 6, 5], "max_tokens": 12, "temperature": 0}
    with ThreadPoolExecutor(4) as pool:
        others = [
            pool.submit(httpx.post, f"{url}/v1/completions", json=generating, timeout=60) for _ in range(3)
        ]
        response = httpx.post(f"{url}/v1/completions", json=payload, timeout=60)
        expected_text = model.generate([9, 8, 7, 6, 5], max_new_tokens=12).texts[0]
        assert all(other.result().json()["choices"][0]["text"] == expected_text for other in others)
    assert response.status_code == 200, response.text
    choices = sorted(response.json()["choices"], key=lambda choice: choice["index"])
    greedy_flags = []
    for (context, _), prompt, choice in zip(pairs, prompts, choices):
        reference = reference_logprobs(hf_model, prompt)
        values = choice["logprobs"]["token_logprobs"]
        assert len(values) == len(prompt) + 1 and values[0] is None
        expected = [reference[i - 1, token] for i, token in enumerate(prompt) if i]
        np.testing.assert_allclose(values[1 : len(prompt)], expected, atol=1e-4)
        assert values[-1] == pytest.approx(reference[-1].max(), abs=1e-4)  # the greedy new token
        loglikelihood, is_greedy = lm_eval_loglikelihood(choice, len(context))
        assert loglikelihood == pytest.approx(sum(expected[len(context) - 1 :]), abs=1e-3)
        positions = range(len(context) - 1, len(prompt) - 1)
        assert is_greedy == all(reference[i].argmax() == prompt[i + 1] for i in positions)
        greedy_flags.append(is_greedy)
    assert greedy_flags == [False, False, True]
    assert response.json()["usage"]["prompt_tokens"] == sum(map(len, prompts))


def test_echo_with_max_tokens_0_scores_a_prompt_as_long_as_the_context(served):
    """The official client: echo with max_tokens 0 returns the prompt, its tokens, their offsets
    and top-2 logprobs, no new token; a prompt filling the context is scored, not refused."""
    url, model, hf_model = served
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=60)
    prompt = "The quick brown fox jumps over the lazy dog."
    answer = client.completions.create(model=NAME, prompt=prompt, echo=True, logprobs=2, max_tokens=0)
    choice = answer.choices[0]
    ids = model.tokenizer.encode(prompt).ids
    assert choice.text == prompt and choice.finish_reason == "length"
    assert (answer.usage.prompt_tokens, answer.usage.completion_tokens) == (len(ids), 0)
    logprobs = choice.logprobs
    assert "".join(logprobs.tokens) == prompt  # ASCII: every token is whole characters
    ends = [*logprobs.text_offset[1:], len(prompt)]
    assert [prompt[a:b] for a, b in zip(logprobs.text_offset, ends)] == logprobs.tokens
    reference = reference_logprobs(hf_model, ids)
    assert logprobs.top_logprobs[0] is None
    for position, top in enumerate(logprobs.top_logprobs[1:]):
        best = np.sort(reference[position])[::-1][:2]  # two tokens of the same text show once, the best
        assert list(top.values()) == pytest.approx(best[: len(top)], abs=1e-4)
    context = model.manifest.max_position_embeddings
    full = (ids * context)[:context]
    body = {"model": NAME, "prompt": full, "echo": True, "logprobs": 0, "max_tokens": 0}
    scored = httpx.post(f"{url}/v1/completions", json=body, timeout=60).json()["choices"][0]
    expected = [reference_logprobs(hf_model, full)[i - 1, token] for i, token in enumerate(full) if i]
    np.testing.assert_allclose(scored["logprobs"]["token_logprobs"][1:], expected, atol=1e-4)
    assert scored["logprobs"]["top_logprobs"][1] == {}  # logprobs 0: the chosen token's only
    too_long = httpx.post(f"{url}/v1/completions", json={**body, "max_tokens": 1}, timeout=60)
    assert too_long.status_code == 400 and too_long.json()["error"]["code"] == "context_length_exceeded"
    no_echo = httpx.post(f"{url}/v1/completions", json={**body, "echo": False}, timeout=60)
    assert no_echo.status_code == 400 and no_echo.json()["error"]["param"] == "max_tokens"


def test_streamed_echo_with_logprobs_equals_the_whole_answer(served):
    """Streaming: the first chunk is the prompt with its logprobs, then one token per chunk; put
    together they equal the non-streaming answer, and new tokens' offsets follow the prompt."""
    url, _, _ = served
    body = {"model": NAME, "prompt": "Alice met Bob in Paris", "echo": True, "logprobs": 1, "max_tokens": 6,
            "temperature": 0, "min_tokens": 6}  # fmt: skip
    whole = httpx.post(f"{url}/v1/completions", json=body, timeout=60).json()["choices"][0]
    text, tokens, values, offsets = "", [], [], []
    with httpx.stream("POST", f"{url}/v1/completions", json={**body, "stream": True}, timeout=60) as response:
        lines = [line[6:] for line in response.iter_lines() if line.startswith("data: ")]
    assert lines[-1] == "[DONE]"
    chunks = [json.loads(line)["choices"][0] for line in lines[:-1]]
    assert chunks[0]["text"] == body["prompt"] and len(chunks[0]["logprobs"]["tokens"]) > 1
    for chunk in chunks:
        text += chunk["text"]
        if chunk["logprobs"]:
            tokens += chunk["logprobs"]["tokens"]
            values += chunk["logprobs"]["token_logprobs"]
            offsets += chunk["logprobs"]["text_offset"]
    assert text == whole["text"]
    assert (tokens, values, offsets) == (
        whole["logprobs"]["tokens"],
        whole["logprobs"]["token_logprobs"],
        whole["logprobs"]["text_offset"],
    )
    prompt_tokens = len(chunks[0]["logprobs"]["tokens"])
    assert offsets[prompt_tokens] == len(body["prompt"]) and len(values) == prompt_tokens + 6
