"""Prompt-lookup decoding: drafts as transformers finds them, output token-identical to plain
greedy decoding and to transformers' `generate(prompt_lookup_num_tokens=...)`, in every cache."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import tiny_hf_model

from gptneo_onnx.export import export
from gptneo_onnx.reference import from_transformers
from gptneo_onnx.runtime.prompt_lookup import draft_tokens

pytest.importorskip("onnxruntime")
candidate_generator = pytest.importorskip("transformers.generation.candidate_generator")

CASES = {  # export options, load options
    "portable": ({}, {}),
    "portable-windowed": ({"windowed_local_cache": True}, {}),
    "optimized-shared-buffer": ({"optimize": True}, {"cache_mode": "shared-buffer"}),
    "optimized-concat": ({"optimize": True}, {"cache_mode": "concat"}),
}
# Repeated phrases, as in an edit of earlier text: the n-grams recur, so drafts get accepted.
PHRASE = [5, 17, 33, 8, 61, 42, 9, 23]


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    # Larger weights than the default init: varied greedy output, so drafts are both taken and refused.
    hf_model = tiny_hf_model("causal-lm", max_position_embeddings=128, initializer_range=0.3)
    folder = tmp_path_factory.mktemp("lookup")
    names = {}
    for name, (options, _) in CASES.items():
        key = tuple(sorted(options.items()))
        if key not in names:
            export(from_transformers(hf_model), folder / name, progress=False, validate=False, **options)
            names[key] = folder / name
    return hf_model, {name: names[tuple(sorted(options.items()))] for name, (options, _) in CASES.items()}


def test_drafts_match_transformers_candidate_generator():
    rng = np.random.default_rng(2)
    for _ in range(200):
        tokens = rng.integers(0, 6, size=int(rng.integers(2, 30)))
        count = int(rng.integers(1, 6))
        generator = candidate_generator.PromptLookupCandidateGenerator(
            eos_token_id=torch.tensor([99]), num_output_tokens=count, max_length=1000
        )
        candidates, _ = generator.get_candidates(torch.from_numpy(tokens)[None])
        expected = candidates[0, len(tokens) :].tolist()
        assert draft_tokens(tokens, count).tolist() == expected, tokens


def prompts() -> list[list[int]]:
    rng = np.random.default_rng(4)
    return [PHRASE * 3 + [7, 11], [int(t) for t in rng.integers(3, 97, size=9)] * 2]


NEW_TOKENS = 30


@pytest.fixture(scope="module")
def transformers_outputs(exports):
    """transformers' own prompt-lookup greedy output per prompt (it may run one token over)."""
    hf_model, _ = exports
    outputs = []
    with torch.no_grad():
        for prompt in prompts():
            hf = hf_model.generate(
                torch.tensor([prompt]),
                attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                do_sample=False,
                prompt_lookup_num_tokens=4,
                max_new_tokens=NEW_TOKENS,
                min_new_tokens=NEW_TOKENS,
                pad_token_id=0,
            )
            outputs.append(hf[0, len(prompt) : len(prompt) + NEW_TOKENS].tolist())
    return outputs


@pytest.mark.parametrize("case", CASES)
def test_greedy_output_is_that_of_plain_greedy_and_of_transformers(
    exports, transformers_outputs, case, monkeypatch
):
    from gptneo_onnx.runtime import CausalLM, KVCache

    _, folders = exports
    model = CausalLM.load(folders[case], provider="cpu", **CASES[case][1])
    steps, dropped = [], []
    forward, drop = model.forward, KVCache.drop_newest
    monkeypatch.setattr(model, "forward", lambda *a, **k: steps.append(a[0].shape[1]) or forward(*a, **k))
    monkeypatch.setattr(KVCache, "drop_newest", lambda cache, rows: dropped.append(rows) or drop(cache, rows))
    drafted = 0
    for prompt, expected in zip(prompts(), transformers_outputs, strict=True):
        settings = dict(max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS)
        plain = model.generate([prompt], **settings).sequences
        steps.clear()
        lookup = model.generate([prompt], prompt_lookup_num_tokens=4, **settings)
        assert lookup.sequences == plain == [expected] and lookup.finish_reasons == ["length"]
        drafted += sum(length - 1 for length in steps[1:])
    assert drafted > sum(dropped) > 0  # drafts were taken and refused (their cache rows dropped)


