"""Quality of the quantized exports of the bundled model on its validation set.

    gptneo-onnx bench-quality [--model gptneo_onnx/default_model] [--out bench-results/quality]

Exports the model as int8 and int4 (optimized flavor), each with `quality_report.json` beside it
(perplexity and top-1 agreement against fp32 on the validation windows of `split.json`).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from gptneo_onnx.stdlib_corpus import validation_windows

BUNDLED_MODEL = Path(__file__).resolve().parent.parent / "default_model"


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=BUNDLED_MODEL)
    parser.add_argument("--out", type=Path, default=Path("bench-results") / "quality")
    parser.add_argument("--window", type=int, default=512)
    parser.add_argument("--max-windows", type=int, default=32)
    parser.add_argument("--block-size", type=int, default=32)
    args = parser.parse_args(argv)
    from gptneo_onnx.export import export
    from gptneo_onnx.reference import from_pretrained

    reference = from_pretrained(args.model)
    window = min(args.window, reference.config.max_position_embeddings)
    windows = validation_windows(args.model, window, args.max_windows)
    reports = {}
    for method in ("int8", "int4"):
        folder = args.out / f"optimized-{method}"
        export(
            reference,
            folder,
            optimize=True,
            quantize=method,
            block_size=args.block_size,
            quality_windows=windows,
            tokenizer_file=args.model / "tokenizer.json",
            overwrite=True,  # this command's own output: a re-run replaces it
        )
        reports[method] = json.loads((folder / "quality_report.json").read_text())
    print(json.dumps(reports, indent=2))
    return reports


if __name__ == "__main__":
    main()
