"""Checkpoint loading: safetensors and weights-only pickles, strict tensor mapping, clear errors."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import tiny_hf_model
from safetensors.torch import load_file, save_file

from gptneo_onnx.reference import CheckpointError, from_pretrained


@pytest.mark.parametrize("safe", [True, False])
@pytest.mark.parametrize("task", ["causal-lm", "sequence-classification", "question-answering"])
def test_from_pretrained_matches_transformers(tmp_path, task, safe):
    from conftest import HF_CLASSES  # noqa: F401  (task names)

    hf_model = tiny_hf_model(task)
    hf_model.save_pretrained(tmp_path, safe_serialization=safe)
    assert (tmp_path / ("model.safetensors" if safe else "pytorch_model.bin")).is_file()
    model = from_pretrained(tmp_path, task=task)
    ids = torch.randint(3, 97, (2, 17), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours = model(ids)
        theirs = hf_model(ids)
    first = ours[0] if isinstance(ours, tuple) else ours
    torch.testing.assert_close(
        first, (theirs.logits if task != "question-answering" else theirs.start_logits), atol=1e-5, rtol=1e-5
    )


def test_base_model_loads_from_a_causal_lm_checkpoint(tmp_path):
    tiny_hf_model("causal-lm").save_pretrained(tmp_path)
    model = from_pretrained(tmp_path, task="base")
    assert model(torch.tensor([[5, 6, 7]])).shape == (1, 3, 32)


def _checkpoint(tmp_path):
    tiny_hf_model("causal-lm").save_pretrained(tmp_path)
    return load_file(tmp_path / "model.safetensors")


def test_missing_tensor_is_named(tmp_path):
    tensors = _checkpoint(tmp_path)
    del tensors["transformer.h.1.mlp.c_fc.bias"]
    save_file(tensors, tmp_path / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"lacks 1 tensor.*transformer\.h\.1\.mlp\.c_fc\.bias"):
        from_pretrained(tmp_path)


def test_unexpected_tensor_is_named(tmp_path):
    tensors = _checkpoint(tmp_path)
    tensors["transformer.h.0.attn.attention.rotary.weight"] = torch.zeros(2)
    save_file(tensors, tmp_path / "model.safetensors")
    with pytest.raises(
        CheckpointError, match="unexpected tensor 'transformer.h.0.attn.attention.rotary.weight'"
    ):
        from_pretrained(tmp_path)


def test_shape_mismatch_is_named(tmp_path):
    tensors = _checkpoint(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config["intermediate_size"] = 64  # the weights have 4 * 32 = 128
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(
        CheckpointError, match=r"tensor .transformer\.h\.0\.mlp\.c_fc\.\w+. has shape \(128.*expects \(64"
    ):
        from_pretrained(tmp_path)
    assert tensors  # the checkpoint itself was fine


def test_old_derived_attention_buffers_are_ignored(tmp_path):
    tensors = _checkpoint(tmp_path)
    tensors["transformer.h.0.attn.attention.bias"] = torch.ones(1, 1, 64, 64, dtype=torch.bool)
    tensors["transformer.h.0.attn.attention.masked_bias"] = torch.tensor(-1e9)
    save_file(tensors, tmp_path / "model.safetensors")
    from_pretrained(tmp_path)


def test_pickles_are_read_weights_only(tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    tiny_hf_model("causal-lm").save_pretrained(tmp_path, safe_serialization=False)
    state = torch.load(tmp_path / "pytorch_model.bin", weights_only=True)
    torch.save({**state, "payload": Evil()}, tmp_path / "pytorch_model.bin")
    with pytest.raises(Exception, match="(?i)weights.only|unsupported global|WeightsUnpickler"):
        from_pretrained(tmp_path)


def test_folder_without_weights_and_unknown_hub_id_give_clear_errors(tmp_path, monkeypatch):
    (tmp_path / "config.json").write_text(json.dumps(tiny_hf_model("causal-lm").config.to_dict()))
    with pytest.raises(FileNotFoundError, match="no weights"):
        from_pretrained(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(
        FileNotFoundError, match="could not fetch 'EleutherAI/gpt-neo-125m'.*local checkpoint folder"
    ):
        from_pretrained("EleutherAI/gpt-neo-125m")


def test_untied_lm_head_is_refused(tmp_path):
    tensors = _checkpoint(tmp_path)
    tensors["lm_head.weight"] = tensors["transformer.wte.weight"] + 1
    save_file(tensors, tmp_path / "model.safetensors")
    with pytest.raises(CheckpointError, match="ties them"):
        from_pretrained(tmp_path)
