"""`gptneo-onnx export`, `verify` and `bench` end to end through the CLI entry point."""

from __future__ import annotations

import json

from conftest import tiny_hf_model

from gptneo_onnx.cli import main
from gptneo_onnx.cli.defaults import BUNDLED_MODEL_DIR
from gptneo_onnx.runtime import Model


def test_export_a_checkpoint_folder_then_verify_it(tmp_path, capsys):
    checkpoint = tmp_path / "checkpoint"
    tiny_hf_model("token-classification").save_pretrained(checkpoint)
    output = tmp_path / "export"
    assert (
        main(
            ["export", "--model", str(checkpoint), "--task", "token-classification", "--output", str(output)]
        )
        == 0
    )
    printed = capsys.readouterr().out
    assert "exported token-classification (float32)" in printed and "parity passed" in printed
    assert "model.onnx" in printed
    assert json.loads((output / "gptneo_onnx.json").read_text())["task"] == "token-classification"

    assert main(["verify", str(output), "--reference", str(checkpoint), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["parity"]["passed"] and report["parity"]["max_abs_diff"] < 1e-4


def test_verify_fails_against_a_different_checkpoint(tmp_path, capsys):
    first, second = tmp_path / "a", tmp_path / "b"
    tiny_hf_model("causal-lm", seed=0).save_pretrained(first)
    tiny_hf_model("causal-lm", seed=1).save_pretrained(second)
    assert main(["export", "--model", str(first), "--output", str(tmp_path / "export"), "--json"]) == 0
    capsys.readouterr()
    assert main(["verify", str(tmp_path / "export"), "--reference", str(second)]) == 1
    assert "parity FAILED" in capsys.readouterr().out


def test_optimized_int4_export_of_the_bundled_model_with_a_quality_report(tmp_path, capsys):
    output = tmp_path / "int4"
    arguments = ["export", "--model", str(BUNDLED_MODEL_DIR), "--output", str(output), "--optimize"]
    arguments += ["--quantize", "int4", "--block-size", "32", "--quality", "--quality-windows", "4", "--json"]
    assert main(arguments) == 0
    capsys.readouterr()
    manifest = json.loads((output / "gptneo_onnx.json").read_text())
    assert manifest["flavor"] == "optimized" and manifest["quantization"]["method"].startswith("int4")
    quality = json.loads((output / "quality_report.json").read_text())
    assert quality["perplexity"] < 1.2 * quality["reference_perplexity"] and quality["top1_agreement"] > 0.6
    assert main(["verify", str(output), "--reference", str(BUNDLED_MODEL_DIR), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["quality"]["top1_agreement"] == quality["top1_agreement"]
    assert Model.load(output).generate("def add(a, b):", max_new_tokens=8).sequences[0]


def test_verify_computes_the_quality_of_an_existing_export(tmp_path, capsys):
    output = tmp_path / "fp32"
    assert main(["export", "--model", str(BUNDLED_MODEL_DIR), "--output", str(output), "--json"]) == 0
    capsys.readouterr()
    arguments = ["verify", str(output), "--reference", str(BUNDLED_MODEL_DIR), "--quality"]
    assert main([*arguments, "--quality-windows", "2", "--json"]) == 0
    quality = json.loads(capsys.readouterr().out)["quality"]
    assert quality["windows"] == 2 and quality["top1_agreement"] > 0.99
    assert abs(quality["perplexity_ratio"] - 1.0) < 1e-3  # a float32 export is the reference
    recorded = json.loads((output / "gptneo_onnx.json").read_text())["quality"]  # the sidecar agrees
    assert recorded["report"] == "quality_report.json" and recorded["perplexity"] == quality["perplexity"]


def test_windowed_local_cache_flag_sets_the_sidecar_format(tmp_path, capsys):
    """Portable: off by default (format 1, Optimum's IO); --windowed-local-cache turns it on;
    --optimize has it on unless --no-windowed-local-cache."""
    checkpoint = tmp_path / "checkpoint"
    tiny_hf_model("causal-lm").save_pretrained(checkpoint)
    cases = {
        "portable": ([], 1),
        "portable-windowed": (["--windowed-local-cache"], 2),
        "optimized": (["--optimize"], 2),
        "optimized-plain": (["--optimize", "--no-windowed-local-cache"], 1),
    }
    greedy = {}
    for name, (flags, version) in cases.items():
        output = tmp_path / name
        assert main(["export", "--model", str(checkpoint), "--output", str(output), "--json", *flags]) == 0
        manifest = json.loads((output / "gptneo_onnx.json").read_text())
        assert manifest["format_version"] == version and manifest["validation"]["passed"], name
        assert ("local_window" in manifest["cache"]) == (version == 2)
        greedy[name] = Model.load(output).generate([5, 6, 7, 8, 9, 10], max_new_tokens=12).sequences
    assert all(tokens == greedy["portable"] for tokens in greedy.values())  # same weights, same tokens
    capsys.readouterr()
