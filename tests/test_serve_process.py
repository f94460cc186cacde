"""`gptneo-onnx serve` as a real process: SIGTERM drains it, a bad folder is one error line, and
on Ray Serve two replicas answer (fixed, or added by Ray's autoscaler under load) and shutting
down leaves no process behind."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

pytest.importorskip("fastapi")
from serve_helpers import cli_command, cli_server, export_tiny_lm, free_port, wait_healthy  # noqa: E402


@pytest.fixture(scope="module")
def export(tmp_path_factory):
    return export_tiny_lm(tmp_path_factory.getbasetemp() / "serve-lm")


def test_sigterm_finishes_the_stream_refuses_new_requests_and_exits(export):
    with cli_server(str(export), "--port", "0", "--threads", "1", "--shutdown-timeout", "20") as (
        process,
        url,
    ):
        body = {
            "prompt": "Once upon a time",
            "max_tokens": 800,
            "min_tokens": 800,
            "temperature": 0,
            "stream": True,
        }
        events: list[str] = []
        with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=60) as response:
            lines = response.iter_lines()
            for line in lines:
                if line.startswith("data: {"):
                    break
            process.send_signal(signal.SIGTERM)
            signalled = time.monotonic()
            deadline = signalled + 10
            while httpx.get(f"{url}/health", timeout=5).status_code != 503:
                assert time.monotonic() < deadline, "/health never turned 503"
                time.sleep(0.02)
            refused = httpx.post(f"{url}/v1/completions", json={"prompt": "hi", "max_tokens": 2}, timeout=10)
            events = [line for line in lines if line]
        assert refused.status_code == 503
        assert refused.json()["error"]["code"] == "draining"
        assert events[-1] == "data: [DONE]"
        finish = [json.loads(e[6:]) for e in events[:-1]][-1]
        assert finish["choices"][0]["finish_reason"] == "length"
        assert process.wait(timeout=20) == 0
        assert time.monotonic() - signalled < 20


def test_a_bad_export_folder_is_one_error_line(tmp_path):
    result = subprocess.run(
        [*cli_command(), "serve", str(tmp_path / "missing")], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ")


def test_ray_serve_two_replicas_answer_and_leave_nothing_behind(export):
    pytest.importorskip("ray")
    psutil = pytest.importorskip("psutil")
    port = free_port()
    arguments = (
        str(export),
        "--replicas",
        "2",
        "--port",
        str(port),
        "--threads",
        "1",
        "--max-concurrent",
        "2",
        "--api-key",
        "sk-ray",  # reaches each replica's app
    )
    # a bound, not an expectation: Ray and two replicas took 14-17 s here, minutes under load
    with cli_server(*arguments, timeout=180) as (process, url):
        descendants = psutil.Process(process.pid).children(recursive=True)
        assert descendants, "Ray started no processes"
        body = {"prompt": "Once upon a time", "max_tokens": 40, "temperature": 0}
        refused = httpx.post(f"{url}/v1/completions", json=body, timeout=60)
        assert refused.status_code == 401 and refused.json()["error"]["code"] == "invalid_api_key"
        key = {"Authorization": "Bearer sk-ray"}
        replicas: set[str] = set()
        texts: set[str] = set()
        with ThreadPoolExecutor(4) as pool:
            for _ in range(10):  # bounded: stop as soon as both replicas have answered
                responses = list(
                    pool.map(
                        lambda _: httpx.post(f"{url}/v1/completions", json=body, headers=key, timeout=60),
                        range(4),
                    )
                )
                for response in responses:
                    assert response.status_code == 200, response.text
                    replicas.add(response.headers["x-gptneo-onnx-replica"])
                    texts.add(response.json()["choices"][0]["text"])
                if len(replicas) == 2:
                    break
        assert len(replicas) == 2
        assert len(texts) == 1  # greedy: every replica gives the same answer
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=60) == 0
    deadline = time.monotonic() + 15
    while any(p.is_running() and p.status() != psutil.STATUS_ZOMBIE for p in descendants):
        assert time.monotonic() < deadline, [p.cmdline() for p in descendants if p.is_running()]
        time.sleep(0.2)


def test_ray_config_args_take_every_provider_option():
    """`serve deploy` config files set any ProviderOptions field, as the CLI flags do."""
    pytest.importorskip("ray")
    from gptneo_onnx.runtime import ProviderOptions
    from gptneo_onnx.serve.ray_app import provider_options

    args = {"export_dir": "x", "threads": 2, "provider": "cpu", "cuda_tf32": True, "replicas": 3}
    options = provider_options(args)
    assert options == {"intra_op_threads": 2, "provider": "cpu", "cuda_tf32": True}
    assert ProviderOptions(**options).cuda_tf32 is True  # every key is a field


def test_max_replicas_below_replicas_is_one_error_line(export):
    result = subprocess.run(
        [*cli_command(), "serve", str(export), "--replicas", "3", "--max-replicas", "2"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert result.returncode == 2
    errors = [line for line in result.stderr.splitlines() if line.startswith("error")]
    assert errors == ["error: --max-replicas (2) must be >= --replicas (3)"]  # the export's own warning aside


def test_ray_serve_config_file_autoscales_from_one_replica_to_two_under_load(export, tmp_path):
    """`serve run serve.yaml` (Ray's own tooling) with an autoscaling_config: one replica, then a
    second as requests queue behind its one slot; both answer, and Ctrl-C leaves nothing behind."""
    pytest.importorskip("ray")
    psutil = pytest.importorskip("psutil")
    from gptneo_onnx.serve.ray_app import PROXY_TIMEOUTS

    port = free_port()
    scaling = {"min_replicas": 1, "max_replicas": 2, "upscale_delay_s": 1, "metrics_interval_s": 0.5,
               "look_back_period_s": 1, "downscale_delay_s": 600}  # fmt: skip
    args = {"export_dir": str(export), "threads": 1, "max_concurrent": 1, "max_queue": 16,
            "autoscaling_config": scaling,
            "chat_template": "Q: {{ messages[-1]['content'] }}\nA:"}  # fmt: skip
    config = {
        "http_options": {"host": "127.0.0.1", "port": port},
        "applications": [{"name": "gptneo-onnx", "route_prefix": "/",
                          "import_path": "gptneo_onnx.serve.ray_app:build", "args": args}],
    }  # fmt: skip
    (tmp_path / "serve.yaml").write_text(json.dumps(config))  # JSON is YAML
    serve_cli = str(Path(cli_command()[0]).with_name("serve"))
    environment = {**os.environ, **PROXY_TIMEOUTS, "RAY_USAGE_STATS_ENABLED": "0"}
    process = subprocess.Popen(
        [serve_cli, "run", str(tmp_path / "serve.yaml")], env=environment,
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    url, descendants = f"http://127.0.0.1:{port}", []
    try:
        wait_healthy(url, timeout=180, process=process)  # a bound: ~15 s here
        descendants = psutil.Process(process.pid).children(recursive=True)
        idle = {httpx.get(f"{url}/health", timeout=10).headers["x-gptneo-onnx-replica"] for _ in range(6)}
        assert len(idle) == 1  # min_replicas: one, before any load
        # the args' chat template reaches the replica: a chat turn is the completion of its prompt
        greedy = {"max_tokens": 6, "temperature": 0}
        chat = httpx.post(f"{url}/v1/chat/completions", timeout=60,
                          json={"messages": [{"role": "user", "content": "Hi"}], **greedy})  # fmt: skip
        plain = httpx.post(f"{url}/v1/completions", json={"prompt": "Q: Hi\nA:", **greedy}, timeout=60)
        assert chat.json()["choices"][0]["message"]["content"] == plain.json()["choices"][0]["text"]
        body = {"prompt": "Once upon a time", "max_tokens": 300, "min_tokens": 300, "temperature": 0}
        replicas: set[str] = set()
        deadline = time.monotonic() + 120  # a bound: Ray added the replica within ~10 s here
        with ThreadPoolExecutor(4) as pool:
            while len(replicas) < 2 and time.monotonic() < deadline:
                post = lambda _: httpx.post(f"{url}/v1/completions", json=body, timeout=60)  # noqa: E731
                for response in pool.map(post, range(4)):
                    assert response.status_code in (200, 429), response.text
                    if response.status_code == 200:
                        replicas.add(response.headers["x-gptneo-onnx-replica"])
        assert len(replicas) == 2, "Ray never added the second replica"
    finally:
        process.send_signal(signal.SIGINT)  # `serve run` shuts the application and Ray down on Ctrl-C
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=30)
    deadline = time.monotonic() + 15
    while any(p.is_running() and p.status() != psutil.STATUS_ZOMBIE for p in descendants):
        assert time.monotonic() < deadline, [p.cmdline() for p in descendants if p.is_running()]
        time.sleep(0.2)
