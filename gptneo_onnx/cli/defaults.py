"""The bundled default model, and its ONNX export cached after the first use."""

from __future__ import annotations

import hashlib
import json
import os
import sys
from pathlib import Path
from typing import Any

from gptneo_onnx.errors import MissingExtraError

BUNDLED_MODEL_DIR = Path(__file__).resolve().parent.parent / "default_model"
DEFAULT_PROMPT = "def fibonacci(n):"


def cache_root() -> Path:
    """Where cached exports live: $GPTNEO_ONNX_CACHE, else ~/.cache/gptneo-onnx."""
    return Path(os.environ.get("GPTNEO_ONNX_CACHE") or Path.home() / ".cache" / "gptneo-onnx")


def export_bundled_model(output_dir: str | Path, progress: bool = True, **options: Any) -> Any:
    """Export the bundled model with its tokenizer and generation defaults; returns the ExportResult.

    `options` go to `gptneo_onnx.export.export` (e.g. `optimize=True`, `validate=False`). Needs
    the export extra (torch).
    """
    from gptneo_onnx.export import export
    from gptneo_onnx.reference import from_pretrained

    generation = BUNDLED_MODEL_DIR / "generation_config.json"
    return export(
        from_pretrained(BUNDLED_MODEL_DIR),
        output_dir,
        tokenizer_file=BUNDLED_MODEL_DIR / "tokenizer.json",
        generation_config=json.loads(generation.read_text()) if generation.is_file() else None,
        progress=progress,
        **options,
    )


def default_export_dir(progress: bool = True) -> Path:
    """The bundled model's causal-LM export, made (and validated) on first use, then reused.

    A cached export that no longer loads (damaged, or from an older sidecar schema) is made again.
    """
    weights = BUNDLED_MODEL_DIR / "model.safetensors"
    if not weights.is_file():
        raise FileNotFoundError(f"the bundled model is missing from {BUNDLED_MODEL_DIR}")
    key = hashlib.sha256(weights.read_bytes()).hexdigest()[:12]
    target = cache_root() / f"default-model-{key}"
    if _loadable(target):
        return target
    try:
        import onnx  # noqa: F401
        import torch  # noqa: F401
    except ImportError as error:
        raise MissingExtraError(
            f"without -m/--model, generate exports the bundled model to ONNX once, which needs the "
            f"`export` extra (module {error.name!r} is not installed): pip install 'gptneo-onnx[export]', "
            "or pass an export folder with -m EXPORT"
        ) from error
    from gptneo_onnx.errors import ExportOutputError

    print(f"exporting the bundled model to {target} (once)", file=sys.stderr)
    try:  # written beside the target and renamed into place: a half-written export is never seen
        export_bundled_model(target, progress=progress, overwrite=True)
    except ExportOutputError:
        if not _loadable(target):  # another process may have finished the same export first
            raise
    return target


def _loadable(folder: Path) -> bool:
    """Whether `folder` holds an export that passes the runtime's checks (sidecar, files, hashes)."""
    from gptneo_onnx.runtime.errors import ExportFolderError
    from gptneo_onnx.runtime.manifest import load_manifest

    if not (folder / "gptneo_onnx.json").is_file():
        return False
    try:
        load_manifest(folder)
    except ExportFolderError:
        return False
    return True
