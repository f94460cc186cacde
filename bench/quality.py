"""Quality of the quantized exports of the bundled model on its validation set.

    .venv/bin/python -m bench.quality [--model gptneo_onnx/default_model] [--out bench-results/quality]

Exports the model as int8 and int4 (optimized flavor), each with `quality_report.json` beside it
(perplexity and top-1 agreement against fp32 on the validation windows of `split.json`).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
END_OF_TEXT = "<|endoftext|>"


def _stdlib_corpus():
    """scripts/stdlib_corpus.py, which is a script folder rather than a package."""
    spec = importlib.util.spec_from_file_location("stdlib_corpus", ROOT / "scripts" / "stdlib_corpus.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def validation_windows(model_folder: Path, window: int, max_windows: int) -> np.ndarray:
    """Non-overlapping token windows of the validation files named in `split.json`."""
    from tokenizers import Tokenizer

    corpus = _stdlib_corpus()
    sources = corpus.load_sources(corpus.stdlib_root())
    paths = [path for path in corpus.read_validation_paths(model_folder / "split.json") if path in sources]
    if not paths:
        raise FileNotFoundError(f"none of the validation files of {model_folder / 'split.json'} are here")
    tokenizer = Tokenizer.from_file(str(model_folder / "tokenizer.json"))
    ids = corpus.encode_documents(
        tokenizer, [sources[path] for path in paths], tokenizer.token_to_id(END_OF_TEXT)
    )
    return corpus.chop_windows(ids, window, max_windows)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=ROOT / "gptneo_onnx" / "default_model")
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
        )
        reports[method] = json.loads((folder / "quality_report.json").read_text())
    print(json.dumps(reports, indent=2))
    return reports


if __name__ == "__main__":
    main()
