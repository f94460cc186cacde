"""Exceptions the CLI prints as one `error:` line instead of a traceback."""

from __future__ import annotations

from gptneo_onnx.config import ConfigError
from gptneo_onnx.errors import CheckpointError, ExportOutputError, ParityError
from gptneo_onnx.runtime.errors import RuntimeModelError

# Other command modules may extend this tuple with their own named errors.
USER_ERRORS: tuple[type[BaseException], ...] = (
    RuntimeModelError,
    ConfigError,
    CheckpointError,
    ExportOutputError,
    ParityError,
    FileNotFoundError,
)
