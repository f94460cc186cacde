"""Read and check `gptneo_onnx.json`, the contract between the exporter and this runtime.

See docs/sidecar.md. The runtime reads nothing else from the folder: file names, IO names,
cache layout, special tokens, labels and decoding defaults all come from here.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

from gptneo_onnx.runtime.errors import ExportFolderError

MANIFEST_NAME = "gptneo_onnx.json"
MANIFEST_FORMAT = "gptneo-onnx"
SUPPORTED_FORMAT_VERSIONS = (1,)
TASKS = ("causal-lm", "base", "sequence-classification", "token-classification", "question-answering")
REQUIRED_FIELDS = (
    "format",
    "format_version",
    "task",
    "graph",
    "inputs",
    "outputs",
    "model",
    "special_tokens",
)
REQUIRED_MODEL_FIELDS = ("vocab_size", "num_layers", "num_heads", "head_dim", "max_position_embeddings")
_HASH_CHUNK = 1 << 20


@dataclass(frozen=True)
class CacheLayer:
    """The IO names of one layer's KV cache."""

    layer: int
    attention: str
    window: int | None
    past_key: str
    past_value: str
    present_key: str
    present_value: str


@dataclass(frozen=True)
class Manifest:
    """A checked manifest; `raw` keeps every field as read, `folder` is the resolved export folder."""

    folder: Path
    raw: dict[str, Any] = field(repr=False)

    @property
    def task(self) -> str:
        return self.raw["task"]

    @property
    def graph_path(self) -> Path:
        return self.folder / self.raw["graph"]["file"]

    @property
    def tokenizer_path(self) -> Path | None:
        tokenizer = self.raw.get("tokenizer")
        return self.folder / tokenizer["file"] if tokenizer else None

    @property
    def model(self) -> dict[str, Any]:
        return self.raw["model"]

    @property
    def vocab_size(self) -> int:
        return int(self.model["vocab_size"])

    @property
    def max_position_embeddings(self) -> int:
        return int(self.model["max_position_embeddings"])

    @property
    def eos_token_ids(self) -> list[int]:
        eos = self.raw["special_tokens"].get("eos_token_id")
        if eos is None:
            return []
        return [int(eos)] if isinstance(eos, int) else [int(token) for token in eos]

    @property
    def pad_token_id(self) -> int | None:
        pad = self.raw["special_tokens"].get("pad_token_id")
        return None if pad is None else int(pad)

    @property
    def bos_token_id(self) -> int | None:
        bos = self.raw["special_tokens"].get("bos_token_id")
        return None if bos is None else int(bos)

    @property
    def id2label(self) -> dict[int, str]:
        labels = self.raw.get("labels") or {}
        return {int(index): str(label) for index, label in (labels.get("id2label") or {}).items()}

    @property
    def generation(self) -> dict[str, Any]:
        return dict(self.raw.get("generation") or {})

    @property
    def input_names(self) -> list[str]:
        return [item["name"] for item in self.raw["inputs"]]

    @property
    def output_names(self) -> list[str]:
        return [item["name"] for item in self.raw["outputs"]]

    @property
    def cache_layers(self) -> list[CacheLayer]:
        cache = self.raw.get("cache") or {}
        return [
            CacheLayer(
                layer=int(item["layer"]),
                attention=str(item.get("attention", "global")),
                window=item.get("window"),
                past_key=item["past_key"],
                past_value=item["past_value"],
                present_key=item["present_key"],
                present_value=item["present_value"],
            )
            for item in cache.get("layers", [])
        ]

    @property
    def cache_dtype(self) -> str:
        return (self.raw.get("cache") or {}).get("dtype", "float32")


