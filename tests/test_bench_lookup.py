"""`gptneo-onnx bench-lookup --quick`: the prompt-lookup benchmark runs end to end on the bundled
model; its tokens are plain greedy's and its step counts fit the tokens. Speed is never asserted."""

from __future__ import annotations

import inspect
import json
import shlex

import pytest

pytest.importorskip("onnxruntime")
pytest.importorskip("matplotlib")
pytest.importorskip("transformers")

from gptneo_onnx.bench.lookup import NEW_TOKENS, QUICK, main  # noqa: E402


def test_quick_lookup_bench_gives_plain_greedy_tokens_and_fitting_steps(bundled_optimized_export, tmp_path):
    from gptneo_onnx.runtime import CausalLM

    output = tmp_path / "results"
    argv = ["--quick", "--export", str(bundled_optimized_export), "--output", str(output), "--no-progress"]
    main([*argv, "--threads", "2"])
    results = json.loads((output / "lookup.json").read_text())
    penalty = results["settings"]["repetition_penalty"]
    model = CausalLM.load(bundled_optimized_export, provider="cpu", intra_op_threads=2)
    settings = dict(max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, repetition_penalty=penalty)
    assert [row["name"] for row in results["prompts"]] == list(QUICK.prompts)
    for row in results["prompts"]:
        plain = model.generate([row["prompt_ids"]], **settings).sequences[0]  # a session of its own
        assert row["plain_tokens"] == plain and len(plain) == NEW_TOKENS
        for system in ("ours", "transformers"):
            assert row[system]["plain"]["steps"] == NEW_TOKENS  # the prefill and 63 one-token steps
            for lookup in QUICK.lookups:
                values = row[system][f"N={lookup}"]
                assert values["tokens"] == plain
                assert values["steps"] <= NEW_TOKENS and values["steps"] * (lookup + 1) >= NEW_TOKENS
                accepted = values["accepted_per_step"] * values["steps"]
                assert 0 <= accepted <= values["drafted"]
                assert values["speedup"] == pytest.approx(values["tok_s"] / row[system]["plain"]["tok_s"])
    # the continuation prompt is P + C + P, with C the plain greedy continuation of P
    base = model.tokenizer.encode(inspect.getsource(shlex.quote)).ids
    ids = results["prompts"][-1]["prompt_ids"]
    assert ids[: len(base)] == base == ids[-len(base) :]
    assert ids[len(base) : -len(base)] == model.generate([base], **settings).sequences[0]
    assert set(results["step_ms"]) == {"ours", "transformers"}
    assert set(results["step_ms"]["ours"]) == {"1", *(str(n + 1) for n in QUICK.lookups)}
    table = (output / "lookup.md").read_text()
    assert "| shlex.split |" in table and "| continuation in context |" in table
    assert (output / "lookup.png").stat().st_size > 0
