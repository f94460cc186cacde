"""The `gptneo-onnx` command line.

Each module in COMMAND_MODULES has a `register(subparsers)` that adds its subcommands and sets
`handler=` (a function taking the parsed args and returning an exit code) on each. Modules
import heavy things (torch, onnxruntime) inside their handlers only, so `gptneo-onnx --help`
and importing this package stay light. Every failure is one `error:` line on stderr (and, with
`--json`, `{"error": {"type", "message"}}` on stdout) with a non-zero exit: docs/cli.md.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
import traceback
import warnings
from collections.abc import Sequence

from gptneo_onnx import __version__
from gptneo_onnx.cli.parsing import CommandParser, UsageError, parse

COMMAND_MODULES = (
    "gptneo_onnx.cli.runtime_commands",
    "gptneo_onnx.cli.info_command",
    "gptneo_onnx.cli.export_commands",
    "gptneo_onnx.cli.bench_commands",
    "gptneo_onnx.cli.serve_commands",
)
DEBUG_VARIABLE = "GPTNEO_ONNX_DEBUG"  # set it to see the traceback of an unexpected error
USER_ERROR_EXIT = 2
INTERNAL_ERROR_EXIT = 1
INTERRUPTED_EXIT = 130  # 128 + SIGINT, as shells report a Ctrl-C
BROKEN_PIPE_EXIT = 141  # 128 + SIGPIPE, as shells report `yes | head`


def build_parser() -> argparse.ArgumentParser:
    parser = CommandParser(
        prog="gptneo-onnx",
        description="GPT-Neo to ONNX, and a thin runtime to run the exports. "
        "`gptneo-onnx COMMAND --help` describes each command; docs/cli.md has them all.",
    )
    parser.add_argument("--version", action="version", version=f"gptneo-onnx {__version__}")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for module_name in COMMAND_MODULES:
        importlib.import_module(module_name).register(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command; returns the exit code (2 for errors the user can fix, 130 for Ctrl-C)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    json_mode = "--json" in argv
    command = None
    previous_format = warnings.formatwarning
    warnings.formatwarning = lambda message, *_args, **_kwargs: f"warning: {message}\n"
    try:
        parser = build_parser()
        args = parse(parser, argv)
        command = args.command
        return int(args.handler(args) or 0)
    except UsageError as error:
        if not json_mode:
            error.parser.print_usage(sys.stderr)
        return _report(error, "UsageError", str(error), USER_ERROR_EXIT, json_mode)
    except KeyboardInterrupt:
        return _report(None, "KeyboardInterrupt", "interrupted", INTERRUPTED_EXIT, json_mode)
    except BrokenPipeError:
        return _quiet_broken_pipe()
    except Exception as error:
        return _report_exception(error, command, json_mode)
    finally:
        warnings.formatwarning = previous_format


def _report_exception(error: Exception, command: str | None, json_mode: bool) -> int:
    from gptneo_onnx.cli.errors import USER_ERRORS, missing_extra, os_error_message

    kind = type(error).__name__
    if _caused_by_interrupt(error):  # Ctrl-C inside a library that wrapped it (an import, ...)
        return _report(error, "KeyboardInterrupt", "interrupted", INTERRUPTED_EXIT, json_mode)
    if isinstance(error, OSError) and error.errno is not None:  # from the system: say what and where
        return _report(error, kind, os_error_message(error), USER_ERROR_EXIT, json_mode)
    if isinstance(error, USER_ERRORS):
        return _report(error, kind, str(error), USER_ERROR_EXIT, json_mode)
    if isinstance(error, ModuleNotFoundError):
        extra = missing_extra(error, command)
        if extra is not None:
            return _report(extra, "MissingExtraError", str(extra), USER_ERROR_EXIT, json_mode)
    if isinstance(error, MemoryError):
        message = "out of memory; lower the batch, num_beams, num_return_sequences or max_new_tokens"
        return _report(error, kind, message, USER_ERROR_EXIT, json_mode)
    if os.environ.get(DEBUG_VARIABLE):
        traceback.print_exc()
    message = (
        f"unexpected {kind}: {error}. This is a bug in gptneo-onnx: please report it "
        f"(set {DEBUG_VARIABLE}=1 to see the traceback)"
    )
    return _report(error, kind, message, INTERNAL_ERROR_EXIT, json_mode)


def _caused_by_interrupt(error: BaseException) -> bool:
    seen = set()
    while error is not None and id(error) not in seen:
        if isinstance(error, KeyboardInterrupt):
            return True
        seen.add(id(error))
        error = error.__cause__ or error.__context__
    return False


def _report(error: BaseException | None, kind: str, message: str, code: int, json_mode: bool) -> int:
    message = " ".join(message.split()) or kind  # one line
    if json_mode:
        try:
            print(json.dumps({"error": {"type": kind, "message": message}}), flush=True)
        except BrokenPipeError:
            return _quiet_broken_pipe()
    print(f"error: {message}", file=sys.stderr, flush=True)
    return code


def _quiet_broken_pipe() -> int:
    """The reader of stdout went away (`| head`): stop quietly, as Unix tools do. stdout is pointed
    at /dev/null so Python's final flush does not complain again."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):  # stdout is not a real file (captured in tests)
        pass
    return BROKEN_PIPE_EXIT
