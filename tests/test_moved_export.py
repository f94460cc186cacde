"""The tiny-shape version of scripts/big_model_e2e.py: an external-data export generates, moves,
and from another working directory loads through a relative path and generates the same tokens."""

from __future__ import annotations

import os
import shutil

from runtime_helpers import export_tiny, train_tokenizer

from gptneo_onnx.runtime import CausalLM


def test_external_data_export_generates_the_same_after_move_and_chdir(tmp_path, monkeypatch):
    tokenizer = train_tokenizer(tmp_path / "tokenizer.json")
    _, first = export_tiny(
        "causal-lm", tmp_path / "first", tokenizer_file=tokenizer, export_options={"external_data": True},
        vocab_size=320, initializer_range=0.5,
    )  # fmt: skip
    assert (first / "onnx" / "model.onnx.data").stat().st_size > (
        first / "onnx" / "model.onnx"
    ).stat().st_size
    before = CausalLM.load(first).generate(["Zoë went", [5, 6, 7]], max_new_tokens=8)

    moved = tmp_path / "elsewhere" / "moved"
    shutil.move(first, moved)
    assert not first.exists()
    (tmp_path / "unrelated" / "cwd").mkdir(parents=True)
    monkeypatch.chdir(tmp_path / "unrelated" / "cwd")
    relative = os.path.relpath(moved)
    assert not os.path.isabs(relative) and relative.startswith("..")
    model = CausalLM.load(relative)
    assert model.manifest.folder == moved.resolve()
    after = model.generate(["Zoë went", [5, 6, 7]], max_new_tokens=8)
    assert after.sequences == before.sequences and after.texts == before.texts
