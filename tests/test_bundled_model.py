"""The bundled default model end to end: transformers loads it, it exports, and the thin
runtime decodes it token-identically to transformers."""

from __future__ import annotations

import json

import numpy as np
import torch
import transformers

from gptneo_onnx.cli.defaults import BUNDLED_MODEL_DIR
from gptneo_onnx.runtime import Model


def test_bundled_model_is_small_and_in_hugging_face_layout():
    names = {path.name for path in BUNDLED_MODEL_DIR.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "generation_config.json"} <= names
    assert sum(path.stat().st_size for path in BUNDLED_MODEL_DIR.iterdir()) <= 30 * 2**20
    config = json.loads((BUNDLED_MODEL_DIR / "config.json").read_text())
    assert {"global", "local"} <= {kind for pattern, _ in config["attention_types"] for kind in pattern}
    assert config["window_size"] < config["max_position_embeddings"]


def test_runtime_greedy_is_token_identical_to_transformers(bundled_export):
    hf_model = transformers.GPTNeoForCausalLM.from_pretrained(BUNDLED_MODEL_DIR).eval()
    tokenizer = transformers.PreTrainedTokenizerFast(tokenizer_file=str(BUNDLED_MODEL_DIR / "tokenizer.json"))
    model = Model.load(bundled_export)
    # a prompt longer than the local window, and a short one: a left-padded batch
    long_prompt = (BUNDLED_MODEL_DIR.parent / "runtime" / "generation.py").read_text()[:900]
    prompts = [long_prompt, "def fibonacci(n):"]
    encoded = [tokenizer(p)["input_ids"] for p in prompts]
    assert len(encoded[0]) > hf_model.config.window_size
    result = model.generate(prompts, max_new_tokens=40, do_sample=False, eos_token_id=[])
    pad = hf_model.config.pad_token_id
    for row, ids in enumerate(encoded):
        with torch.no_grad():
            expected = hf_model.generate(
                torch.tensor([ids]),
                attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                max_new_tokens=40,
                do_sample=False,
                eos_token_id=None,
                pad_token_id=pad,
            )[0, len(ids) :].tolist()
        assert result.sequences[row] == expected


def test_bundled_model_completes_python(bundled_export):
    text = Model.load(bundled_export).generate("def fibonacci(n):", max_new_tokens=48).texts[0]
    assert "\n" in text and np.mean([c.isprintable() or c in "\n\t" for c in text]) > 0.95
