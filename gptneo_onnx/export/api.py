"""`export()`: reference model in, validated ONNX folder with its sidecar out."""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
import torch
from tqdm.auto import tqdm

from gptneo_onnx.errors import CheckpointError
from gptneo_onnx.export.graphs import PRECISIONS, build_graph
from gptneo_onnx.export.optimized import optimization_summary
from gptneo_onnx.export.output_folder import OWNER_FILE, staged_output, write_json
from gptneo_onnx.export.quantize import quality_report, quantize_graph
from gptneo_onnx.export.sidecar import build_manifest, validation_entry, write_manifest
from gptneo_onnx.export.validate import ParityError, Tolerance, validate_export

GRAPH_FILE = "model.onnx"
QUALITY_REPORT = "quality_report.json"
EXTERNAL_DATA_FILE = "model.onnx.data"
# Protobuf cannot hold more than 2 GiB; stay clear of it, since the graph itself adds bytes.
EXTERNAL_DATA_THRESHOLD = 1_800_000_000


@dataclass
class ExportResult:
    output_dir: Path
    manifest: dict
    report: dict | None
    files: dict[str, int] = field(default_factory=dict)  # file name -> bytes

    def summary(self) -> str:
        quantization = (self.manifest.get("quantization") or {}).get("method")
        weights = (
            f"{quantization}, from {self.manifest['precision']}"
            if quantization
            else self.manifest["precision"]
        )
        lines = [f"exported {self.manifest['task']} ({weights}) to {self.output_dir}"]
        lines += [f"  {name:<24} {size / 1e6:10.2f} MB" for name, size in sorted(self.files.items())]
        if not self.report:
            lines.append("  validation: skipped (--no-validate); run `gptneo-onnx verify` on it")
        elif quantization:
            verdict = "passed" if self.report["passed"] else "FAILED"
            lines.append(
                f"  validation {verdict}: the graph runs, with the reference's shapes and finite outputs; "
                "quantized outputs are not held to parity "
                f"(top-1 agreement {self.report['top1_agreement']:.2%}; --quality measures them)"
            )
        else:
            verdict = "passed" if self.report["passed"] else "FAILED"
            lines.append(
                f"  parity {verdict}: max |diff| {self.report['max_abs_diff']:.2e}, "
                f"top-1 agreement {self.report['top1_agreement']:.2%}"
            )
        return "\n".join(lines)


def export(
    model: torch.nn.Module,
    output_dir: str | Path,
    task: str | None = None,
    *,
    precision: str = "float32",
    validate: bool = True,
    tokenizer_file: str | Path | None = None,
    generation_config: dict | None = None,
    external_data: bool | None = None,
    progress: bool = True,
    optimize: bool = False,
    quantize: str | None = None,
    block_size: int = 32,
    accuracy_level: int = 4,
    quality_windows=None,
    overwrite: bool = False,
    windowed_local_cache: bool | None = None,
) -> ExportResult:
    """Export a reference model (see `gptneo_onnx.reference`) to an ONNX folder with a sidecar.

    external_data: None decides by size (over ~1.8 GB of weights), True forces it.
    optimize: the `optimized` flavor (ONNX Runtime fused ops, see export/optimized.py).
    quantize: None, "int8" (dynamic) or "int4" (MatMulNBits, `block_size`, `accuracy_level`).
    quality_windows: token windows (N, L) for quality_report.json (quantized causal-lm exports).
    overwrite: replace an existing export in `output_dir`; without it a non-empty folder is refused.
    windowed_local_cache: local layers take their own mask input, so runners may keep only their
    newest rows (sidecar format 2, docs/sidecar.md). None: on for `optimize`; off for the portable
    flavor, whose IO then stays exactly Optimum's (ORTModelForCausalLM loads it).

    The folder is written beside `output_dir` and renamed into place when complete (see
    export/output_folder.py): a crash leaves `output_dir` as it was. An export that fails its
    parity validation is still put in place, for inspection, with `validation.passed` false in
    its sidecar (the runtime refuses to load it), and ParityError is raised.
    """
    task = task or model.task
    if task != model.task:
        raise ValueError(f"the model is a {model.task} model; load it with task={task!r} to export {task}")
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    if quantize is not None and precision != "float32":
        raise ValueError(f"quantize needs precision='float32' weights to start from, got {precision!r}")
    output_dir = Path(output_dir)
    steps = tqdm(total=4 if validate else 3, desc="export", unit="step", disable=not progress)
    try:  # the bar ends its line even on errors and Ctrl-C, so the error message starts a new one
        with staged_output(output_dir, overwrite) as folder:
            manifest = _write_files(
                model,
                folder,
                task,
                steps,
                precision=precision,
                tokenizer_file=tokenizer_file,
                generation_config=generation_config,
                external_data=external_data,
                optimize=optimize,
                quantize=quantize,
                block_size=block_size,
                accuracy_level=accuracy_level,
                windowed_local_cache=optimize if windowed_local_cache is None else windowed_local_cache,
            )
            report, parity_error = None, None
            if validate:
                steps.set_postfix_str("validating against the reference")
                tolerance = Tolerance.for_precision(precision, quantize)
                try:
                    report = validate_export(model, folder, manifest, tolerance)
                except ParityError as error:
                    report, parity_error = json.loads((folder / "parity_report.json").read_text()), error
                status = "passed" if report["passed"] else "failed"
                manifest["validation"] = validation_entry(report, status, quantized=quantize is not None)
                write_manifest(folder, manifest)
                steps.update()
            else:
                manifest["validation"] = validation_entry(None, "skipped")
                write_manifest(folder, manifest)
            if quality_windows is not None and task == "causal-lm" and parity_error is None:
                steps.set_postfix_str("quality report")
                quality = quality_report(folder, quality_windows, model)
                write_json(folder, QUALITY_REPORT, quality)
                manifest["quality"] = {
                    "report": QUALITY_REPORT,
                    **{key: quality[key] for key in ("perplexity", "reference_perplexity", "top1_agreement")},
                }
                write_manifest(folder, manifest)
            files = {
                path.name: path.stat().st_size
                for path in folder.iterdir()
                if path.is_file() and path.name != OWNER_FILE
            }
    finally:
        steps.close()
    if parity_error is not None:
        raise parity_error.moved_to(output_dir)
    return ExportResult(output_dir, manifest, report, files)


