"""Export a random-weight GPT-Neo at a real size and report time, peak memory and file sizes.

.venv/bin/python scripts/export_real_size.py --shape 1.3b --output /tmp/neo-1.3b
"""

from __future__ import annotations

import argparse
import json
import resource
import time

import torch

from gptneo_onnx.config import GPTNeoConfig
from gptneo_onnx.export import export
from gptneo_onnx.reference import build_model

SHAPES = {  # the EleutherAI checkpoints' dimensions
    "125m": dict(hidden_size=768, num_layers=12, num_heads=12),
    "1.3b": dict(hidden_size=2048, num_layers=24, num_heads=16),
    "2.7b": dict(hidden_size=2560, num_layers=32, num_heads=20),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", choices=SHAPES, default="1.3b")
    parser.add_argument("--output", required=True)
    parser.add_argument("--precision", default="float32", choices=("float32", "float16"))
    parser.add_argument(
        "--external-data",
        action="store_true",
        help="weights in onnx/model.onnx.data at any size (default: by size)",
    )
    args = parser.parse_args()

    dims = SHAPES[args.shape]
    config = GPTNeoConfig(attention_types=[[["global", "local"], dims["num_layers"] // 2]], **dims)
    torch.manual_seed(0)
    started = time.perf_counter()
    with torch.no_grad():
        model = build_model(config, "causal-lm")
        for parameter in model.parameters():  # GPT-Neo's init scale; norms keep their 1s and 0s
            if parameter.dim() == 2:
                parameter.normal_(0.0, 0.02)
    built = time.perf_counter()
    result = export(model, args.output, precision=args.precision, external_data=args.external_data or None)
    finished = time.perf_counter()
    figures = {
        "shape": args.shape,
        "parameters": sum(p.numel() for p in model.parameters()),
        "build_seconds": round(built - started, 1),
        "export_and_validate_seconds": round(finished - built, 1),
        "peak_rss_gb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6, 2),
        "files_mb": {name: round(size / 1e6, 1) for name, size in result.files.items()},
        "parity": {k: result.report[k] for k in ("passed", "max_abs_diff", "top1_agreement")},
    }
    print(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()
