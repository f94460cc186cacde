"""The web page (clients/web) in Debian's Chromium, headless, against the Python runtime.

A static server on 127.0.0.1 (clients/web/serve.py, with the COOP/COEP headers that give
onnxruntime-web threads) serves the page and the bundled model's portable and optimized exports;
playwright-core drives Chromium (clients/web/test/drive.mjs): load the export (sidecar and sha256
checked in the page), type a prompt longer than the local window, press Generate. The streamed
token ids and text must be Python's, with the sidecar's decoding defaults. The portable export is
read through the page's folder picker, the others by URL; a tampered export is refused. It
saves a screenshot; GPTNEO_ONNX_UPDATE_SCREENSHOT=1 copies it to docs/web_page.png.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from gptneo_onnx.cli.defaults import BUNDLED_MODEL_DIR
from gptneo_onnx.runtime import Model

ROOT = Path(__file__).resolve().parent.parent
WEB = ROOT / "clients" / "web"
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
NODE = shutil.which("node")
pytestmark = [
    pytest.mark.skipif(
        CHROMIUM is None,
        reason="chromium is not installed: the web page test needs Debian's chromium "
        "(`apt-get install -y --no-install-recommends chromium`; .ci/run does it where it can)",
    ),
    pytest.mark.skipif(
        NODE is None, reason="node is not installed: playwright-core drives chromium from Node.js"
    ),
]

LONG_PROMPT = (BUNDLED_MODEL_DIR.parent / "runtime" / "generation.py").read_text()[:900]  # ~316 tokens
SHORT_PROMPT = "def fibonacci(n):"


def load_serve():
    spec = importlib.util.spec_from_file_location("gptneo_onnx_web_serve", WEB / "serve.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def page_results(bundled_export, bundled_optimized_export, tmp_path_factory):
    """Drive the page once per export: a tampered copy, the long prompt on both, then a short one."""
    for package in ("onnxruntime-web", "@huggingface/tokenizers", "playwright-core"):
        if not (WEB / "node_modules" / package / "package.json").is_file():
            pytest.fail(
                f"chromium is installed but the page's npm packages are not ({package}): "
                "run `cd clients/web && npm ci`"
            )
    out = tmp_path_factory.mktemp("web")
    tampered = Path(shutil.copytree(bundled_export, out / "tampered"))
    data = bytearray((tampered / "tokenizer.json").read_bytes())
    data[len(data) // 2] ^= 0x01
    (tampered / "tokenizer.json").write_bytes(bytes(data))
    exports = {"optimized": bundled_optimized_export, "tampered": tampered}
    server = load_serve().start(exports)
    try:
        page = f"http://127.0.0.1:{server.server_port}/web/index.html?export=/export/"
        spec = {
            "executable": CHROMIUM,
            "screenshot": str(out / "web_page.png"),
            "jobs": [
                {"url": page + "tampered/", "prompts": [], "timeout_s": 120},
                {"url": page + "optimized/", "prompts": [LONG_PROMPT], "timeout_s": 120},
                {
                    "url": page.split("?")[0],
                    "pick": str(bundled_export),
                    "prompts": [LONG_PROMPT, SHORT_PROMPT],
                },
            ],
        }
        (out / "jobs.json").write_text(json.dumps(spec))
        result = subprocess.run(
            [NODE, str(WEB / "test" / "drive.mjs"), str(out / "jobs.json")],
            capture_output=True, text=True, timeout=400, cwd=WEB,
        )  # fmt: skip
    finally:
        server.shutdown()
        server.server_close()
    assert result.returncode == 0, result.stderr[-3000:]
    tampered_page, optimized, portable_long, portable_short = json.loads(result.stdout)
    screenshot = out / "web_page.png"
    if os.environ.get("GPTNEO_ONNX_UPDATE_SCREENSHOT"):
        shutil.copyfile(screenshot, ROOT / "docs" / "web_page.png")
    return {
        "optimized": (bundled_optimized_export, optimized, LONG_PROMPT),
        "portable": (bundled_export, portable_long, LONG_PROMPT),
        "portable-short": (bundled_export, portable_short, SHORT_PROMPT),
        "screenshot": screenshot,
        "tampered": tampered_page,
    }


@pytest.mark.parametrize("case", ["portable", "optimized", "portable-short"])
def test_the_page_streams_pythons_tokens(page_results, case):
    export_dir, page, prompt = page_results[case]
    assert page["state"] == "done", (page["status"], page["console"])
    model = Model.load(export_dir)
    expected_ids = model.tokenizer.encode(prompt).ids
    expected = model.generate(prompt)  # the sidecar's defaults: greedy, 64 new tokens, penalty 1.3
    if prompt == LONG_PROMPT:
        assert len(expected_ids) > model.manifest.model["window_size"]
    assert page["ids"]["prompt"] == expected_ids
    assert page["ids"]["completion"] == expected.sequences[0]
    assert len(page["ids"]["completion"]) >= 8
    assert page["text"] == expected.texts[0]
    assert "sha256 verified" in page["model_info"]
    assert "tokens/s" in page["status"]


def test_the_page_refuses_a_tampered_export(page_results):
    page = page_results["tampered"]
    assert page["state"] == "error"
    assert page["status"].startswith(
        "error: tokenizer.json does not match the sha256 recorded in gptneo_onnx.json"
    )


def test_the_page_leaves_a_screenshot(page_results):
    data = page_results["screenshot"].read_bytes()
    assert data.startswith(b"\x89PNG\r\n\x1a\n") and len(data) > 10_000
