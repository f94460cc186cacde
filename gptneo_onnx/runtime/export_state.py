"""Where an export folder stands: still being written (a staging folder), validated, failed, never
validated to the end, or made without validation; and what a folder that is no export is.

The exporter writes into `.NAME.partial-XXXX` (holding `.owner`) and renames it into place
(export/output_folder.py); the sidecar's `validation.status` is written last (docs/sidecar.md).
"""

from __future__ import annotations

import re
import warnings
from pathlib import Path

from gptneo_onnx.contract import MANIFEST_NAME, OWNER_FILE, STAGING_INFIX
from gptneo_onnx.runtime.errors import ExportFolderError, UnvalidatedExportWarning

# An export is written into `.NAME.partial-XXXX` holding `.owner`, then renamed (export/output_folder.py).
STAGING_NAME = re.compile(rf"^\..+{re.escape(STAGING_INFIX)}[0-9a-f]+$")
CHECKPOINT_WEIGHTS = (
    "model.safetensors",
    "pytorch_model.bin",
    "flax_model.msgpack",
    "model.safetensors.index.json",
)


def is_staging_folder(folder: Path) -> bool:
    """A folder an export is still being written into (`.NAME.partial-*`, holding `.owner`)."""
    return bool(STAGING_NAME.match(folder.name)) or (folder / OWNER_FILE).exists()


def validation_status(raw: dict) -> str:
    """passed, failed, pending (written, validation not finished) or skipped (--no-validate, or an
    export from before the `validation.status` field that records none)."""
    validation = raw.get("validation")
    if validation is None:
        return "skipped"
    status = validation.get("status")
    if status is None:  # written before `status` existed: only `passed`
        return "passed" if validation.get("passed") else "failed"
    return status


_warned_unvalidated: set[Path] = set()


def check_validation(folder: Path, raw: dict) -> None:
    """Refuse a failed or unfinished validation."""
    status = validation_status(raw)
    report = (raw.get("validation") or {}).get("report") or "parity_report.json"
    if status == "failed":
        raise ExportFolderError(
            f"{folder} failed its parity validation against PyTorch (see {report}); it is kept for "
            "inspection, not for running. Fix the cause and re-export"
        )
    if status == "pending":
        raise ExportFolderError(
            f"{folder} was never validated to the end (validation.status is 'pending': the export was "
            "interrupted); re-export it"
        )


def warn_if_unvalidated(folder: Path, raw: dict) -> None:
    """Warn once per folder about an export made without validation."""
    if validation_status(raw) == "skipped" and folder not in _warned_unvalidated:
        _warned_unvalidated.add(folder)
        warnings.warn(
            f"{folder} was exported without validation (--no-validate): nothing compared it with "
            "PyTorch; run `gptneo-onnx verify` on it",
            UnvalidatedExportWarning,
            stacklevel=3,
        )


FOLDER_KINDS = {
    "staging": "the staging folder of an export that did not finish (killed, or running), not an export",
    "export": "an export folder",
    "checkpoint": "a checkpoint, not an export",
    "other": "a folder that holds no export",
}


def folder_kind(folder: Path) -> str:
    """What a folder is to gptneo-onnx: a key of FOLDER_KINDS."""
    if is_staging_folder(folder):
        return "staging"
    if (folder / MANIFEST_NAME).is_file():
        return "export"
    if (folder / "config.json").is_file() and any((folder / name).is_file() for name in CHECKPOINT_WEIGHTS):
        return "checkpoint"
    return "other"
