"""Write the `gptneo_onnx.json` manifest that describes an export (schema: docs/sidecar.md)."""

from __future__ import annotations

import json
from dataclasses import asdict
from importlib import metadata
from pathlib import Path

from gptneo_onnx.config import GPTNeoConfig
from gptneo_onnx.export.graph_builder import OPSET, sha256_of
from gptneo_onnx.export.graphs import IOSpec, cache_names

MANIFEST_NAME = "gptneo_onnx.json"
FORMAT_VERSION = 1
GENERATION_DEFAULTS = {
    "max_new_tokens": 64,
    "do_sample": False,
    "temperature": 1.0,
    "top_k": 50,
    "top_p": 1.0,
    "repetition_penalty": 1.0,
    "num_beams": 1,
    "length_penalty": 1.0,
    "early_stopping": False,
}


def tool_versions() -> dict[str, str | None]:
    versions = {}
    for name, dist in (
        ("gptneo_onnx", "gptneo-onnx"),
        ("torch", "torch"),
        ("onnx", "onnx"),
        ("onnxruntime", "onnxruntime"),
        ("transformers", "transformers"),
    ):
        try:
            versions[name] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def generation_defaults(generation_config: dict | None) -> dict:
    defaults = dict(GENERATION_DEFAULTS)
    for key in defaults:
        if generation_config and generation_config.get(key) is not None:
            defaults[key] = generation_config[key]
    return defaults


def eos_ids(config: GPTNeoConfig) -> list[int]:
    if config.eos_token_id is None:
        return []
    return list(config.eos_token_id) if isinstance(config.eos_token_id, list) else [config.eos_token_id]


def file_entry(folder: Path, name: str) -> dict:
    return {"file": name, "sha256": sha256_of(folder / name)}


def build_manifest(
    folder: Path,
    config: GPTNeoConfig,
    task: str,
    inputs: list[IOSpec],
    outputs: list[IOSpec],
    *,
    graph_file: str,
    external_data: list[str],
    precision: str,
    flavor: str = "portable",
    quantization: dict | None = None,
    tokenizer_file: str | None = None,
    generation_config: dict | None = None,
    cache: dict | None = None,
) -> dict:
    """The manifest as a dict; `cache` overrides the default concat-mode cache description."""
    if task == "causal-lm" and cache is None:
        cache = {
            "mode": "concat",
            "layout": ["batch_size", "num_heads", "past_sequence_length", "head_dim"],
            "dtype": precision,
            "layers": [
                {
                    "layer": i,
                    "attention": config.attention_layers[i],
                    "window": config.layer_window(i),
                    **cache_names(i),
                }
                for i in range(config.num_layers)
            ],
        }
    classification = task in ("sequence-classification", "token-classification")
    return {
        "format": "gptneo-onnx",
        "format_version": FORMAT_VERSION,
        "task": task,
        "flavor": flavor,
        "precision": precision,
        "quantization": quantization,
        "opset": OPSET,
        "graph": {
            **file_entry(folder, graph_file),
            "external_data": [file_entry(folder, f) for f in external_data],
        },
        "inputs": [asdict(spec) for spec in inputs],
        "outputs": [asdict(spec) for spec in outputs],
        "cache": cache,
        "model": {
            "vocab_size": config.vocab_size,
            "hidden_size": config.hidden_size,
            "num_layers": config.num_layers,
            "num_heads": config.num_heads,
            "head_dim": config.head_dim,
            "max_position_embeddings": config.max_position_embeddings,
            "window_size": config.window_size,
            "attention_layers": config.attention_layers,
        },
        "special_tokens": {
            "bos_token_id": config.bos_token_id,
            "eos_token_id": eos_ids(config),
            "pad_token_id": config.pad_token_id,
        },
        "labels": {"id2label": {str(k): v for k, v in config.id2label.items()}} if classification else None,
        "generation": generation_defaults(generation_config),
        "tokenizer": file_entry(folder, tokenizer_file) if tokenizer_file else None,
        "validation": None,
        "tools": tool_versions(),
    }


def write_manifest(folder: Path, manifest: dict) -> Path:
    path = folder / MANIFEST_NAME
    path.write_text(json.dumps(manifest, indent=2) + "\n")
    return path
