"""The `gptneo-onnx` command line.

Each module in COMMAND_MODULES has a `register(subparsers)` that adds its subcommands and sets
`handler=` (a function taking the parsed args and returning an exit code) on each. Modules
import heavy things (torch, onnxruntime) inside their handlers only, so `gptneo-onnx --help`
and importing this package stay light.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

from gptneo_onnx import __version__

COMMAND_MODULES = (
    "gptneo_onnx.cli.runtime_commands",
    "gptneo_onnx.cli.export_commands",
    "gptneo_onnx.cli.bench_commands",
    "gptneo_onnx.cli.serve_commands",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="gptneo-onnx", description="GPT-Neo to ONNX, and a thin runtime to run the exports."
    )
    parser.add_argument("--version", action="version", version=f"gptneo-onnx {__version__}")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for module_name in COMMAND_MODULES:
        importlib.import_module(module_name).register(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command; returns the exit code (2 for errors the user can fix)."""
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if hasattr(args, "passthrough"):  # commands that hand their options to another parser
        args.passthrough = extra
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    from gptneo_onnx.cli.errors import USER_ERRORS

    try:
        return int(args.handler(args) or 0)
    except USER_ERRORS as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
