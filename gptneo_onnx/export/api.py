"""`export()`: reference model in, validated ONNX folder with its sidecar out."""

from __future__ import annotations

import shutil
from dataclasses import dataclass, field
from pathlib import Path

import onnx
import torch
from tqdm.auto import tqdm

from gptneo_onnx.contract import (
    DEFAULT_ACCURACY_LEVEL,
    DEFAULT_BLOCK_SIZE,
    OWNER_FILE,
    TASKS,
    TOKENIZER_CONFIG_NAME,
)
from gptneo_onnx.errors import CheckpointError, ParityError
from gptneo_onnx.export.graphs import build_graph
from gptneo_onnx.export.layout import transformers_js_dtype
from gptneo_onnx.export.output_folder import staged_output, write_json
from gptneo_onnx.export.plan import ExportPlan, plan_export
from gptneo_onnx.export.quality import quality_report
from gptneo_onnx.export.quantize import quantize_graph
from gptneo_onnx.export.sidecar import build_manifest, record_quality, tokenizer_config, write_manifest
from gptneo_onnx.export.validate import validate_and_record


@dataclass
class ExportResult:
    output_dir: Path
    manifest: dict
    report: dict | None
    files: dict[str, int] = field(default_factory=dict)  # file name -> bytes
    plan: ExportPlan | None = None  # the resolved options the export was made with

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
    block_size: int = DEFAULT_BLOCK_SIZE,
    accuracy_level: int = DEFAULT_ACCURACY_LEVEL,
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

    The options are resolved once into an ExportPlan (export/plan.py), which refuses combinations
    that can't be exported before anything is built or written. The folder is written beside
    `output_dir` and renamed into place when complete (see export/output_folder.py): a crash leaves
    `output_dir` as it was. An export that fails its parity validation is still put in place, for
    inspection, with `validation.passed` false in its sidecar (the runtime refuses to load it), and
    ParityError is raised.
    """
    task = task or model.task
    if task != model.task:
        raise ValueError(f"the model is a {model.task} model; load it with task={task!r} to export {task}")
    plan = plan_export(
        model.config,
        task,
        sum(p.numel() for p in model.parameters()),
        precision=precision,
        optimize=optimize,
        external_data=external_data,
        quantize=quantize,
        block_size=block_size,
        accuracy_level=accuracy_level,
        windowed_local_cache=windowed_local_cache,
        validate=validate,
    )
    output_dir = Path(output_dir)
    steps = tqdm(total=4 if plan.validate else 3, desc="export", unit="step", disable=not progress)
    try:  # the bar ends its line even on errors and Ctrl-C, so the error message starts a new one
        with staged_output(output_dir, overwrite) as folder:
            manifest = _write_files(model, folder, plan, steps, tokenizer_file, generation_config)
            report, parity_error = None, None
            if plan.validate:
                steps.set_postfix_str("validating against the reference")
                try:
                    report = validate_and_record(model, folder, manifest)
                except ParityError as error:
                    report, parity_error = error.parity_report, error
                steps.update()
            if quality_windows is not None and plan.cached and parity_error is None:
                steps.set_postfix_str("quality report")
                from gptneo_onnx.runtime.manifest import Manifest  # onnxruntime, as the report needs

                quality = quality_report(Manifest(folder, manifest), quality_windows, model)
                record_quality(folder, manifest, quality)
            files = {
                path.relative_to(folder).as_posix(): path.stat().st_size
                for path in folder.rglob("*")
                if path.is_file() and path.name != OWNER_FILE
            }
    finally:
        steps.close()
    if parity_error is not None:
        raise parity_error.moved_to(output_dir)
    return ExportResult(output_dir, manifest, report, files, plan)


def _write_files(
    model: torch.nn.Module,
    folder: Path,
    plan: ExportPlan,
    steps: tqdm,
    tokenizer_file: str | Path | None,
    generation_config: dict | None,
) -> dict:
    """Build the planned graph and write every file into the (new, empty) `folder`, the sidecar
    last (validation pending); returns the manifest."""
    steps.set_postfix_str("building graph")
    graph, inputs, outputs = build_graph(model, plan)
    steps.update()

    steps.set_postfix_str("writing files")
    (folder / plan.graph_file).parent.mkdir()
    data_path = folder / plan.external_data_file if plan.external_data else None
    onnx.save_model(graph.to_model(data_path), folder / plan.graph_file)
    del graph
    quantization = None
    if plan.quantization is not None:
        steps.set_postfix_str(f"quantizing ({plan.quantize})")
        quantization = quantize_graph(
            folder / plan.graph_file, plan.quantization, data_path.name if data_path else None
        )
    tokenizer_name = _copy_tokenizer(tokenizer_file, folder, model.config.vocab_size)
    _write_hf_files(model, folder, generation_config, transformers_js_dtype(plan.precision, plan.quantize))
    if tokenizer_name:
        settings = tokenizer_config(model.config, folder / tokenizer_name, Path(tokenizer_file).parent)
        write_json(folder, TOKENIZER_CONFIG_NAME, settings)
    steps.update()

    manifest = build_manifest(
        folder,
        model.config,
        plan,
        inputs,
        outputs,
        quantization=quantization,
        tokenizer_file=tokenizer_name,
        generation_config=generation_config,
    )
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


def _write_hf_files(
    model: torch.nn.Module, output_dir: Path, generation_config: dict | None, js_dtype: str
) -> None:
    """config.json (and generation_config.json) so Optimum's ORTModel classes and transformers.js
    load the folder too; `transformers.js_config.dtype` names the graph file's dtype (export/layout.py)."""
    config = model.config.to_dict()
    config["transformers.js_config"] = {"dtype": js_dtype}
    config["architectures"] = [TASKS[model.task].hf_class]
    write_json(output_dir, "config.json", config)
    if generation_config:
        write_json(output_dir, "generation_config.json", generation_config)
