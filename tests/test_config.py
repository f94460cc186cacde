from __future__ import annotations

import json

import pytest

from gptneo_onnx.config import ACTIVATIONS, ConfigError, GPTNeoConfig, expand_attention_types


def test_attention_types_expand_run_length_encoding():
    assert expand_attention_types([[["global", "local"], 2], [["local"], 1]]) == [
        "global",
        "local",
        "global",
        "local",
        "local",
    ]


def test_reads_config_json_and_derives_fields(tmp_path):
    path = tmp_path / "config.json"
    path.write_text(
        json.dumps(
            {
                "model_type": "gpt_neo",
                "hidden_size": 96,
                "num_layers": 3,
                "num_heads": 4,
                "attention_types": [[["global", "local", "local"], 1]],
                "window_size": 7,
                "intermediate_size": None,
                "id2label": {"0": "neg", "1": "pos"},
                "pad_token_id": 5,
            }
        )
    )
    config = GPTNeoConfig.from_json_file(path)
    assert config.attention_layers == ["global", "local", "local"]
    assert config.head_dim == 24
    assert config.inner_size == 4 * 96
    assert [config.layer_window(i) for i in range(3)] == [None, 7, 7]
    assert config.num_labels == 2 and config.id2label == {0: "neg", 1: "pos"}
    assert config.label2id == {"neg": 0, "pos": 1}
    assert config.pad_token_id == 5


def test_matches_transformers_config_fields():
    transformers = pytest.importorskip("transformers")
    hf = transformers.GPTNeoConfig(
        hidden_size=64,
        num_layers=4,
        num_heads=8,
        attention_types=[[["local", "global"], 2]],
        intermediate_size=100,
        activation_function="relu",
        window_size=3,
    )
    config = GPTNeoConfig.from_transformers(hf)
    assert config.attention_layers == hf.attention_layers
    assert config.inner_size == 100 and config.activation_function == "relu"
    for name in (
        "vocab_size",
        "max_position_embeddings",
        "layer_norm_epsilon",
        "bos_token_id",
        "eos_token_id",
        "embed_dropout",
        "classifier_dropout",
        "use_cache",
    ):
        assert getattr(config, name) == getattr(hf, name), name


def test_every_transformers_activation_name_is_known():
    activations = pytest.importorskip("transformers.activations")
    learned = {"prelu", "xielu"}
    assert set(activations.ACT2CLS) - learned == set(ACTIVATIONS)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"num_layers": 3}, "expand to 2 layers"),
        ({"attention_types": [[["global", "sparse"], 1]], "num_layers": 2}, "unknown attention type"),
        ({"activation_function": "gelu_newest"}, "unknown activation_function"),
        ({"activation_function": "prelu"}, "learned parameters"),
        ({"hidden_size": 30, "num_heads": 4}, "divisible by num_heads"),
        ({"model_type": "gpt2"}, "model_type"),
    ],
)
def test_rejects_inconsistent_configs(overrides, message):
    data = {"hidden_size": 32, "num_layers": 2, "num_heads": 4, "attention_types": [[["global", "local"], 1]]}
    data.update(overrides)
    with pytest.raises(ConfigError, match=message):
        GPTNeoConfig.from_dict(data)


def test_config_module_does_not_import_torch():
    import subprocess
    import sys

    code = "import sys, gptneo_onnx.config; print('torch' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "False"
