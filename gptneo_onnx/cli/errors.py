"""What the CLI prints, and exits with, for each kind of failure: one `error:` line, never a traceback."""

from __future__ import annotations

import errno

from gptneo_onnx.config import ConfigError
from gptneo_onnx.errors import (
    CheckpointError,
    ExportOutputError,
    MissingExtraError,
    ParityError,
    PromptLooksLikePathError,
    QuantizationError,
)

try:
    from gptneo_onnx.runtime.errors import RuntimeModelError
except ImportError:  # no (or a broken) onnxruntime: nothing can raise it then

    class RuntimeModelError(Exception):  # type: ignore[no-redef]
        """Stands in for the runtime's error class when the runtime can't be imported."""


# Exceptions whose message is meant for the user, printed as is (exit 2). Other command
# modules may extend this tuple with their own named errors.
USER_ERRORS: tuple[type[BaseException], ...] = (
    RuntimeModelError,
    ConfigError,
    CheckpointError,
    ExportOutputError,
    ParityError,
    FileNotFoundError,
    PromptLooksLikePathError,
    MissingExtraError,
    QuantizationError,
)

# Which install extra provides a module the commands import.
MODULE_EXTRAS = {
    "torch": "export",
    "onnx": "export",
    "onnx_ir": "export",
    "transformers": "export",
    "safetensors": "export",
    "huggingface_hub": "export",
    "tqdm": "export",
    "onnxruntime": "cpu",
    "optimum": "bench",
    "matplotlib": "bench",
    "psutil": "bench",
}


def missing_extra(error: ModuleNotFoundError, command: str | None) -> MissingExtraError | None:
    """The user-facing form of a missing optional dependency, or None for any other missing module."""
    module = (error.name or "").split(".")[0]
    extra = MODULE_EXTRAS.get(module)
    if extra is None:
        return None
    hint = (
        "pip install 'gptneo-onnx[cpu]' (or [gpu])"
        if extra == "cpu"
        else f"pip install 'gptneo-onnx[{extra}]'"
    )
    what = f"gptneo-onnx {command}" if command else "this command"
    return MissingExtraError(f"{what} needs the `{extra}` extra (module {module!r} is not installed): {hint}")


def os_error_message(error: OSError) -> str:
    """An OSError as one line: what failed, on which path, and what to do."""
    where = f" {error.filename}" if error.filename else ""
    reason = error.strerror or str(error)
    advice = {
        errno.EACCES: "choose a folder you can write to",
        errno.EPERM: "choose a folder you can write to",
        errno.EROFS: "the filesystem is read-only; choose another folder",
        errno.ENOSPC: "free some space or choose another disk",
        errno.EBUSY: "it is in use (a mount point?); choose another folder",
    }.get(error.errno or 0)
    return f"cannot use{where}: {reason}" + (f"; {advice}" if advice else "")
