"""Where an export is written: a fresh staging folder beside the output, renamed into place at the end.

Every file is created new inside a staging folder `.NAME.partial-XXXX` that this process just
made, so no file name from the input and no link already in the output can send a write
elsewhere. The finished folder replaces the output in one rename. A crash therefore leaves the
output as it was (absent, or the previous export, intact) and a `.NAME.partial-*` folder that
holds no valid export. An existing output is replaced only when asked, and only when it holds
nothing but export files. An empty existing output (a mount point) is written into instead: the
staging folder is made inside it and its files moved in, the sidecar last.

Each staging folder records its writer (`.owner`: host and process id) until it is renamed into
place. The next export to the same output deletes the staging folders whose writer is gone (same
host, process no longer running), so what a killed export left behind does not pile up.
"""

from __future__ import annotations

import errno
import json
import os
import secrets
import shutil
import socket
import stat
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from gptneo_onnx.contract import MANIFEST_NAME, OWNER_FILE, STAGING_INFIX, TOKENIZER_CONFIG_NAME
from gptneo_onnx.errors import ExportOutputError
from gptneo_onnx.export.layout import GRAPH_FOLDER, GRAPH_FOLDER_FILES

# Every name an export folder may hold; `overwrite=True` deletes nothing else.
EXPORT_FILES = frozenset(
    {
        MANIFEST_NAME,
        "tokenizer.json",
        TOKENIZER_CONFIG_NAME,
        "config.json",
        "generation_config.json",
        "parity_report.json",
        "quality_report.json",
    }
)


def check_output_folder(target: Path, overwrite: bool, ignore: str | None = None) -> None:
    """Refuse a target that is a file, or a non-empty folder unless `overwrite` and it holds an export
    (`ignore`: the name of this export's own staging folder inside it)."""
    if target.is_symlink() and not target.exists():
        raise ExportOutputError(f"{target} is a broken link; remove it or choose another output folder")
    if not target.exists():
        return
    if not target.is_dir():
        raise ExportOutputError(f"{target} exists and is not a folder; choose another output folder")
    entries = [name for name in _entries(target) if name != ignore]
    if not entries:
        return
    if not overwrite:
        raise ExportOutputError(
            f"{target} is not empty; pass overwrite=True (CLI: --overwrite) to replace the export in it, "
            "or choose an empty or new folder"
        )
    foreign = [name for name in entries if not _written_by_export(target / name)]
    if foreign:
        raise ExportOutputError(
            f"{target} holds {', '.join(foreign[:5])}, which an export does not write; refusing to delete "
            "it even with overwrite. Empty the folder or choose another"
        )


def _written_by_export(path: Path) -> bool:
    if path.name == GRAPH_FOLDER and path.is_dir() and not path.is_symlink():
        return all(child.name in GRAPH_FOLDER_FILES and child.is_file() for child in path.iterdir())
    return path.name in EXPORT_FILES and not path.is_dir()


