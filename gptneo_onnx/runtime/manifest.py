"""Read and check `gptneo_onnx.json`, the contract between the exporter and this runtime.

See docs/sidecar.md. The runtime reads nothing else from the folder: file names, IO names,
cache layout, special tokens, labels and decoding defaults all come from here.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gptneo_onnx.contract import (
    DEFAULT_IO,
    MANIFEST_FORMAT,
    MANIFEST_NAME,
    SUPPORTED_FORMAT_VERSIONS,
    VALIDATION_STATUSES,
)
from gptneo_onnx.contract import TASK_NAMES as TASKS
from gptneo_onnx.runtime.errors import ExportFolderError
from gptneo_onnx.runtime.export_files import check_graph_references, check_listed_file, listed_files
from gptneo_onnx.runtime.export_state import (
    check_validation,
    folder_kind,
    is_staging_folder,
    warn_if_unvalidated,
)
from gptneo_onnx.runtime.local_window import LocalWindow

# The fields this runtime needs, per object, with their JSON types (docs/sidecar.md).
TOP_FIELDS = {
    "format": str,
    "format_version": int,
    "task": str,
    "flavor": str,
    "precision": str,
    "graph": dict,
    "inputs": list,
    "outputs": list,
    "model": dict,
    "special_tokens": dict,
}
GRAPH_FIELDS = {"file": str, "sha256": str, "bytes": int, "external_data": list, "op_domains": list}
FILE_FIELDS = {"file": str, "sha256": str, "bytes": int}
IO_FIELDS = {"name": str, "dtype": str, "shape": list}
MODEL_FIELDS = {
    "vocab_size": int,
    "num_layers": int,
    "num_heads": int,
    "head_dim": int,
    "max_position_embeddings": int,
}
CACHE_FIELDS = {"mode": str, "layers": list}
LAYER_FIELDS = {"layer": int, "past_key": str, "past_value": str, "present_key": str, "present_value": str}
LOCAL_WINDOW_FIELDS = {"input": str, "window": int, "min_rows": int}


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
    def io(self) -> dict[str, str | None]:
        """Graph names by role (`input_ids`, `attention_mask`, `position_ids`, `logits`)."""
        return {**DEFAULT_IO, **(self.raw.get("io") or {})}

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

    @property
    def cache_modes(self) -> list[str]:
        """The KV-cache modes the graph offers (concat, shared-buffer); concat when unsaid."""
        return list((self.raw.get("cache") or {}).get("modes") or ["concat"])

    @property
    def ragged_rows(self) -> bool:
        """Whether rows of one shared-buffer batch may end at different columns (each at its
        mask's last real column, later columns zero): docs/sidecar.md, `cache.ragged_rows`."""
        return bool((self.raw.get("cache") or {}).get("ragged_rows"))

    @property
    def local_window(self) -> LocalWindow | None:
        """The windowed local cache (format 2), or None when the local layers cache every row."""
        return LocalWindow.from_cache(self.raw.get("cache") or {})


def load_manifest(
    export_dir: str | Path, task: str | None = None, verify_hashes: bool = True, warn_unvalidated: bool = True
) -> Manifest:
    """Read `gptneo_onnx.json` from `export_dir`, check its fields, files, hashes and graph.

    `task`, when given, must match the manifest's task. `verify_hashes=False` skips the sha256
    checks (faster start for multi-GB exports); every other check still runs: file names stay in
    the folder, sizes match, and the graph references only listed files and declared domains.
    The staging folder of an unfinished export, and an export whose validation failed or never
    finished, are refused; one made without validation loads with a warning (once per folder).
    """
    manifest = read_manifest(export_dir)
    folder = manifest.folder
    if task is not None and manifest.task != task:
        raise ExportFolderError(
            f"{folder} holds a {manifest.task!r} export, not a {task!r} one; use the command for "
            f"{manifest.task!r} exports (`gptneo-onnx info {folder}` says what it is), or export the "
            f"{task!r} task"
        )
    check_validation(folder, manifest.raw)
    check_files(manifest, verify_hashes)
    if warn_unvalidated:  # last: a folder refused for another reason says only that
        warn_if_unvalidated(folder, manifest.raw)
    return manifest


def check_files(manifest: Manifest, verify_hashes: bool = True) -> None:
    """The listed files are in the folder with their sizes (and sha256); the graph references only them."""
    for entry in listed_files(manifest.raw):
        check_listed_file(manifest.folder, entry, verify_hashes)
    check_graph_references(manifest.folder, manifest.raw)


def read_manifest(export_dir: str | Path) -> Manifest:
    """The sidecar of `export_dir`, its fields checked, without checking the files or the validation
    (`gptneo-onnx info` shows what an export is even when it would not load)."""
    folder = Path(export_dir)
    if not folder.is_dir():
        raise ExportFolderError(f"export folder {folder} does not exist or is not a folder")
    folder = folder.resolve()
    if is_staging_folder(folder):
        raise ExportFolderError(
            f"{folder} is the staging folder of an export that did not finish (it was killed, or is "
            "still running): it is not an export. Re-export, and use the folder given as --output"
        )
    manifest_path = folder / MANIFEST_NAME
    if manifest_path.is_symlink():
        raise ExportFolderError(f"{manifest_path} is a link; copy the real file into the export folder")
    if not manifest_path.is_file():
        raise ExportFolderError(f"{folder} has no {MANIFEST_NAME}: {_what_it_is(folder)}")
    try:
        raw = json.loads(manifest_path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ExportFolderError(f"{manifest_path} is not valid JSON ({error}); re-export") from error
    _check_fields(raw, manifest_path)
    return Manifest(folder=folder, raw=raw)


def _what_it_is(folder: Path) -> str:
    if folder_kind(folder) == "checkpoint":
        return (
            "it is a checkpoint, not an export: export it with "
            f"`gptneo-onnx export --model {folder} --output OUT`, then use OUT"
        )
    return "is it an export folder written by `gptneo-onnx export`? (an interrupted export leaves none)"


def _check_fields(raw: Any, manifest_path: Path) -> None:
    """Every field the runtime reads is present and of the right type; versions and ids make sense."""
    _require(raw, "", TOP_FIELDS, manifest_path)
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
    _require(graph, "graph", GRAPH_FIELDS, manifest_path)
    for index, entry in enumerate(graph["external_data"]):
        _require(entry, f"graph.external_data[{index}]", FILE_FIELDS, manifest_path)
    for index, domain in enumerate(graph["op_domains"]):
        _require({"domain": domain}, f"graph.op_domains[{index}]", {"domain": str}, manifest_path)
    for key in ("inputs", "outputs"):
        for index, item in enumerate(raw[key]):
            _require(item, f"{key}[{index}]", IO_FIELDS, manifest_path)
    _require(raw["model"], "model", MODEL_FIELDS, manifest_path)
    for name in MODEL_FIELDS:
        if raw["model"][name] < 1:
            raise ExportFolderError(f"{manifest_path}: model.{name} must be >= 1, got {raw['model'][name]}")
    if raw.get("tokenizer") is not None:
        _require(raw["tokenizer"], "tokenizer", FILE_FIELDS, manifest_path)
    if raw.get("validation") is not None:
        _require(raw["validation"], "validation", {}, manifest_path)
        status = raw["validation"].get("status")
        if status is None:
            _require(raw["validation"], "validation", {"passed": bool}, manifest_path)
        elif status not in VALIDATION_STATUSES:
            raise ExportFolderError(
                f"{manifest_path}: validation.status is {status!r}, expected one of "
                f"{', '.join(VALIDATION_STATUSES)}"
            )
    _check_special_tokens(raw["special_tokens"], raw["model"]["vocab_size"], manifest_path)
    if raw["task"] == "causal-lm":
        cache = raw.get("cache")
        if not isinstance(cache, dict) or cache.get("mode") != "concat" or not cache.get("layers"):
            raise ExportFolderError(
                f"{manifest_path}: a causal-lm export needs `cache` with mode 'concat' and its layers "
                f"(got {cache!r}); re-export with a current gptneo-onnx"
            )
        _require(cache, "cache", CACHE_FIELDS, manifest_path)
        for index, layer in enumerate(cache["layers"]):
            _require(layer, f"cache.layers[{index}]", LAYER_FIELDS, manifest_path)
        _check_local_window(raw, manifest_path)


def _check_local_window(raw: dict, manifest_path: Path) -> None:
    """`cache.local_window` (format 2): its mask is a graph input and its rows cover the window."""
    local = raw["cache"].get("local_window")
    if local is None:
        return
    _require(local, "cache.local_window", LOCAL_WINDOW_FIELDS, manifest_path)
    if local["input"] not in {item["name"] for item in raw["inputs"]}:
        raise ExportFolderError(
            f"{manifest_path}: cache.local_window.input {local['input']!r} is not a graph input"
        )
    if local["window"] < 1 or local["min_rows"] < local["window"] - 1:
        raise ExportFolderError(
            f"{manifest_path}: cache.local_window needs window >= 1 and min_rows >= window - 1, got {local}"
        )
    if not any(layer.get("window") for layer in raw["cache"]["layers"]):
        raise ExportFolderError(f"{manifest_path}: cache.local_window is set but no layer is local")


def _require(item: Any, where: str, fields: dict[str, type], manifest_path: Path) -> None:
    """`item` is an object holding each of `fields` with its type; errors name the dotted field."""
    prefix = f"{where}." if where else ""
    if not isinstance(item, dict):
        raise ExportFolderError(f"{manifest_path}: `{where or 'the manifest'}` must be a JSON object")
    for name, kind in fields.items():
        if name not in item:
            raise ExportFolderError(
                f"{manifest_path} lacks the required field `{prefix}{name}`; it was written by another "
                "tool or an older gptneo-onnx, or was edited. Re-export"
            )
        value = item[name]
        if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            raise ExportFolderError(
                f"{manifest_path}: `{prefix}{name}` must be a JSON {_JSON_NAMES[kind]}, got {value!r:.60}"
            )


_JSON_NAMES = {str: "string", int: "integer", bool: "boolean", list: "array", dict: "object"}


def _check_special_tokens(tokens: dict, vocab_size: int, manifest_path: Path) -> None:
    """bos, eos and pad ids must be token ids of the model (generation feeds them to the graph)."""
    eos = tokens.get("eos_token_id")
    ids = {"eos_token_id": eos if isinstance(eos, list) else [eos]}
    ids.update({name: [tokens.get(name)] for name in ("bos_token_id", "pad_token_id")})
    for name, values in ids.items():
        for value in values:
            if value is None:
                continue
            if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value < vocab_size:
                raise ExportFolderError(
                    f"{manifest_path}: special_tokens.{name} {value!r} is not a token id of the model "
                    f"(vocab_size {vocab_size})"
                )