def load_manifest(export_dir: str | Path, task: str | None = None, verify_hashes: bool = True) -> Manifest:
    """Read `gptneo_onnx.json` from `export_dir`, check its fields, files and hashes.

    `task`, when given, must match the manifest's task. `verify_hashes=False` skips the sha256
    checks (faster start for multi-GB exports) but still checks that every file is in place.
    """
    folder = Path(export_dir)
    if not folder.is_dir():
        raise ExportFolderError(f"export folder {folder} does not exist or is not a folder")
    folder = folder.resolve()
    manifest_path = folder / MANIFEST_NAME
    if not manifest_path.is_file():
        raise ExportFolderError(
            f"{folder} has no {MANIFEST_NAME}; is it an export folder written by `gptneo-onnx export`?"
        )
    try:
        raw = json.loads(manifest_path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ExportFolderError(f"{manifest_path} is not valid JSON: {error}") from error
    _check_fields(raw, manifest_path)
    manifest = Manifest(folder=folder, raw=raw)
    if task is not None and manifest.task != task:
        raise ExportFolderError(
            f"{folder} holds a {manifest.task!r} export but a {task!r} model was asked for; "
            f"load it with Model.load() or export the {task!r} task"
        )
    for relative, expected_sha256 in _listed_files(raw):
        path = _inside_folder(folder, relative)
        if verify_hashes:
            _check_sha256(path, expected_sha256)
    return manifest


def _check_fields(raw: Any, manifest_path: Path) -> None:
    if not isinstance(raw, dict):
        raise ExportFolderError(f"{manifest_path} must hold a JSON object")
    missing = [name for name in REQUIRED_FIELDS if name not in raw]
    if missing:
        raise ExportFolderError(f"{manifest_path} lacks required fields: {', '.join(missing)}")
    if raw["format"] != MANIFEST_FORMAT:
        raise ExportFolderError(f"{manifest_path} has format {raw['format']!r}, expected {MANIFEST_FORMAT!r}")
    version = raw["format_version"]
    if version not in SUPPORTED_FORMAT_VERSIONS:
        raise ExportFolderError(
            f"{manifest_path} has format_version {version!r}; this runtime reads versions "
            f"{', '.join(map(str, SUPPORTED_FORMAT_VERSIONS))}. Upgrade gptneo-onnx or re-export"
        )
    if raw["task"] not in TASKS:
        raise ExportFolderError(f"unknown task {raw['task']!r}; expected one of {', '.join(TASKS)}")
    graph = raw["graph"]
    if not isinstance(graph, dict) or "file" not in graph or "sha256" not in graph:
        raise ExportFolderError(f"{manifest_path}: `graph` must have `file` and `sha256`")
    missing_model = [name for name in REQUIRED_MODEL_FIELDS if name not in raw["model"]]
    if missing_model:
        raise ExportFolderError(f"{manifest_path}: `model` lacks {', '.join(missing_model)}")
    if raw["task"] == "causal-lm":
        cache = raw.get("cache")
        if not cache or cache.get("mode") != "concat" or not cache.get("layers"):
            raise ExportFolderError(
                f"{manifest_path}: a causal-lm export needs `cache` with mode 'concat' and its layers "
                f"(got {cache!r}); re-export with a current gptneo-onnx"
            )


def _listed_files(raw: dict[str, Any]) -> list[tuple[str, str]]:
    """Every (relative file, sha256) the manifest lists: graph, external data, tokenizer."""
    graph = raw["graph"]
    files = [(graph["file"], graph["sha256"])]
    for item in graph.get("external_data") or []:
        files.append((item["file"], item["sha256"]))
    tokenizer = raw.get("tokenizer")
    if tokenizer:
        files.append((tokenizer["file"], tokenizer["sha256"]))
    return files


def _inside_folder(folder: Path, relative: str) -> Path:
    """The path of a listed file, refusing absolute paths, `..`, links, and anything but a file."""
    if not isinstance(relative, str) or not relative:
        raise ExportFolderError(f"manifest lists an invalid file name {relative!r}")
    pure = PurePosixPath(relative.replace("\\", "/"))
    if pure.is_absolute() or ".." in pure.parts or Path(relative).is_absolute() or ":" in relative:
        raise ExportFolderError(
            f"manifest lists {relative!r}, which points outside the export folder; "
            "files must be plain names relative to the folder"
        )
    path = folder / pure
    if not path.exists() and not path.is_symlink():
        raise ExportFolderError(
            f"{folder} is missing {relative}, which the manifest lists; re-copy the export"
        )
    if path.is_symlink() or not _is_within(path, folder):
        raise ExportFolderError(
            f"{relative} in {folder} is a link; copy the real file into the export folder"
        )
    if not path.is_file():
        raise ExportFolderError(f"{relative} in {folder} is not a regular file")
    return path


def _is_within(path: Path, folder: Path) -> bool:
    try:
        path.resolve().relative_to(folder)
    except ValueError:
        return False
    return True


def _check_sha256(path: Path, expected: str) -> None:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(_HASH_CHUNK):
            digest.update(chunk)
    if digest.hexdigest() != str(expected).lower():
        raise ExportFolderError(
            f"{path.name} does not match the sha256 recorded in {MANIFEST_NAME} "
            f"(expected {expected}, got {digest.hexdigest()}); the file was changed or corrupted, re-export"
        )