def test_sampling_draws_the_same_tokens_as_plain_sampling(exports):
    """Each token is drawn from the same distribution with the same random stream, so a seeded
    run is the plain run, repetition penalty and top-k included."""
    from gptneo_onnx.runtime import CausalLM

    _, folders = exports
    model = CausalLM.load(folders["portable-windowed"], provider="cpu")
    settings = dict(
        max_new_tokens=30, do_sample=True, seed=3, top_k=20, repetition_penalty=1.1, eos_token_id=[2]
    )
    for prompt in prompts():
        plain = model.generate([prompt], **settings)
        lookup = model.generate([prompt], prompt_lookup_num_tokens=3, **settings)
        assert (lookup.sequences, lookup.finish_reasons) == (plain.sequences, plain.finish_reasons)


def test_one_sequence_only_and_a_clear_error_otherwise(exports):
    from gptneo_onnx.runtime import CausalLM, GenerationConfigError

    _, folders = exports
    model = CausalLM.load(folders["portable"], provider="cpu")
    with pytest.raises(GenerationConfigError, match="one prompt"):
        model.generate([PHRASE, PHRASE[:4]], prompt_lookup_num_tokens=2)
    with pytest.raises(GenerationConfigError, match="prompt_lookup_num_tokens must be an integer >= 1"):
        model.generate([PHRASE], prompt_lookup_num_tokens=0)


def test_bundled_model_on_an_edit_prompt_matches_transformers(bundled_optimized_export):
    """The trained model, a function then its renamed copy: past the local window (128), so the
    windowed shared-buffer cache drops refused rows after trimming to min_rows + spare."""
    from transformers import GPTNeoForCausalLM

    from gptneo_onnx.cli.defaults import BUNDLED_MODEL_DIR
    from gptneo_onnx.runtime import CausalLM

    function = 'def parse(line, default=None):\n    key, sep, value = line.partition(":")\n'
    function += "    if not sep:\n        return default\n    return key.strip(), value.strip()\n"
    prompt = function * 3 + "\n\n" + function.replace("parse", "read")[:40]
    model = CausalLM.load(bundled_optimized_export, provider="cpu")
    ids = model.tokenizer.encode(prompt).ids
    settings = dict(max_new_tokens=60, min_new_tokens=60)
    plain = model.generate([ids], **settings).sequences[0]
    assert model.generate([ids], prompt_lookup_num_tokens=5, **settings).sequences[0] == plain
    hf_model = GPTNeoForCausalLM.from_pretrained(BUNDLED_MODEL_DIR).eval()
    with torch.no_grad():
        hf = hf_model.generate(torch.tensor([ids]), do_sample=False, prompt_lookup_num_tokens=5, **settings)
    assert len(ids) + 60 > 128 + 32 and hf[0, len(ids) : len(ids) + 60].tolist() == plain


def test_cli_option_gives_the_plain_greedy_tokens(exports, capsys):
    import json

    from gptneo_onnx.cli import main

    _, folders = exports
    argv = ["generate", "-m", str(folders["portable"]), ",".join(map(str, PHRASE * 3)), "--token-ids"]
    argv += ["--max-new-tokens", "20", "--json"]
    outputs = []
    for extra in ([], ["--prompt-lookup", "3"]):
        capsys.readouterr()
        assert main([*argv, *extra]) == 0
        outputs.append(json.loads(capsys.readouterr().out)["sequences"])
    assert outputs[0] == outputs[1]
    assert main([*argv, "--prompt-lookup", "0"]) == 2
    assert "prompt_lookup_num_tokens must be an integer >= 1" in capsys.readouterr().err
