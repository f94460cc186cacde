"""The bundled default model, and its ONNX export cached after the first use."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

BUNDLED_MODEL_DIR = Path(__file__).resolve().parent.parent / "default_model"
DEFAULT_PROMPT = "def fibonacci(n):"


def cache_root() -> Path:
    """Where cached exports live: $GPTNEO_ONNX_CACHE, else ~/.cache/gptneo-onnx."""
    return Path(os.environ.get("GPTNEO_ONNX_CACHE") or Path.home() / ".cache" / "gptneo-onnx")


def default_export_dir(progress: bool = True) -> Path:
    """The bundled model's causal-LM export, made (and validated) on first use, then reused."""
    weights = BUNDLED_MODEL_DIR / "model.safetensors"
    if not weights.is_file():
        raise FileNotFoundError(f"the bundled model is missing from {BUNDLED_MODEL_DIR}")
    key = hashlib.sha256(weights.read_bytes()).hexdigest()[:12]
    target = cache_root() / f"default-model-{key}"
    if (target / "gptneo_onnx.json").is_file():
        return target
    try:
        from gptneo_onnx.export import export
        from gptneo_onnx.reference import from_pretrained
    except ImportError as error:
        raise RuntimeError(
            "the first run exports the bundled model to ONNX, which needs the export extra: "
            "pip install 'gptneo-onnx[export,cpu]' (or pass an export folder)"
        ) from error
    print(f"exporting the bundled model to {target} (once)", file=sys.stderr)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".default-model-", dir=target.parent))
    try:
        generation = BUNDLED_MODEL_DIR / "generation_config.json"
        export(
            from_pretrained(BUNDLED_MODEL_DIR),
            staging,
            tokenizer_file=BUNDLED_MODEL_DIR / "tokenizer.json",
            generation_config=json.loads(generation.read_text()) if generation.is_file() else None,
            progress=progress,
        )
        staging.rename(target)  # atomic: a half-written export is never picked up
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target
