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

from gptneo_onnx.export.graphs import PRECISIONS, build_graph
from gptneo_onnx.export.optimized import optimization_summary
from gptneo_onnx.export.quantize import quality_report, quantize_graph
from gptneo_onnx.export.sidecar import build_manifest, write_manifest
from gptneo_onnx.export.validate import Tolerance, validate_export

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
        lines = [f"exported {self.manifest['task']} ({self.manifest['precision']}) to {self.output_dir}"]
        lines += [f"  {name:<24} {size / 1e6:10.2f} MB" for name, size in sorted(self.files.items())]
        if self.report:
            verdict = "passed" if self.report["passed"] else "FAILED"
            lines.append(
                f"  parity {verdict}: max |diff| {self.report['max_abs_diff']:.2e}, "
                f"top-1 agreement {self.report['top1_agreement']:.2%}"
            )
        else:
            lines.append("  parity: not validated")
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
) -> ExportResult:
    """Export a reference model (see `gptneo_onnx.reference`) to an ONNX folder with a sidecar.

    external_data: None decides by size (over ~1.8 GB of weights), True forces it.
    optimize: the `optimized` flavor (ONNX Runtime fused ops, see export/optimized.py).
    quantize: None, "int8" (dynamic) or "int4" (MatMulNBits, `block_size`, `accuracy_level`).
    quality_windows: token windows (N, L) for quality_report.json (quantized causal-lm exports).
    """
    task = task or model.task
    if task != model.task:
        raise ValueError(f"the model is a {model.task} model; load it with task={task!r} to export {task}")
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    steps = tqdm(total=4 if validate else 3, desc="export", unit="step", disable=not progress)

    if quantize is not None and precision != "float32":
        raise ValueError(f"quantize needs precision='float32' weights to start from, got {precision!r}")
    flavor = "optimized" if optimize else "portable"
    steps.set_postfix_str("building graph")
    itemsize = np.dtype(PRECISIONS[precision]).itemsize
    weight_bytes = sum(p.numel() for p in model.parameters()) * itemsize
    use_external = weight_bytes > EXTERNAL_DATA_THRESHOLD if external_data is None else external_data
    # Quantization rewrites the lm_head itself (untied, MatMulNBits): no slices for it.
    graph, inputs, outputs = build_graph(model, task, precision, flavor, use_external and quantize is None)
    steps.update()

    steps.set_postfix_str("writing files")
    data_path = output_dir / EXTERNAL_DATA_FILE
    data_path.unlink(missing_ok=True)
    onnx.save_model(graph.to_model(data_path if use_external else None), output_dir / GRAPH_FILE)
    del graph
    quantization = None
    if quantize is not None:
        steps.set_postfix_str(f"quantizing ({quantize})")
        quantization = quantize_graph(
            output_dir / GRAPH_FILE,
            quantize,
            block_size=block_size,
            accuracy_level=accuracy_level,
            external_data_file=EXTERNAL_DATA_FILE if use_external else None,
        )
    tokenizer_name = _copy_tokenizer(tokenizer_file, output_dir)
    _write_hf_files(model, output_dir, generation_config)
    steps.update()

    manifest = build_manifest(
        output_dir,
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
    write_manifest(output_dir, manifest)
    steps.update()

    report = None
    if validate:
        steps.set_postfix_str("validating against the reference")
        tolerance = Tolerance.for_precision(precision, quantize)
        report = validate_export(model, output_dir, manifest, tolerance)
        manifest["validation"] = {
            "report": "parity_report.json",
            "passed": report["passed"],
            "max_abs_diff": report["max_abs_diff"],
            "top1_agreement": report["top1_agreement"],
        }
        write_manifest(output_dir, manifest)
        steps.update()
    if quality_windows is not None and task == "causal-lm":
        steps.set_postfix_str("quality report")
        quality = quality_report(output_dir, quality_windows, model)
        (output_dir / QUALITY_REPORT).write_text(json.dumps(quality, indent=2) + "\n")
        manifest["quality"] = {
            "report": QUALITY_REPORT,
            **{key: quality[key] for key in ("perplexity", "reference_perplexity", "top1_agreement")},
        }
        write_manifest(output_dir, manifest)
    steps.close()
    files = {path.name: path.stat().st_size for path in output_dir.iterdir() if path.is_file()}
    return ExportResult(output_dir, manifest, report, files)


def _copy_tokenizer(tokenizer_file: str | Path | None, output_dir: Path) -> str | None:
    if tokenizer_file is None:
        return None
    source = Path(tokenizer_file)
    if not source.is_file():
        raise FileNotFoundError(f"tokenizer file {source} does not exist")
    target = output_dir / "tokenizer.json"
    if source.resolve() != target.resolve():
        shutil.copyfile(source, target)
    return target.name


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
    (output_dir / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    if generation_config:
        (output_dir / "generation_config.json").write_text(json.dumps(generation_config, indent=2) + "\n")
