"""`gptneo-onnx info EXPORT`: what an export is, read from its sidecar (no session is started)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from gptneo_onnx.cli.parsing import add_command


def register(subparsers: argparse._SubParsersAction) -> None:
    info = add_command(
        subparsers,
        "info",
        "what an export is: task, flavor, precision, sizes, IO, windows, validation",
        "Describe EXPORT from its sidecar: task, flavor, precision and quantization, file sizes, "
        "inputs and outputs, the attention windows, the validation result, and whether this runtime "
        "loads it (and why not). Files are checked for size; --verify checks their sha256 too.",
        ["gptneo-onnx info exports/default", "gptneo-onnx info exports/int4 --json"],
    )
    info.add_argument("export_dir", type=Path, metavar="EXPORT", help="the export folder to describe")
    info.add_argument("--verify", action="store_true", help="also check the files' sha256")
    info.add_argument("--json", action="store_true", help="print one JSON object, for scripts")
    info.set_defaults(handler=run_info)


def describe(export_dir: Path, verify: bool = False) -> dict[str, Any]:
    """The facts `info` prints, as a dict."""
    from gptneo_onnx.runtime.errors import ExportFolderError
    from gptneo_onnx.runtime.export_files import listed_files
    from gptneo_onnx.runtime.export_state import validation_status
    from gptneo_onnx.runtime.manifest import load_manifest, read_manifest

    manifest = read_manifest(export_dir)
    raw = manifest.raw
    try:
        load_manifest(export_dir, verify_hashes=verify, warn_unvalidated=False)  # `validation` says it
        loads, reason = True, None
    except ExportFolderError as error:
        loads, reason = False, str(error)
    model = raw["model"]
    windows = [
        {"layer": layer.layer, "attention": layer.attention, "window": layer.window}
        for layer in manifest.cache_layers
    ]
    validation = raw.get("validation") or {}
    return {
        "folder": str(manifest.folder),
        "task": raw["task"],
        "flavor": raw["flavor"],
        "precision": raw["precision"],
        "quantization": raw.get("quantization"),
        "format_version": f"{raw['format_version']}.{raw.get('format_minor_version', 0)}",
        "model": {
            key: model.get(key)
            for key in (
                "vocab_size",
                "hidden_size",
                "num_layers",
                "num_heads",
                "head_dim",
                "max_position_embeddings",
                "window_size",
            )
        },  # fmt: skip
        "files": {entry["file"]: entry["bytes"] for entry in listed_files(raw)},
        "inputs": [
            {"name": item["name"], "dtype": item["dtype"], "shape": item["shape"]} for item in raw["inputs"]
        ],
        "outputs": [
            {"name": item["name"], "dtype": item["dtype"], "shape": item["shape"]} for item in raw["outputs"]
        ],
        "attention_layers": model.get("attention_layers") if not windows else None,
        "cache_layers": windows or None,
        "local_window_cache": (raw.get("cache") or {}).get("local_window"),
        "validation": {**validation, "status": validation_status(raw)},
        "quality": raw.get("quality"),
        "tokenizer": bool(raw.get("tokenizer")),
        "loads": loads,
        "refused_because": reason,
    }


def run_info(args: argparse.Namespace) -> int:
    facts = describe(args.export_dir, args.verify)
    if args.json:
        print(json.dumps(facts, indent=2))
        return 0
    quantization = (facts["quantization"] or {}).get("method")
    print(f"{facts['folder']}")
    print(f"  task        {facts['task']} ({facts['flavor']}, sidecar format {facts['format_version']})")
    print(f"  weights     {facts['precision']}" + (f", quantized {quantization}" if quantization else ""))
    model = facts["model"]
    print(
        f"  model       {model['num_layers']} layers, hidden {model['hidden_size']}, "
        f"{model['num_heads']} heads x {model['head_dim']}, vocab {model['vocab_size']}, "
        f"{model['max_position_embeddings']} positions"
    )
    layers = facts["cache_layers"] or []
    if layers:
        kinds = ", ".join(
            f"{item['layer']}:{item['attention']}" + (f"/{item['window']}" if item["window"] else "")
            for item in layers
        )
        print(f"  layers      {kinds}")
    if facts["local_window_cache"]:
        rows = facts["local_window_cache"]["min_rows"]
        print(f"  local cache windowed: local layers keep the newest {rows} rows")
    for name, size in facts["files"].items():
        print(f"  file        {name:<20} {size / 1e6:10.2f} MB")
    for kind in ("inputs", "outputs"):
        for item in facts[kind]:
            print(f"  {kind[:-1]:<11} {item['name']:<28} {item['dtype']:<8} {item['shape']}")
    validation = facts["validation"]
    checked = validation.get("checked")
    line = f"  validation  {validation['status']}"
    if validation.get("max_abs_diff") is not None:
        line += f" (max |diff| {validation['max_abs_diff']:.2e}, top-1 {validation['top1_agreement']:.2%}"
        line += ", quantized: checked that it runs, not held to parity)" if checked == "runs" else ")"
    print(line)
    if facts["quality"]:
        quality = facts["quality"]
        print(
            f"  quality     perplexity {quality['perplexity']:.3f} "
            f"(fp32 {quality['reference_perplexity']:.3f}), top-1 agreement {quality['top1_agreement']:.2%}"
        )
    print("  loads       yes" if facts["loads"] else f"  loads       no: {facts['refused_because']}")
    return 0
