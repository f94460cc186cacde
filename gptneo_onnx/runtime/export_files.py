"""The files of an export folder: names that stay inside it, sizes, sha256, and what the graph
may reference (external-data files, operator domains), all checked before onnxruntime opens it.

The sidecar lists every file with its size and sha256, and declares the graph's operator
domains. The graph itself is scanned (runtime/graph_scan.py): each external-data location must
be one of the listed files, and each domain one the sidecar declares and this runtime runs.
The path rules hold even when the sha256 checks are skipped, and even for a rewritten sidecar.
"""

from __future__ import annotations

from pathlib import Path, PurePosixPath

from gptneo_onnx.contract import DEFAULT_DOMAIN, MANIFEST_NAME, RUNTIME_DOMAINS, sha256_of
from gptneo_onnx.runtime.errors import ExportFolderError
from gptneo_onnx.runtime.graph_scan import MalformedGraph, scan_graph

# Operators that read files named inside the graph (EPContext: a compiled engine), never allowed.
FILE_READING_OPERATORS = (("com.microsoft", "EPContext"),)
_HASH_CHUNK = 1 << 20


def listed_files(raw: dict) -> list[dict]:
    """Every file entry (`file`, `sha256`, `bytes`) the sidecar lists: graph, external data, tokenizer."""
    graph = raw["graph"]
    files = [graph, *graph["external_data"]]
    if raw.get("tokenizer"):
        files.append(raw["tokenizer"])
    return files


def check_listed_file(folder: Path, entry: dict, verify_hash: bool) -> Path:
    """A listed file must be a regular file inside the folder, of the listed size (and sha256)."""
    path = inside_folder(folder, entry["file"], "the manifest")
    size = path.stat().st_size
    if size != entry["bytes"]:
        raise ExportFolderError(
            f"{entry['file']} in {folder} has {size} bytes, the manifest records {entry['bytes']}; "
            "the export is incomplete or was changed (an interrupted export or copy?). "
            "Re-export or re-copy it"
        )
    if verify_hash:
        check_sha256(path, entry["sha256"])
    return path


def inside_folder(folder: Path, relative: object, named_by: str) -> Path:
    """The path of `relative` in `folder`, refusing absolute paths, `..`, links, and non-files."""
    if not isinstance(relative, str) or not relative or "\0" in relative:
        raise ExportFolderError(f"{named_by} names an invalid file {relative!r}")
    pure = PurePosixPath(relative.replace("\\", "/"))
    if pure.is_absolute() or ".." in pure.parts or Path(relative).is_absolute() or ":" in relative:
        raise ExportFolderError(
            f"{named_by} names {relative!r}, which points outside the export folder; "
            "files must be plain names relative to the folder"
        )
    path = folder / pure
    if not path.exists() and not path.is_symlink():
        raise ExportFolderError(f"{folder} is missing {relative}, which {named_by} names; re-copy the export")
    if path.is_symlink() or not _is_within(path, folder):
        raise ExportFolderError(
            f"{relative} in {folder} is a link; copy the real file into the export folder"
        )
    if not path.is_file():
        raise ExportFolderError(f"{relative} in {folder} is not a regular file")
    return path


def check_graph_references(folder: Path, raw: dict) -> None:
    """Scan the graph: its external-data locations and operator domains must be the sidecar's."""
    graph_path = folder / raw["graph"]["file"]
    try:
        facts = scan_graph(graph_path)
    except MalformedGraph as error:
        raise ExportFolderError(f"{graph_path.name} is not a valid ONNX file ({error}); re-export") from error
    listed = {entry["file"] for entry in raw["graph"]["external_data"]}
    graph_folder = PurePosixPath(raw["graph"]["file"]).parent  # ONNX resolves locations from there
    for location in sorted(facts.external_locations):
        inside_folder(folder / graph_folder, location, f"{graph_path.name}'s external data")
        if (graph_folder / location).as_posix() not in listed:
            raise ExportFolderError(
                f"{graph_path.name} reads external data from {location!r}, which the manifest does not "
                "list under graph.external_data; the graph or manifest was changed. Re-export"
            )
    declared = set(raw["graph"]["op_domains"])
    unknown = sorted(declared - set(RUNTIME_DOMAINS))
    if unknown:
        raise ExportFolderError(
            f"the manifest declares operator domain(s) {', '.join(unknown)}; this runtime runs only "
            f"{', '.join(RUNTIME_DOMAINS)}"
        )
    undeclared = sorted({domain or DEFAULT_DOMAIN for domain in facts.domains} - declared)
    if undeclared:
        raise ExportFolderError(
            f"{graph_path.name} uses operator domain(s) {', '.join(undeclared)}, which the manifest does "
            f"not declare (graph.op_domains: {', '.join(sorted(declared))}); the graph was changed. Re-export"
        )
    for domain, op_type in FILE_READING_OPERATORS:
        if (domain, op_type) in facts.operators:
            raise ExportFolderError(
                f"{graph_path.name} has a {domain}.{op_type} node, which loads a file named inside the "
                "graph; exports never contain one, so it is refused"
            )


def check_sha256(path: Path, expected: str) -> None:
    actual = sha256_of(path)
    if actual != str(expected).lower():
        raise ExportFolderError(
            f"{path.name} does not match the sha256 recorded in {MANIFEST_NAME} "
            f"(expected {expected}, got {actual}); the file was changed or corrupted, re-export"
        )


def _is_within(path: Path, folder: Path) -> bool:
    try:
        path.resolve().relative_to(folder)
    except ValueError:
        return False
    return True
