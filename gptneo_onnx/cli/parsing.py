"""How the command line is parsed: options anywhere, help with defaults and examples, and usage
errors raised (not printed and exited) so `main` reports them in one line, or as JSON."""

from __future__ import annotations

import argparse
import re
import sys
import textwrap
from collections.abc import Sequence


class UsageError(Exception):
    """A command line argparse refused; `parser` is the (sub)command whose usage applies."""

    def __init__(self, parser: argparse.ArgumentParser, message: str):
        super().__init__(message)
        self.parser = parser


class CommandParser(argparse.ArgumentParser):
    """An ArgumentParser whose errors raise UsageError; subcommands inherit the class."""

    def error(self, message: str):  # type: ignore[override]
        raise UsageError(self, message)


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Keeps the description's line breaks (its examples) and shows each option's default, when
    it has one worth showing."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        shown = default not in (None, False, [], argparse.SUPPRESS) and "default" not in text
        if shown and (action.option_strings or action.nargs in ("?", "*")):
            text += " (default: %(default)s)"
        return text


def add_command(
    subparsers: argparse._SubParsersAction, name: str, summary: str, description: str, examples: Sequence[str]
) -> argparse.ArgumentParser:
    """A subcommand with a one-line `summary` (in `gptneo-onnx --help`), a description and examples."""
    epilog = "examples:\n" + "\n".join(f"  {example}" for example in examples)
    return subparsers.add_parser(
        name,
        help=summary,
        description=textwrap.fill(description, 100),
        epilog=epilog,
        formatter_class=HelpFormatter,
    )


def subcommands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


def parse(parser: argparse.ArgumentParser, argv: list[str]) -> argparse.Namespace:
    """Parse `argv`: the first word is the command; its options may come before, between or
    after its positionals. Commands with a `passthrough` default hand unknown options on."""
    commands = subcommands(parser)
    name = next((word for word in argv if not word.startswith("-")), None)
    if name not in commands:
        return parser.parse_args(argv)  # --help, --version, or argparse's own error for the command
    index = argv.index(name)
    if index:  # only -h/--version may come before the command, and they exit
        parser.parse_args(argv[:index])
    command = commands[name]
    rest = argv[index + 1 :]
    if "passthrough" in command._defaults:
        args, extra = command.parse_known_args(rest)
        args.passthrough = extra
    else:
        args = command.parse_intermixed_args(rest)
    args.command, args.parser = name, command
    return args


_ESCAPE = re.compile(r"\\(?:([\\nrt0'\"])|x([0-9a-fA-F]{2})|u([0-9a-fA-F]{4})|U([0-9a-fA-F]{8}))")
_SIMPLE_ESCAPES = {"\\": "\\", "n": "\n", "r": "\r", "t": "\t", "0": "\0", "'": "'", '"': '"'}


def unescape(text: str) -> str:
    r"""Read the backslash escapes \n \t \r \\ \0 \xHH \uHHHH \UHHHHHHHH in `text` (other text is kept as is),
    so `--stop "\n"` means a newline, as a shell user means it."""

    def replace(match: re.Match) -> str:
        simple, byte, code, wide = match.groups()
        if simple:
            return _SIMPLE_ESCAPES[simple]
        return chr(min(int(byte or code or wide, 16), sys.maxunicode))

    return _ESCAPE.sub(replace, text)


def bounded_int(low: int, high: int | None = None, what: str = "") -> type:
    """An argparse `type` for integers in [low, high] whose error names the range."""

    def parse_int(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < low or (high is not None and value > high):
            limit = f"between {low} and {high}" if high is not None else f">= {low}"
            raise argparse.ArgumentTypeError(f"must be {limit}{what}, got {value}")
        return value

    parse_int.__name__ = "integer"
    return parse_int  # type: ignore[return-value]
