"""`generate`'s positionals are prompts, never an export folder guessed from its position: text that
names an existing file or folder, or looks like a path, is refused with what it is and what to do."""

from __future__ import annotations

from pathlib import Path

from gptneo_onnx.errors import PromptLooksLikePathError
from gptneo_onnx.runtime.export_state import FOLDER_KINDS, folder_kind


def refuse_path_like(text: str) -> None:
    """Raise PromptLooksLikePathError when the prompt `text` names a file or folder or looks like a path."""
    if not text or len(text) > 4096 or "\0" in text:
        return
    path = Path(text).expanduser()
    try:
        exists, is_dir = path.exists(), path.is_dir()
    except OSError:  # a name too long for the filesystem, ...: not a path
        return
    literal = f"pass text that looks like a path with --prompt {text!r}"
    if is_dir:
        kind = folder_kind(path)
        advice = {
            "export": f"pass it with -m: gptneo-onnx generate -m {text} PROMPT",
            "checkpoint": f"export it first (gptneo-onnx export --model {text} --output OUT), "
            "then gptneo-onnx generate -m OUT PROMPT",
            "staging": "re-export to get a finished folder",
            "other": "the export folder goes after -m/--model",
        }[kind]
        raise PromptLooksLikePathError(
            f"{text} is {FOLDER_KINDS[kind]}; prompts are text: {advice} (or {literal})"
        )
    if exists:
        raise PromptLooksLikePathError(f"{text} is a file, not a prompt; {literal}")
    if not any(space in text for space in " \t\n") and ("/" in text or "\\" in text):
        raise PromptLooksLikePathError(
            f"{text} looks like a path, but nothing exists there (a typo?); the export folder goes after "
            f"-m/--model, and prompts are text ({literal})"
        )
