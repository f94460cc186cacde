"""`gptneo-onnx export` and `gptneo-onnx verify`. torch is imported only when they run."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from gptneo_onnx.cli.parsing import UsageError, add_command, bounded_int
from gptneo_onnx.contract import (
    ACCURACY_LEVEL_RULE,
    ACCURACY_LEVELS,
    BLOCK_SIZE_RULE,
    DEFAULT_ACCURACY_LEVEL,
    DEFAULT_BLOCK_SIZE,
    QUANTIZATION_METHODS,
    TASK_NAMES,
    is_block_size,
)

TASK_CHOICES = TASK_NAMES
DEFAULT_QUALITY_WINDOWS = 32
QUALITY_WINDOW_TOKENS = 512


def register(subparsers: argparse._SubParsersAction) -> None:
    export = add_command(
        subparsers,
        "export",
        "export a GPT-Neo checkpoint (folder or hub id) to a validated ONNX folder",
        "Export a GPT-Neo checkpoint to an ONNX folder with its sidecar (gptneo_onnx.json), then "
        "validate it against PyTorch. The folder is written beside --output and renamed into place "
        "when complete; an empty existing folder (a mount point) is written into.",
        [
            "gptneo-onnx export --model EleutherAI/gpt-neo-125m --output exports/neo-125m",
            "gptneo-onnx export --model ./my-checkpoint --task sequence-classification --output exports/cls",
            "gptneo-onnx export --model ./ckpt --output exports/int4 --optimize --quantize int4 --quality",
        ],
    )
    export.add_argument("--model", required=True, help="checkpoint folder or Hugging Face hub id")
    export.add_argument("--task", default="causal-lm", choices=TASK_CHOICES, help="the head to export")
    export.add_argument("--output", required=True, type=Path, help="folder to write the export to")
    export.add_argument("--precision", default="float32", choices=("float32", "float16"), help="weights")
    export.add_argument("--revision", help="hub revision to pin (a commit sha is safest; or a branch or tag)")
    export.add_argument(
        "--overwrite", action="store_true", help="replace an existing export in --output (refused otherwise)"
    )
    export.add_argument("--external-data", action="store_true", help="force weights into model.onnx.data")
    export.add_argument(
        "--optimize", action="store_true", help="ONNX Runtime fused ops (GroupQueryAttention with the window)"
    )
    export.add_argument(
        "--quantize",
        choices=tuple(QUANTIZATION_METHODS),
        help="int8 dynamic or int4 weight-only (MatMulNBits)",
    )
    export.add_argument(
        "--block-size", type=int, default=None,
        help=f"with --quantize: weights per quantization block, {BLOCK_SIZE_RULE} "
        f"(default {DEFAULT_BLOCK_SIZE})",
    )  # fmt: skip
    export.add_argument(
        "--accuracy-level", type=int, default=None,
        help=f"with --quantize int4: MatMulNBits accuracy_level, {ACCURACY_LEVEL_RULE} "
        f"(default {DEFAULT_ACCURACY_LEVEL})",
    )  # fmt: skip
    _add_quality_arguments(export, "write quality_report.json")
    export.add_argument(
        "--windowed-local-cache",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="local layers get their own mask so runners keep only their newest rows (default: on with "
        "--optimize; off for portable exports, which then keep Optimum's exact IO)",
    )
    export.add_argument("--no-validate", action="store_true", help="skip the parity run against PyTorch")
    export.add_argument("--json", action="store_true", help="print the result as JSON")
    export.set_defaults(handler=run_export)

    verify = add_command(
        subparsers,
        "verify",
        "re-run the parity validation of an export against its PyTorch checkpoint",
        "Re-run the parity validation of EXPORT against the checkpoint it came from; rewrites "
        "parity_report.json and the sidecar's validation record (so a failed export stops loading). "
        "Exit 0 when it passes, 1 when it does not.",
        ["gptneo-onnx verify exports/neo-125m --reference EleutherAI/gpt-neo-125m"],
    )
    verify.add_argument("export_dir", type=Path, metavar="EXPORT", help="the export folder to check")
    verify.add_argument("--reference", required=True, help="checkpoint folder or hub id the export came from")
    verify.add_argument("--revision", help="hub revision of --reference to pin")
    _add_quality_arguments(verify, "(re)compute quality_report.json")
    verify.add_argument("--json", action="store_true", help="print the report as JSON")
    verify.set_defaults(handler=run_verify)


def _add_quality_arguments(parser: argparse.ArgumentParser, what: str) -> None:
    parser.add_argument(
        "--quality",
        action="store_true",
        help=f"causal-lm: {what}: perplexity and top-1 agreement vs fp32 on held-out stdlib code",
    )
    parser.add_argument(
        "--quality-windows", type=bounded_int(1), default=None,
        help=f"with --quality: {QUALITY_WINDOW_TOKENS}-token windows to score "
        f"(default {DEFAULT_QUALITY_WINDOWS})",
    )  # fmt: skip


def check_export_options(args: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
    """Refuse options that conflict or would be ignored, before anything is loaded."""

    def refuse(message: str) -> None:
        raise UsageError(parser, message)

    if args.quantize and args.precision != "float32":
        refuse("--quantize starts from float32 weights; drop --precision float16 (or --quantize)")
    if args.block_size is not None:
        if not args.quantize:
            refuse("--block-size applies to --quantize int8/int4 only")
        if not is_block_size(args.block_size):
            refuse(f"--block-size must be {BLOCK_SIZE_RULE}, got {args.block_size}")
    if args.accuracy_level is not None:
        if args.quantize != "int4":
            refuse("--accuracy-level applies to --quantize int4 only")
        if args.accuracy_level not in ACCURACY_LEVELS:
            refuse(f"--accuracy-level must be {ACCURACY_LEVEL_RULE} (MatMulNBits), got {args.accuracy_level}")
    _check_quality_options(args, args.task, refuse)
    if args.revision and Path(args.model).is_dir():
        refuse(f"--revision pins a hub checkpoint, but {args.model} is a local folder; drop --revision")
    if args.windowed_local_cache and args.task != "causal-lm":
        refuse("--windowed-local-cache applies to causal-lm exports only (they alone keep a KV cache)")


def _check_quality_options(args: argparse.Namespace, task: str, refuse) -> None:
    if args.quality_windows is not None and not args.quality:
        refuse("--quality-windows applies to --quality only")
    if args.quality and task != "causal-lm":
        refuse(f"--quality scores next-token predictions: causal-lm exports only, not {task}")


def _optional_json(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.is_file() else None


def _quality_windows(folder: Path, model, count: int | None, parser: argparse.ArgumentParser):
    """Held-out stdlib code as (count, 512) token windows, in the checkpoint's own tokenizer."""
    from gptneo_onnx.stdlib_corpus import validation_windows

    if not (folder / "tokenizer.json").is_file():
        raise FileNotFoundError(f"--quality tokenizes held-out code and needs {folder / 'tokenizer.json'}")
    count = DEFAULT_QUALITY_WINDOWS if count is None else count
    windows = validation_windows(folder, min(QUALITY_WINDOW_TOKENS, model.config.max_position_embeddings))
    if count > len(windows):
        raise UsageError(
            parser,
            f"--quality-windows {count}: the held-out code gives {len(windows)} windows in this tokenizer; "
            f"ask for at most {len(windows)}",
        )
    return windows[:count]


