"""Named errors of the export side, importable without torch so the CLI can report them in one line."""

from __future__ import annotations

from pathlib import Path


class CheckpointError(ValueError):
    """A checkpoint that can't be loaded safely: corrupt, pickled code, or tensors that don't fit."""


class ExportOutputError(ValueError):
    """An output folder the exporter refuses to write: not empty, a file, or holding foreign files."""


class ParityError(ValueError):
    """An export whose outputs differ from the reference beyond tolerance, or that failed to run
    in validation. `parity_report` is the report itself (what parity_report.json holds: where and
    by how much); `report` is the path it was written to."""

    def __init__(self, summary: str, report: Path, parity_report: dict):
        super().__init__(f"{summary}; see {report}")
        self.summary, self.report, self.parity_report = summary, Path(report), parity_report

    def moved_to(self, folder: Path) -> ParityError:
        """The same error, pointing at the report in `folder` (the export once put in place)."""
        return ParityError(self.summary, Path(folder) / self.report.name, self.parity_report)


class PromptLooksLikePathError(ValueError):
    """A `generate` prompt that names a file or folder, or looks like a path: not guessed into a prompt."""


class MissingExtraError(RuntimeError):
    """A command needs an install extra (export, cpu, bench) that is not installed."""


class QuantizationError(ValueError):
    """A quantization request the graph or onnxruntime cannot serve."""
