"""`gptneo-onnx export` and `gptneo-onnx verify`. torch is imported only when they run."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

TASK_CHOICES = ("causal-lm", "base", "sequence-classification", "token-classification", "question-answering")


def register(subparsers: argparse._SubParsersAction) -> None:
    export = subparsers.add_parser(
        "export",
        help="export a GPT-Neo checkpoint (folder or hub id) to a validated ONNX folder",
        description="Export a GPT-Neo checkpoint to ONNX, then validate it against PyTorch.",
    )
    export.add_argument("--model", required=True, help="checkpoint folder or Hugging Face hub id")
    export.add_argument("--task", default="causal-lm", choices=TASK_CHOICES)
    export.add_argument("--output", required=True, type=Path, help="folder to write the export to")
    export.add_argument("--precision", default="float32", choices=("float32", "float16"))
    export.add_argument("--revision", help="hub revision to pin (a commit sha is safest; or a branch or tag)")
    export.add_argument(
        "--overwrite", action="store_true", help="replace an existing export in --output (refused otherwise)"
    )
    export.add_argument("--external-data", action="store_true", help="force weights into model.onnx.data")
    export.add_argument(
        "--optimize", action="store_true", help="ONNX Runtime fused ops (GroupQueryAttention with the window)"
    )
    export.add_argument(
        "--quantize", choices=("int8", "int4"), help="int8 dynamic or int4 weight-only (MatMulNBits)"
    )
    export.add_argument("--block-size", type=int, default=32, help="int4 block size (default 32)")
    export.add_argument(
        "--accuracy-level", type=int, default=4, help="MatMulNBits accuracy_level (default 4)"
    )
    export.add_argument(
        "--quality",
        action="store_true",
        help="write quality_report.json: perplexity and top-1 agreement vs fp32 on held-out stdlib code",
    )
    export.add_argument("--quality-windows", type=int, default=32, help="512-token windows for --quality")
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

    verify = subparsers.add_parser(
        "verify",
        help="re-run the parity validation of an export against its PyTorch checkpoint",
    )
    verify.add_argument("export_dir", type=Path)
    verify.add_argument("--reference", required=True, help="checkpoint folder or hub id the export came from")
    verify.add_argument("--revision", help="hub revision of --reference to pin")
    verify.add_argument(
        "--quality",
        action="store_true",
        help="(re)compute quality_report.json: perplexity and top-1 agreement vs fp32 on held-out code",
    )
    verify.add_argument("--quality-windows", type=int, default=32, help="512-token windows for --quality")
    verify.add_argument("--json", action="store_true", help="print the report as JSON")
    verify.set_defaults(handler=run_verify)


def _optional_json(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.is_file() else None


def _quality_windows(folder: Path, model, count: int):
    """Held-out stdlib code as (count, 512) token windows, in the checkpoint's own tokenizer."""
    from gptneo_onnx.stdlib_corpus import validation_windows

    if not (folder / "tokenizer.json").is_file():
        raise FileNotFoundError(f"--quality tokenizes held-out code and needs {folder / 'tokenizer.json'}")
    return validation_windows(folder, min(512, model.config.max_position_embeddings), count)


def run_export(args: argparse.Namespace) -> int:
    from gptneo_onnx.export import export
    from gptneo_onnx.reference.loading import from_pretrained, resolve_checkpoint

    folder = resolve_checkpoint(args.model, args.revision)
    model = from_pretrained(folder, task=args.task)
    tokenizer = folder / "tokenizer.json"
    quality_windows = _quality_windows(folder, model, args.quality_windows) if args.quality else None
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
        block_size=args.block_size,
        accuracy_level=args.accuracy_level,
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
    from gptneo_onnx.export.validate import ParityError, Tolerance, validate_export
    from gptneo_onnx.reference.loading import from_pretrained, resolve_checkpoint

    manifest_path = args.export_dir / "gptneo_onnx.json"
    if not manifest_path.is_file():
        raise FileNotFoundError(f"{args.export_dir} is not a gptneo-onnx export (no gptneo_onnx.json)")
    manifest = json.loads(manifest_path.read_text())
    folder = resolve_checkpoint(args.reference, args.revision)
    model = from_pretrained(folder, task=manifest["task"])
    quantization = (manifest.get("quantization") or {}).get("method")
    tolerance = Tolerance.for_precision(manifest["precision"], quantization)
    try:
        report = validate_export(model, args.export_dir, manifest, tolerance)
    except ParityError as error:
        report = json.loads((args.export_dir / "parity_report.json").read_text())
        report["error"] = str(error)
    if args.quality and manifest["task"] == "causal-lm":
        from gptneo_onnx.export.output_folder import write_json
        from gptneo_onnx.export.quantize import quality_report

        windows = _quality_windows(folder, model, args.quality_windows)
        write_json(args.export_dir, "quality_report.json", quality_report(args.export_dir, windows, model))
    quality = _optional_json(args.export_dir / "quality_report.json")
    if args.json:
        print(json.dumps({"parity": report, "quality": quality}))
    else:
        verdict = "passed" if report["passed"] else "FAILED"
        allowed, required = report["max_abs_diff_allowed"], report["top1_agreement_required"]
        print(f"parity {verdict}: max |diff| {report['max_abs_diff']:.2e} (allowed {allowed:.2e})")
        print(f"top-1 agreement {report['top1_agreement']:.2%} (required {required:.0%})")
        for check in report["checks"]:
            print(f"  {check['output']:<36} max |diff| {check['max_abs_diff']:.2e}")
        if quality:
            print("quality: " + json.dumps(quality))
    return 0 if report["passed"] else 1
