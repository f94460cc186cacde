"""The CLI's execution-provider flags, generated from ProviderOptions' fields (one list of them)."""

from __future__ import annotations

import argparse
import typing
from dataclasses import MISSING, fields
from pathlib import Path
from typing import Any

from gptneo_onnx.cli.parsing import bounded_int
from gptneo_onnx.provider_options import ProviderOptions


def provider_flags() -> dict[str, str]:
    """Each ProviderOptions field's CLI flag: its metadata's `flag`, else --the-field-name."""
    return {
        item.name: item.metadata.get("flag") or "--" + item.name.replace("_", "-")
        for item in fields(ProviderOptions)
    }


def _dest(flag: str) -> str:
    return flag.lstrip("-").replace("-", "_")


def add_provider_flags(parser: argparse.ArgumentParser) -> None:
    """One flag per ProviderOptions field, in an "execution provider" group."""
    group = parser.add_argument_group("execution provider")
    hints = typing.get_type_hints(ProviderOptions)
    flags = provider_flags()
    for item in fields(ProviderOptions):
        settings: dict[str, Any] = {"help": item.metadata["help"]}
        if item.default is not MISSING:
            settings["default"] = item.default
        kind = hints[item.name]
        if kind is bool:
            settings["action"] = "store_true"
        elif "choices" in item.metadata:
            settings["choices"] = item.metadata["choices"]
        elif "minimum" in item.metadata:  # the upper bounds are checked at load (runtime/providers.py)
            settings["type"] = bounded_int(item.metadata["minimum"])
        elif Path in typing.get_args(kind):
            settings["type"] = Path
        if "metavar" in item.metadata:
            settings["metavar"] = item.metadata["metavar"]
        group.add_argument(flags[item.name], **settings)


def provider_options(args: argparse.Namespace) -> ProviderOptions:
    """The ProviderOptions that add_provider_flags' flags were given."""
    return ProviderOptions(**{name: getattr(args, _dest(flag)) for name, flag in provider_flags().items()})
