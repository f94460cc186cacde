"""The runtime CLI commands end to end through `main([...])`."""

from __future__ import annotations

import json

import pytest
from runtime_helpers import export_tiny, train_tokenizer

from gptneo_onnx.cli import main
from gptneo_onnx.runtime import Model

TASKS = ("causal-lm", "sequence-classification", "token-classification", "question-answering", "base")


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    folder = tmp_path_factory.mktemp("cli")
    tokenizer = train_tokenizer(folder / "tokenizer.json")
    labels = {"token-classification": {0: "O", 1: "B-PER", 2: "I-PER"}}
    return {
        task: export_tiny(
            task,
            folder / task,
            tokenizer_file=tokenizer,
            vocab_size=320,
            initializer_range=0.5,
            **({"id2label": labels[task]} if task in labels else {}),
        )[1]  # fmt: skip
        for task in TASKS
    }


def run_json(capsys, argv: list[str]) -> dict:
    capsys.readouterr()
    assert main([*argv, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_generate_streams_and_matches_the_api(exports, capsys):
    folder = str(exports["causal-lm"])
    expected = Model.load(folder).generate("Zoë went", max_new_tokens=12, repetition_penalty=1.2)
    assert (
        main(["generate", "-m", folder, "Zoë went", "--max-new-tokens", "12", "--repetition-penalty", "1.2"])
        == 0
    )
    assert capsys.readouterr().out == "Zoë went" + expected.texts[0] + "\n"  # prompt echoed, then the stream
    payload = run_json(
        capsys,
        ["generate", "-m", folder, "Zoë went", "--max-new-tokens", "12", "--repetition-penalty", "1.2"],
    )
    assert payload["provider"] == "cpu"
    assert payload["sequences"][0]["token_ids"] == expected.sequences[0]


def test_generate_batch_beams_sampling_and_token_ids(exports, capsys):
    folder = str(exports["causal-lm"])
    beams_argv = [
        "generate",
        "-m",
        folder,
        "Zoë",
        "東京 and",
        "--num-beams",
        "3",
        "--num-return-sequences",
        "2",
    ]
    beams = run_json(capsys, [*beams_argv, "--max-new-tokens", "6", "--early-stopping", "true"])
    assert [s["prompt_index"] for s in beams["sequences"]] == [0, 0, 1, 1]
    assert all(s["score"] is not None for s in beams["sequences"])
    sampled = [
        "generate",
        "-m",
        folder,
        "Zoë",
        "--do-sample",
        "--seed",
        "4",
        "--top-p",
        "0.9",
        "--temperature",
        "0.7",
    ]
    sampled += ["--max-new-tokens", "8"]
    assert run_json(capsys, sampled) == run_json(capsys, sampled)
    ids = run_json(capsys, ["generate", "-m", folder, "5, 6, 7", "--token-ids", "--max-new-tokens", "3"])
    assert len(ids["sequences"][0]["token_ids"]) <= 3
    assert main(["generate", "-m", folder, "Zoë", "東京", "--max-new-tokens", "3"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("[0] ") and lines[1].startswith("[1] ")


def test_generate_logit_bias_bans_and_pushes_tokens_as_the_api_does(exports, capsys):
    folder = str(exports["causal-lm"])
    plain = Model.load(folder).generate([5, 6, 7], max_new_tokens=8).sequences[0]
    bias = {plain[0]: -100.0, 40: 3.5}
    expected = Model.load(folder).generate([5, 6, 7], max_new_tokens=8, logit_bias=bias).sequences[0]
    argv = ["generate", "-m", folder, "5,6,7", "--token-ids", "--max-new-tokens", "8"]
    argv += ["--logit-bias", f"{plain[0]}=-100", "--logit-bias", "40=3.5"]
    assert run_json(capsys, argv)["sequences"][0]["token_ids"] == expected != plain
    assert main(["generate", "-m", folder, "hi", "--logit-bias", "fifty=1"]) == 2  # argparse's usage error
    assert "expected ID=BIAS" in capsys.readouterr().err
    assert main(["generate", "-m", folder, "hi", "--logit-bias", "320=1"]) == 2
    assert "logit_bias 320 is outside the vocabulary" in capsys.readouterr().err


def test_generate_presence_and_frequency_penalties_reach_generate(exports, capsys):
    folder = str(exports["causal-lm"])
    penalties = {"presence_penalty": 1.2, "frequency_penalty": 0.9}
    plain = Model.load(folder).generate([5, 6, 7], max_new_tokens=12).sequences[0]
    expected = Model.load(folder).generate([5, 6, 7], max_new_tokens=12, **penalties).sequences[0]
    argv = ["generate", "-m", folder, "5,6,7", "--token-ids", "--max-new-tokens", "12"]
    argv += ["--presence-penalty", "1.2", "--frequency-penalty", "0.9"]
    assert run_json(capsys, argv)["sequences"][0]["token_ids"] == expected != plain
    assert main(["generate", "-m", folder, "hi", "--presence-penalty", "nan"]) == 2
    assert "presence_penalty must be a finite number" in capsys.readouterr().err


def test_generate_bad_input_is_one_error_line(exports, capsys):
    folder = str(exports["causal-lm"])
    capsys.readouterr()
    assert main(["generate", "-m", folder, "5,400", "--token-ids"]) == 2
    assert "outside the vocabulary [0, 320)" in capsys.readouterr().err
    assert main(["generate", "-m", folder, "hi", "--top-p", "2"]) == 2
    assert "top_p" in capsys.readouterr().err
    assert main(["generate", "-m", folder, "a\udcffb"]) == 2  # argv bytes that are not UTF-8
    out, err = capsys.readouterr()
    assert "not valid Unicode" in err and out == ""  # refused before the prompt is echoed
    assert main(["generate", "-m", folder, "hi", "--provider", "npu"]) == 2
    assert "unknown provider 'npu'" in capsys.readouterr().err
    assert main(["classify", folder, "hi"]) == 2
    assert "'causal-lm' export" in capsys.readouterr().err


def test_generate_without_a_folder_uses_the_default_export(exports, capsys, monkeypatch):
    from gptneo_onnx.cli import defaults

    monkeypatch.setattr(defaults, "default_export_dir", lambda **_: exports["causal-lm"])
    payload = run_json(capsys, ["generate", "Zoë", "--max-new-tokens", "4"])
    expected = Model.load(exports["causal-lm"]).generate("Zoë", max_new_tokens=4)
    assert payload["sequences"][0]["token_ids"] == expected.sequences[0]


def test_classify(exports, capsys):
    payload = run_json(capsys, ["classify", str(exports["sequence-classification"]), "Zoë", "Alice met Bob"])
    assert [r["text"] for r in payload["results"]] == ["Zoë", "Alice met Bob"]
    assert sum(item["score"] for item in payload["results"][0]["labels"]) == pytest.approx(1.0)
    assert main(["classify", str(exports["sequence-classification"]), "Zoë", "--top-k", "1"]) == 0
    assert capsys.readouterr().out.startswith("'Zoë': LABEL_")


def test_tag(exports, capsys):
    text = "Alice met Bob in Paris."
    payload = run_json(capsys, ["tag", str(exports["token-classification"]), text])
    result = payload["results"][0]
    assert len(result["tokens"]) == len(
        Model.load(exports["token-classification"]).tokenizer.encode(text).ids
    )
    for entity in result["entities"]:
        assert entity["label"] == "PER" and text[entity["start"] : entity["end"]] == entity["text"]
    assert main(["tag", str(exports["token-classification"]), text]) == 0


def test_qa(exports, capsys):
    context = "Alice met Bob in Paris."
    payload = run_json(capsys, ["qa", str(exports["question-answering"]), "Who met Bob?", context,
                                "--max-answer-length", "3"])  # fmt: skip
    assert payload["answer"] == context[payload["start"] : payload["end"]] and 0 < payload["score"] <= 1
    assert main(["qa", str(exports["question-answering"]), "Who?", context]) == 0


def test_embed(exports, capsys):
    payload = run_json(
        capsys, ["embed", str(exports["base"]), "Zoë", "東京", "--pooling", "last", "--normalize"]
    )
    assert len(payload["embeddings"]) == 2 and len(payload["embeddings"][0]) == 32
    assert main(["embed", str(exports["base"]), "Zoë"]) == 0
    assert "dim 32" in capsys.readouterr().out
