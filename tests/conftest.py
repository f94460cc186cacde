"""Shared fixtures: tiny random GPT-Neo checkpoints built with transformers."""

from __future__ import annotations

import os
from datetime import timedelta

import pytest
from hypothesis import settings

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

# Property-based tests (hypothesis): a fixed budget per test, so the suite's time is bounded.
# CI (CI=true) derandomizes: the same examples every run, and no example database.
# HYPOTHESIS_PROFILE=thorough explores far more cases (minutes).
settings.register_profile("default", max_examples=30, deadline=timedelta(seconds=10))
settings.register_profile("ci", parent=settings.get_profile("default"), derandomize=True, database=None)
settings.register_profile("thorough", max_examples=1000, deadline=None)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE") or ("ci" if os.environ.get("CI") else "default"))

HF_CLASSES = {
    "base": "GPTNeoModel",
    "causal-lm": "GPTNeoForCausalLM",
    "sequence-classification": "GPTNeoForSequenceClassification",
    "token-classification": "GPTNeoForTokenClassification",
    "question-answering": "GPTNeoForQuestionAnswering",
}


def tiny_config(**overrides) -> transformers.GPTNeoConfig:
    """A small GPT-Neo: window 4 so short sequences already cross the local window."""
    settings = dict(
        vocab_size=97,
        max_position_embeddings=64,
        hidden_size=32,
        num_layers=2,
        num_heads=4,
        attention_types=[[["global", "local"], 1]],
        window_size=4,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
        num_labels=3,
    )
    settings.update(overrides)
    return transformers.GPTNeoConfig(**settings)


def tiny_hf_model(task: str = "causal-lm", seed: int = 0, **overrides):
    """A random transformers GPTNeo* model in eval mode, with non-trivial biases and norms."""
    torch.manual_seed(seed)
    model = getattr(transformers, HF_CLASSES[task])(tiny_config(**overrides)).eval()
    with torch.no_grad():  # default init leaves biases 0 and norms 1: randomize them too
        for name, param in model.named_parameters():
            if name.endswith("bias") or ".ln_" in name:
                param.add_(torch.randn_like(param) * 0.1)
    return model


@pytest.fixture
def hf_causal_lm():
    return tiny_hf_model("causal-lm")


@pytest.fixture(scope="session")
def bundled_export(tmp_path_factory):
    """The bundled model's default (portable) export, validated; shared by the test modules."""
    from gptneo_onnx.cli.defaults import export_bundled_model

    result = export_bundled_model(tmp_path_factory.mktemp("bundled"), progress=False)
    assert result.report["passed"]
    return result.output_dir


@pytest.fixture(scope="session")
def bundled_optimized_export(tmp_path_factory):
    """The bundled model's optimized export (GroupQueryAttention, shared-buffer cache), validated."""
    from gptneo_onnx.cli.defaults import export_bundled_model

    folder = tmp_path_factory.mktemp("bundled-optimized")
    result = export_bundled_model(folder, progress=False, optimize=True)
    assert result.report["passed"]
    return result.output_dir


@pytest.fixture(scope="module")
def external_export(tmp_path_factory):
    """A tiny causal-lm export with its weights in model.onnx.data and a tokenizer that fits."""
    from runtime_helpers import export_tiny, train_tokenizer

    root = tmp_path_factory.mktemp("external")
    tokenizer = train_tokenizer(root / "tokenizer.json")
    options = {"external_data": True, "validate": False}
    return export_tiny("causal-lm", root / "export", tokenizer, export_options=options, vocab_size=320)[1]
