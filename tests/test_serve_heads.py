"""The single-pass heads over HTTP answer what the runtime's own methods return for the same input."""

from __future__ import annotations

import httpx
import numpy as np
import pytest

pytest.importorskip("fastapi")
openai = pytest.importorskip("openai")
from runtime_helpers import export_tiny, train_tokenizer  # noqa: E402
from serve_helpers import app_server  # noqa: E402

from gptneo_onnx.runtime import Model  # noqa: E402
from gptneo_onnx.serve.api import ServerState  # noqa: E402

TEXTS = ["Once upon a time there was", "Le café est très chaud"]


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return train_tokenizer(tmp_path_factory.mktemp("heads") / "tokenizer.json")


@pytest.fixture(scope="module")
def serve_task(tmp_path_factory, tokenizer):
    """(served URL, runtime model) for a tiny export of a task, served in this process."""
    started = []

    def start(task: str):
        folder = export_tiny(
            task, tmp_path_factory.mktemp(task), tokenizer, export_options={"validate": False}, vocab_size=320
        )[1]
        model = Model.load(folder, intra_op_threads=1)
        context = app_server(ServerState(lambda: model, "tiny"))
        started.append(context)
        return context.__enter__(), model

    yield start
    for context in started:
        context.__exit__(None, None, None)


def post(url: str, path: str, body: dict) -> dict:
    response = httpx.post(f"{url}{path}", json={"model": "tiny", **body}, timeout=30)
    assert response.status_code == 200, response.text
    return response.json()


def test_embeddings_through_the_official_client(serve_task):
    url, model = serve_task("base")
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
    answer = client.embeddings.create(model="tiny", input=TEXTS)  # the client asks for base64
    vectors = np.array([item.embedding for item in sorted(answer.data, key=lambda item: item.index)])
    np.testing.assert_allclose(vectors, model.embed(TEXTS), rtol=1e-5, atol=1e-6)
    assert answer.usage.prompt_tokens == sum(len(model.tokenizer.encode(text).ids) for text in TEXTS)
    floats = post(url, "/v1/embeddings", {"input": TEXTS[0], "encoding_format": "float", "normalize": True})
    np.testing.assert_allclose(
        floats["data"][0]["embedding"], model.embed(TEXTS[0], normalize=True)[0], rtol=1e-5
    )
    width = vectors.shape[1]
    same = client.embeddings.create(model="tiny", input=TEXTS[0], dimensions=width)
    np.testing.assert_allclose(same.data[0].embedding, vectors[0], rtol=1e-5, atol=1e-6)
    cut = httpx.post(f"{url}/v1/embeddings", json={"input": TEXTS[0], "dimensions": width // 2}, timeout=10)
    assert cut.status_code == 400 and cut.json()["error"]["param"] == "dimensions"
    wrong = httpx.post(f"{url}/v1/completions", json={"prompt": "hi"}, timeout=10)
    assert wrong.status_code == 404 and wrong.json()["error"]["code"] == "unsupported_endpoint"


def test_classify_tag_and_qa(serve_task):
    url, model = serve_task("sequence-classification")
    answer = post(url, "/v1/classify", {"input": TEXTS, "top_k": 2})
    assert [item["labels"] for item in answer["data"]] == model.classify(TEXTS, top_k=2)
    url, model = serve_task("token-classification")
    answer = post(url, "/v1/tag", {"input": TEXTS[1]})
    assert [{k: v for k, v in item.items() if k != "index"} for item in answer["data"]] == model.tag(
        [TEXTS[1]]
    )
    url, model = serve_task("question-answering")
    answer = post(url, "/v1/qa", {"question": "Who was there?", "context": TEXTS[0]})
    expected = model.answer("Who was there?", TEXTS[0])[0]
    assert {k: v for k, v in answer["data"][0].items() if k != "index"} == pytest.approx(expected)
    empty = httpx.post(f"{url}/v1/qa", json={"question": "", "context": TEXTS[0]}, timeout=10)
    assert empty.status_code == 400 and empty.json()["error"]["type"] == "invalid_request_error"