def run_export(args: argparse.Namespace) -> int:
    check_export_options(args, args.parser)
    from gptneo_onnx.export.output_folder import check_output_target

    check_output_target(args.output, args.overwrite)  # before the checkpoint is loaded
    from gptneo_onnx.export import export
    from gptneo_onnx.reference.loading import from_pretrained, resolve_checkpoint

    folder = resolve_checkpoint(args.model, args.revision)
    model = from_pretrained(folder, task=args.task)
    tokenizer = folder / "tokenizer.json"
    quality_windows = (
        _quality_windows(folder, model, args.quality_windows, args.parser) if args.quality else None
    )
    result = export(
        model,
        args.output,
        precision=args.precision,
        validate=not args.no_validate,
        tokenizer_file=tokenizer if tokenizer.is_file() else None,
        generation_config=_optional_json(folder / "generation_config.json"),
        external_data=True if args.external_data else None,
        progress=not args.json,
        optimize=args.optimize,
        windowed_local_cache=args.windowed_local_cache,
        quantize=args.quantize,
        block_size=DEFAULT_BLOCK_SIZE if args.block_size is None else args.block_size,
        accuracy_level=DEFAULT_ACCURACY_LEVEL if args.accuracy_level is None else args.accuracy_level,
        quality_windows=quality_windows,
        overwrite=args.overwrite,
    )
    if args.json:
        print(
            json.dumps({"output_dir": str(result.output_dir), "files": result.files, "report": result.report})
        )
    else:
        print(result.summary())
    return 0