@contextmanager
def staged_output(output_dir: str | Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield a new empty staging folder; on success it becomes `output_dir`, on error it is removed.

    An empty existing `output_dir`, or a mount point (a container volume, which can't be renamed
    over), is written into instead: the staging folder is made inside it and its files are moved
    in, the sidecar last, so the folder keeps its identity and mode."""
    target = Path(output_dir).resolve()  # a link to a folder: write where it points
    remove_abandoned_staging(target)
    check_output_folder(target, overwrite)
    into_existing = target.is_dir() and (not _entries(target) or os.path.ismount(target))
    if not into_existing:
        target.parent.mkdir(parents=True, exist_ok=True)
    check_writable(target if into_existing else target.parent)
    staging = _fresh_folder(target if into_existing else target.parent, f".{target.name}{STAGING_INFIX}")
    try:
        _write_owner(staging)
        yield staging
        (staging / OWNER_FILE).unlink()
        if into_existing:
            _move_files_into(staging, target, overwrite)
        else:
            _move_into_place(staging, target, overwrite)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def check_output_target(output_dir: str | Path, overwrite: bool) -> None:
    """Everything staged_output checks before writing, without writing: call it before long work."""
    target = Path(output_dir).resolve()
    check_output_folder(target, overwrite)
    existing = target if target.is_dir() else next(parent for parent in target.parents if parent.exists())
    if not existing.is_dir():
        raise ExportOutputError(
            f"{existing} is not a folder, so {target} can't be made; choose another output"
        )
    check_writable(existing)
    try:  # /proc, /sys: access() says yes to root, so try it
        _fresh_folder(existing, ".gptneo-onnx-probe-").rmdir()
    except OSError as error:
        raise OSError(error.errno, error.strerror, str(existing)) from None


def check_writable(folder: Path) -> None:
    """Fail early, before any work, when `folder` can't take new files (read-only, /proc, /sys)."""
    if not os.access(folder, os.W_OK | os.X_OK):
        reason = errno.EROFS if _read_only_filesystem(folder) else errno.EACCES
        raise PermissionError(reason, os.strerror(reason), str(folder))


def _read_only_filesystem(folder: Path) -> bool:
    try:
        return bool(os.statvfs(folder).f_flag & os.ST_RDONLY)
    except (OSError, AttributeError):
        return False


def _entries(folder: Path) -> list[str]:
    return sorted(path.name for path in folder.iterdir())


def _move_files_into(staging: Path, target: Path, overwrite: bool) -> None:
    """Move the finished files from `staging` (inside `target`) into `target`: the previous
    export's files go first (its sidecar first of all), the new sidecar comes last, so no moment
    shows a sidecar over files that are not its own."""
    check_output_folder(target, overwrite, ignore=staging.name)  # it may have changed while the export ran
    sidecar = MANIFEST_NAME
    old = [name for name in _entries(target) if name in EXPORT_FILES]
    for name in sorted(old, key=lambda name: name != sidecar):
        (target / name).unlink()
    for name in sorted(_entries(staging), key=lambda name: name == sidecar):
        os.replace(staging / name, target / name)
    staging.rmdir()


def _write_owner(staging: Path) -> None:
    owner = {"host": socket.gethostname(), "pid": os.getpid()}
    with (staging / OWNER_FILE).open("x", encoding="utf-8") as stream:
        stream.write(json.dumps(owner))


def remove_abandoned_staging(target: Path) -> list[Path]:
    """Delete `.NAME.partial-*` staging folders beside `target` whose writer is gone: written on
    this host by a process that no longer runs. Folders without a readable owner (made by an
    older gptneo-onnx) or of a live process are kept, and so is a `.NAME.old-*` folder (a kill
    between the two renames leaves the previous export there, its only copy). Returns what was
    deleted."""
    removed = []
    inside = sorted(target.glob(f".{target.name}{STAGING_INFIX}*")) if target.is_dir() else []
    for folder in [*sorted(target.parent.glob(f".{target.name}.partial-*")), *inside]:
        owner_file = folder / OWNER_FILE
        if folder.is_symlink() or not folder.is_dir() or owner_file.is_symlink():
            continue
        try:
            owner = json.loads(owner_file.read_text(encoding="utf-8"))
            host, pid = owner["host"], int(owner["pid"])
        except (OSError, ValueError, KeyError, TypeError):
            continue
        if host == socket.gethostname() and not _process_running(pid):
            shutil.rmtree(folder)  # removes links themselves, never what they point to
            removed.append(folder)
    return removed


def _process_running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # it runs, as another user
        return True
    return True


def _move_into_place(staging: Path, target: Path, overwrite: bool) -> None:
    """Rename the finished staging folder to `target`, replacing what is there (checked again)."""
    if not (target.exists() or target.is_symlink()):
        staging.rename(target)
        return
    check_output_folder(target, overwrite)  # it may have changed while the export ran
    os.chmod(staging, stat.S_IMODE(target.stat().st_mode))  # the replaced folder's mode stays
    retired = _fresh_folder(target.parent, f".{target.name}.old-")
    target.rename(retired / target.name)
    try:
        staging.rename(target)
    except BaseException:
        (retired / target.name).rename(target)  # put the previous export back
        retired.rmdir()
        raise
    shutil.rmtree(retired)  # removes links themselves, never what they point to


def _fresh_folder(parent: Path, prefix: str) -> Path:
    """A new folder `parent/prefix<random>`, made by this call (mkdir fails if the name exists)."""
    while True:
        path = parent / f"{prefix}{secrets.token_hex(4)}"
        try:
            path.mkdir()
        except FileExistsError:
            continue
        return path


def write_json(folder: Path, name: str, data: dict) -> Path:
    """Write `folder/name` atomically through a new temporary file: readers see the old or the new
    file, never half of one, and an existing link at `name` is replaced, not followed."""
    path = folder / name
    temporary = folder / f".{name}.{secrets.token_hex(4)}.tmp"
    try:
        with temporary.open("x", encoding="utf-8") as stream:  # "x": never an existing file or link
            stream.write(json.dumps(data, indent=2) + "\n")
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    return path
