"""Named errors of the export side, importable without torch so the CLI can report them in one line."""

from __future__ import annotations


class CheckpointError(ValueError):
    """A checkpoint that can't be loaded safely: corrupt, pickled code, or tensors that don't fit."""


class ExportOutputError(ValueError):
    """An output folder the exporter refuses to write: not empty, a file, or holding foreign files."""


class PromptLooksLikePathError(ValueError):
    """A `generate` prompt that names a file or folder, or looks like a path: not guessed into a prompt."""


class MissingExtraError(RuntimeError):
    """A command needs an install extra (export, cpu, bench) that is not installed."""


class QuantizationError(ValueError):
    """A quantization request the graph or onnxruntime cannot serve."""
