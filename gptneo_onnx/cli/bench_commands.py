"""`gptneo-onnx bench`, `bench-quality` and `bench-lookup` (need the `bench` extra)."""

from __future__ import annotations

import argparse


def register(subparsers: argparse._SubParsersAction) -> None:
    bench = subparsers.add_parser(
        "bench",
        help="time this project's exports against transformers and Optimum in one run",
        add_help=False,
    )
    bench.set_defaults(handler=run_bench, passthrough=[])
    quality = subparsers.add_parser(
        "bench-quality",
        help="perplexity and top-1 agreement of int8/int4 exports of the bundled model vs fp32",
        add_help=False,
    )
    quality.set_defaults(handler=run_quality, passthrough=[])
    lookup = subparsers.add_parser(
        "bench-lookup",
        help="prompt-lookup decoding on the bundled model: speed-up per N, ours beside transformers'",
        add_help=False,
    )
    lookup.set_defaults(handler=run_lookup, passthrough=[])


def run_bench(args: argparse.Namespace) -> int:
    from gptneo_onnx.bench.run import main

    main(args.passthrough)
    return 0


def run_quality(args: argparse.Namespace) -> int:
    from gptneo_onnx.bench.quality import main

    main(args.passthrough)
    return 0


def run_lookup(args: argparse.Namespace) -> int:
    from gptneo_onnx.bench.lookup import main

    main(args.passthrough)
    return 0
