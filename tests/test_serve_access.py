"""The server's access settings: an API key on every route but the probes' (OpenAI's 401
otherwise) and CORS origins."""

from __future__ import annotations

import argparse

import httpx
import pytest

openai = pytest.importorskip("openai")
pytest.importorskip("fastapi")

from serve_helpers import app_server, export_tiny_lm  # noqa: E402

from gptneo_onnx.runtime import CausalLM  # noqa: E402
from gptneo_onnx.serve.access import API_KEY_ENV, Access  # noqa: E402
from gptneo_onnx.serve.api import ServerState  # noqa: E402
from gptneo_onnx.serve.engine import EngineLimits  # noqa: E402

KEY, ORIGIN = "sk-test-1234", "http://app.example"


@pytest.fixture(scope="module")
def export(tmp_path_factory):
    return export_tiny_lm(tmp_path_factory.getbasetemp() / "serve-lm")


@pytest.fixture(scope="module")
def guarded(export):
    state = ServerState(
        lambda: CausalLM.load(export, intra_op_threads=1), "tiny", EngineLimits(max_concurrent=2)
    )
    with app_server(state, access=Access(KEY, (ORIGIN,))) as url:
        yield url, CausalLM.load(export, intra_op_threads=1)


def test_routes_need_the_key_and_probes_do_not(guarded):
    url, model = guarded
    wrong = openai.OpenAI(base_url=f"{url}/v1", api_key="sk-wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        wrong.completions.create(model="tiny", prompt="Hello", max_tokens=4)
    bare = httpx.post(f"{url}/v1/completions", json={"prompt": "Hello", "max_tokens": 4})
    assert bare.status_code == 401
    assert bare.json()["error"]["code"] == "invalid_api_key" and set(bare.json()["error"]) == {
        "message", "type", "param", "code",
    }  # fmt: skip
    assert httpx.get(f"{url}/v1/models").status_code == 401
    assert httpx.post(f"{url}/tokenize", json={"prompt": "Hello"}).status_code == 401
    keyed = {"Authorization": f"Bearer {KEY}"}
    tokens = httpx.post(f"{url}/tokenize", json={"prompt": "Hello"}, headers=keyed).json()["tokens"]
    assert tokens == model.tokenizer.encode("Hello").ids
    right = openai.OpenAI(base_url=f"{url}/v1", api_key=KEY, max_retries=0)
    answer = right.completions.create(model="tiny", prompt="Hello", max_tokens=6, temperature=0)
    assert answer.choices[0].text == model.generate("Hello", max_new_tokens=6).texts[0]
    assert httpx.get(f"{url}/health").status_code == 200  # probes and scrapers need no key
    metrics = httpx.get(f"{url}/metrics").text
    assert 'gptneo_onnx_requests_total{endpoint="/v1/completions",status="401"} 2.0' in metrics  # wrong, none


def test_cors_lets_in_the_configured_origin_only(guarded):
    url, _ = guarded
    preflight = {"Origin": ORIGIN, "Access-Control-Request-Method": "POST",
                 "Access-Control-Request-Headers": "authorization,content-type"}  # fmt: skip
    allowed = httpx.options(f"{url}/v1/completions", headers=preflight)
    assert allowed.status_code == 200  # a preflight carries no key and is not refused for it
    assert allowed.headers["access-control-allow-origin"] == ORIGIN
    assert "authorization" in allowed.headers["access-control-allow-headers"].lower()
    other = httpx.options(f"{url}/v1/completions", headers={**preflight, "Origin": "http://evil.example"})
    assert other.status_code == 400 and "access-control-allow-origin" not in other.headers
    # the answer itself, a 401 included, carries the header the browser checks
    refused = httpx.post(f"{url}/v1/completions", json={"prompt": "x"}, headers={"Origin": ORIGIN})
    assert refused.status_code == 401 and refused.headers["access-control-allow-origin"] == ORIGIN


def test_without_settings_no_key_is_asked_and_no_origin_is_let_in(export):
    state = ServerState(
        lambda: CausalLM.load(export, intra_op_threads=1), "tiny", EngineLimits(max_concurrent=1)
    )
    with app_server(state) as url:
        answer = httpx.post(
            f"{url}/v1/completions", json={"prompt": "Hi", "max_tokens": 2}, headers={"Origin": ORIGIN}
        )
        assert answer.status_code == 200 and "access-control-allow-origin" not in answer.headers


def test_the_cli_takes_the_key_from_the_environment_and_warns_on_an_open_bind(monkeypatch, capsys):
    from gptneo_onnx.cli.serve_commands import access_from

    monkeypatch.setenv(API_KEY_ENV, "from-env")
    args = argparse.Namespace(
        api_key=None, allowed_origins=" http://a.example, http://b.example ", host="127.0.0.1"
    )
    assert access_from(args) == Access("from-env", ("http://a.example", "http://b.example"))
    assert access_from(argparse.Namespace(api_key="flag", allowed_origins=None, host="::1")).api_key == "flag"
    assert capsys.readouterr().err == ""
    from gptneo_onnx.cli.serve_commands import ServeSetupError

    with pytest.raises(ServeSetupError, match="--api-key is empty"):
        access_from(argparse.Namespace(api_key=" ", allowed_origins=None, host="127.0.0.1"))
    monkeypatch.setenv(API_KEY_ENV, "")
    with pytest.raises(ServeSetupError, match=f"{API_KEY_ENV} is empty"):
        access_from(argparse.Namespace(api_key=None, allowed_origins=None, host="127.0.0.1"))
    from gptneo_onnx.serve.access import access_settings  # what `serve deploy`'s builder calls too

    with pytest.raises(ValueError, match=f"{API_KEY_ENV} is empty"):
        access_settings(None, ["http://a.example"])
    monkeypatch.delenv(API_KEY_ENV)
    assert access_from(argparse.Namespace(api_key=None, allowed_origins=None, host="0.0.0.0")) == Access()
    assert "without an API key" in capsys.readouterr().err