def run_verify(args: argparse.Namespace) -> int:
    from gptneo_onnx.errors import ParityError
    from gptneo_onnx.export.sidecar import QUALITY_REPORT
    from gptneo_onnx.export.validate import validate_and_record
    from gptneo_onnx.reference.loading import from_pretrained, resolve_checkpoint
    from gptneo_onnx.runtime.manifest import check_files, read_manifest

    checked = read_manifest(args.export_dir)  # a damaged sidecar is one error line
    check_files(checked)  # and so is a damaged or missing file
    _check_quality_options(args, checked.task, lambda message: _refuse(args, message))
    _check_writable(args.export_dir)
    folder = resolve_checkpoint(args.reference, args.revision)
    model = from_pretrained(folder, task=checked.task)
    try:  # the export's own validation step: the report, and the sidecar's record of it
        report = validate_and_record(model, args.export_dir, checked.raw)
    except ParityError as error:
        report = {**error.parity_report, "error": str(error)}
    if args.quality:
        from gptneo_onnx.export.quality import quality_report
        from gptneo_onnx.export.sidecar import record_quality

        windows = _quality_windows(folder, model, args.quality_windows, args.parser)
        record_quality(args.export_dir, checked.raw, quality_report(checked, windows, model))
    quality = _optional_json(args.export_dir / QUALITY_REPORT)
    quantized = checked.raw.get("quantization") is not None
    if args.json:
        print(json.dumps({"parity": report, "quality": quality}))
    else:
        _print_verify_report(report, quality, quantized=quantized)
    return 0 if report["passed"] else 1


def _refuse(args: argparse.Namespace, message: str) -> None:
    raise UsageError(args.parser, message)


def _check_writable(folder: Path) -> None:
    import os

    if not os.access(folder, os.W_OK):
        raise PermissionError(
            13, "verify rewrites parity_report.json and the sidecar there, and the folder is not "
            "writable; copy the export somewhere writable", str(folder)
        )  # fmt: skip


def _diff(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2e}"


def _print_verify_report(report: dict, quality: dict | None, quantized: bool) -> None:
    verdict = "passed" if report["passed"] else "FAILED"
    allowed, required = report["max_abs_diff_allowed"], report["top1_agreement_required"]
    worst = _diff(report.get("max_abs_diff"))
    if quantized:
        print(f"checked {verdict}: the quantized graph runs, with the reference's shapes and finite outputs")
        print(f"  (not compared for closeness: max |diff| {worst}, top-1 agreement "
              f"{report['top1_agreement']:.2%}; quality_report.json judges quantized exports)")  # fmt: skip
    else:
        print(f"parity {verdict}: max |diff| {worst} (allowed {allowed:.2e})")
        print(f"top-1 agreement {report['top1_agreement']:.2%} (required {required:.0%})")
    for check in report["checks"]:
        # A check that could not be measured (missing output, wrong shape, NaN) says why instead.
        if "max_abs_diff" in check:
            print(f"  {check['output']:<36} max |diff| {_diff(check['max_abs_diff'])}")
        else:
            print(f"  {check['output']:<36} {check.get('reason', 'not measured')}")
    if quality:
        print("quality: " + json.dumps(quality))