def _write_files(
    model: torch.nn.Module,
    folder: Path,
    task: str,
    steps: tqdm,
    *,
    precision: str,
    tokenizer_file: str | Path | None,
    generation_config: dict | None,
    external_data: bool | None,
    optimize: bool,
    quantize: str | None,
    block_size: int,
    accuracy_level: int,
    windowed_local_cache: bool,
) -> dict:
    """Build the graph and write every file into the (new, empty) `folder`; returns the manifest."""
    flavor = "optimized" if optimize else "portable"
    steps.set_postfix_str("building graph")
    itemsize = np.dtype(PRECISIONS[precision]).itemsize
    weight_bytes = sum(p.numel() for p in model.parameters()) * itemsize
    use_external = weight_bytes > EXTERNAL_DATA_THRESHOLD if external_data is None else external_data
    # Quantization rewrites the lm_head itself (untied, MatMulNBits): no slices for it.
    graph, inputs, outputs = build_graph(
        model, task, precision, flavor, use_external and quantize is None, windowed_local_cache
    )
    steps.update()

    steps.set_postfix_str("writing files")
    data_path = folder / EXTERNAL_DATA_FILE
    onnx.save_model(graph.to_model(data_path if use_external else None), folder / GRAPH_FILE)
    del graph
    quantization = None
    if quantize is not None:
        steps.set_postfix_str(f"quantizing ({quantize})")
        quantization = quantize_graph(
            folder / GRAPH_FILE,
            quantize,
            block_size=block_size,
            accuracy_level=accuracy_level,
            external_data_file=EXTERNAL_DATA_FILE if use_external else None,
        )
    tokenizer_name = _copy_tokenizer(tokenizer_file, folder, model.config.vocab_size)
    _write_hf_files(model, folder, generation_config)
    steps.update()

    manifest = build_manifest(
        folder,
        model.config,
        task,
        inputs,
        outputs,
        graph_file=GRAPH_FILE,
        external_data=[EXTERNAL_DATA_FILE] if use_external else [],
        precision=precision,
        flavor=flavor,
        quantization=quantization,
        tokenizer_file=tokenizer_name,
        generation_config=generation_config,
    )
    if optimize:
        manifest["optimization"] = optimization_summary(model.config, task)
        if manifest["cache"] is not None:
            manifest["cache"]["modes"] = manifest["optimization"]["cache_modes"]
    write_manifest(folder, manifest)
    steps.update()
    return manifest


def _copy_tokenizer(tokenizer_file: str | Path | None, folder: Path, vocab_size: int) -> str | None:
    """Copy the tokenizer in as tokenizer.json, once it is known to fit the model's vocabulary."""
    if tokenizer_file is None:
        return None
    source = Path(tokenizer_file)
    if not source.is_file():
        raise FileNotFoundError(f"tokenizer file {source} does not exist")
    from tokenizers import Tokenizer

    try:
        largest = max(Tokenizer.from_file(str(source)).get_vocab(with_added_tokens=True).values(), default=-1)
    except Exception as error:  # tokenizers raises a bare Exception on malformed files
        raise CheckpointError(f"{source} is not a valid tokenizers JSON file: {error}") from error
    if largest >= vocab_size:
        raise CheckpointError(
            f"{source} has token id {largest}, but the model's vocab_size is {vocab_size}; "
            "the tokenizer does not belong to this checkpoint"
        )
    shutil.copyfile(source, folder / "tokenizer.json")
    return "tokenizer.json"


def _write_hf_files(model: torch.nn.Module, output_dir: Path, generation_config: dict | None) -> None:
    """config.json (and generation_config.json) so Optimum's ORTModel classes load the folder too."""
    config = model.config.to_dict()
    architecture = {
        "causal-lm": "GPTNeoForCausalLM",
        "base": "GPTNeoModel",
        "sequence-classification": "GPTNeoForSequenceClassification",
        "token-classification": "GPTNeoForTokenClassification",
        "question-answering": "GPTNeoForQuestionAnswering",
    }[model.task]
    config["architectures"] = [architecture]
    write_json(output_dir, "config.json", config)
    if generation_config:
        write_json(output_dir, "generation_config.json", generation_config)
