"""Sustained load, short version of scripts/load_test.py: 8 threads share one loaded model and get
exactly what the same requests get one by one, and RSS stays flat over 100 generations.

Each check also runs against a deliberately broken model, to show it fails when the defense
is removed: requests that share one KV-cache buffer (per model instead of per request), and a
leak of 1 MB per generation.
"""

from __future__ import annotations

import time

import numpy as np
import pytest
from runtime_helpers import export_tiny

from gptneo_onnx.bench.sustained import check_concurrent, make_requests, measure_rss, run_request
from gptneo_onnx.cli.defaults import BUNDLED_MODEL_DIR
from gptneo_onnx.runtime import CausalLM, SharedBufferCache

MODEL = dict(
    vocab_size=4096, max_position_embeddings=64, initializer_range=0.5,
    bos_token_id=0, eos_token_id=0, pad_token_id=0,
)  # fmt: skip
REQUESTS, NEW_TOKENS = 32, 12


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root, tokenizer = tmp_path_factory.mktemp("load"), BUNDLED_MODEL_DIR / "tokenizer.json"
    return {
        "portable": export_tiny("causal-lm", root / "portable", tokenizer_file=tokenizer, **MODEL)[1],
        "optimized": export_tiny(
            "causal-lm",
            root / "optimized",
            tokenizer_file=tokenizer,
            export_options={"optimize": True},
            **MODEL,
        )[1],
    }


def interleaved(model: CausalLM) -> CausalLM:
    """Pause after every forward step, so the threads' decoding steps interleave on every token."""
    forward = model.forward

    def paused(*args, **kwargs):
        result = forward(*args, **kwargs)
        time.sleep(0.002)
        return result

    model.forward = paused
    return model


@pytest.mark.parametrize("flavor", ["portable", "optimized"])
def test_eight_threads_match_sequential_runs(folders, flavor):
    model = interleaved(CausalLM.load(folders[flavor]))
    if flavor == "optimized":
        assert model.cache_mode == "shared-buffer"
    report = check_concurrent(
        model, make_requests(seed=1, max_new_tokens=NEW_TOKENS), threads=8, duration_s=120,
        max_requests=REQUESTS, progress=False,
    )  # fmt: skip
    assert report.errors == [] and report.mismatches == []
    assert report.requests == REQUESTS and report.passed


def test_the_check_catches_requests_sharing_a_cache_buffer(folders):
    """The bug the runtime avoids: one shared-buffer KV cache per model rather than per request."""
    model = interleaved(CausalLM.load(folders["optimized"]))
    fresh_cache, shared = model.new_cache, {}

    def one_cache_per_model(batch, capacity=None):
        if batch not in shared:
            shared[batch] = fresh_cache(batch, None)  # full capacity, reused by every request
        return SharedBufferCache(shared[batch].spec, shared[batch].values)  # same buffers, from row 0

    model.new_cache = one_cache_per_model
    report = check_concurrent(
        model, make_requests(seed=1, max_new_tokens=NEW_TOKENS), threads=8, duration_s=120,
        max_requests=REQUESTS, progress=False,
    )  # fmt: skip
    assert report.mismatches and not report.passed


@pytest.mark.parametrize("flavor", ["portable", "optimized"])
def test_rss_stays_flat_over_100_generations(folders, flavor):
    model = CausalLM.load(folders[flavor])
    report = measure_rss(model, make_requests(seed=2, max_new_tokens=NEW_TOKENS), 100, 10, progress=False)
    assert len(report.samples) == 11
    assert report.end_mb - report.start_mb < 25 and report.peak_mb - report.start_mb < 25, report.summary()


def test_the_rss_check_catches_a_leak(folders):
    model, kept = CausalLM.load(folders["portable"]), []

    def leaky(model, request):
        kept.append(np.ones(2**18, dtype=np.float32))  # 1 MB, written, kept forever
        return run_request(model, request)

    requests = make_requests(seed=2, max_new_tokens=NEW_TOKENS)
    report = measure_rss(model, requests, 50, 10, warmup=2, progress=False, run=leaky)
    assert report.end_mb - report.start_mb > 30 and report.slope_mb_per_1000 > 500
