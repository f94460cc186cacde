"""`gptneo-onnx bench-serve --quick`: the serving benchmark runs end to end on the tiny shape."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("matplotlib")

from gptneo_onnx.bench.serving import QUICK, SHAPES, main, workload  # noqa: E402


def test_quick_serving_bench_writes_its_results(tmp_path):
    output = tmp_path / "results"
    argv = ["--quick", "--policies", "continuous,sequential", "--clients", "2", "--threads", "1"]
    argv += ["--rounds", "2"]
    main([*argv, "--work", str(tmp_path / "work"), "--output", str(output)])
    results = json.loads((output / "serving.json").read_text())
    planned = workload(QUICK, 2, SHAPES["tiny"]["vocab_size"])
    expected_tokens = 2 * sum(tokens for _, tokens in planned)  # 2 rounds, pooled
    for policy in ("continuous", "sequential"):
        run = results["runs"][policy]["2"]
        assert run["requests"] == 2 * len(planned)
        assert run["output_tokens"] == expected_tokens  # min_tokens = max_tokens: exact lengths
        each = run["round_tokens_per_second"]  # the pooled rate lies between the rounds' rates
        assert len(each) == 2 and min(each) <= run["tokens_per_second"] <= max(each)
        assert run["ttft_p50"] > 0 and run["tokens_per_second"] > 0
        # sustained: tokens that arrived before the last request was taken, over that time
        assert run["sustained_tokens_per_second"] > 0 and run["seconds"] > 0
        # the engine's time, from the server's /metrics: sequential prefills one request per run
        # and steps one row; every share is part of the run's wall time
        engine = run["engine"]
        prefills = engine["prefill_runs"]
        assert prefills == 2 * len(planned) if policy == "sequential" else 2 <= prefills <= 2 * len(planned)
        assert engine["decode_steps"] >= max(tokens for _, tokens in planned) - 1
        if policy == "sequential":
            assert engine["mean_batch"] == 1 and engine["decode_steps"] == expected_tokens - 2 * len(planned)
        parts = [engine[f"{part}_share"] for part in ("decode", "prefill", "regroup", "other")]
        assert all(0 <= part <= 1 for part in parts) and sum(parts) == pytest.approx(1, abs=0.02)
        # until the list ran dry (scraped then: on the tiny shape the last steps may be done)
        sustained = run["sustained_engine"]
        assert 0 < sustained["decode_steps"] <= engine["decode_steps"]
        assert sustained["mean_batch"] == 1 if policy == "sequential" else sustained["mean_batch"] >= 1
    assert (output / "serving.png").stat().st_size > 0
    assert "| sequential | 2 |" in (output / "serving.md").read_text().split("Where the engine")[1]
    assert "| continuous | 2 |" in (output / "serving.md").read_text()
    # the ceiling: each policy's cost per token recomputed from the timed steps and prefills
    ceiling, mean_out = results["ceiling"], sum(QUICK.output_lengths) / len(QUICK.output_lengths)
    step, prefill = ceiling["step_ms"], ceiling["prefill_ms"]
    sequential_ms = (prefill["1"] + (mean_out - 1) * step["1"]) / mean_out
    continuous_ms = (prefill["8"] / 8 + (mean_out - 1) * step["8"] / 8) / mean_out
    assert ceiling["ratio"]["sequential"] == pytest.approx(sequential_ms / continuous_ms)
    assert ceiling["ratio"]["sequential"] > 1  # 8 tiny rows cost less than 8 single-row steps


def test_decode_columns_weigh_rows_by_their_steps():
    """Hand-computed: prompts of 10 and 20, answers of 2 and 4 tokens. Each answer's first token
    comes from the prefill; the others are steps at p+1 .. p+a-1 columns: 11 | 11 12 13 | 21 |
    21 22 23, 134 columns over 8 steps."""
    from gptneo_onnx.bench.serving_limits import decode_columns

    assert decode_columns((10, 20), (2, 4)) == round(134 / 8)
    assert decode_columns((10,), (4,)) == 12
    assert decode_columns((7,), (1,)) == 7  # no decode step at all: the prompt
