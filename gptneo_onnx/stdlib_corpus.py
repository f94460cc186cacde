"""The Python standard library's own sources as a code corpus: discovery, split, windows.

Shared by `scripts/train_default_model.py` and `scripts/evaluate_default_model.py` (run them
with the package installed, `pip install -e .`).
"""

from __future__ import annotations

import hashlib
import json
import sysconfig
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer

# Directory names skipped anywhere in a path: installed packages, test suites, and
# packages that are mostly data or prose rather than library code.
SKIPPED_DIRECTORIES = frozenset(
    {"site-packages", "test", "tests", "idlelib", "lib2to3", "pydoc_data", "__pycache__"}
)
VALIDATION_MODULUS = 20  # a file is held out when sha1(relpath) % 20 == 0, about 5%
SPLIT_RULE = "int(sha1(relpath.encode('utf-8')).hexdigest(), 16) % 20 == 0 -> validation"


@dataclass(frozen=True)
class CorpusSplit:
    """Sorted relative paths (POSIX style, relative to the stdlib root) per split."""

    train: list[str]
    validation: list[str]


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def is_skipped(relpath: str) -> bool:
    return any(part in SKIPPED_DIRECTORIES for part in relpath.split("/")[:-1])


def load_sources(root: Path) -> dict[str, str]:
    """Read every kept `.py` file under `root`, keyed by sorted relative path.

    Files are decoded from bytes, so line endings are kept exactly; files that are not
    valid UTF-8 are skipped.
    """
    sources: dict[str, str] = {}
    relpaths = sorted(path.relative_to(root).as_posix() for path in root.rglob("*.py"))
    for relpath in relpaths:
        if is_skipped(relpath):
            continue
        try:
            sources[relpath] = (root / relpath).read_bytes().decode("utf-8")
        except UnicodeDecodeError:
            continue
    return sources


def is_validation(relpath: str) -> bool:
    digest = hashlib.sha1(relpath.encode("utf-8")).hexdigest()
    return int(digest, 16) % VALIDATION_MODULUS == 0


def split_sources(relpaths: Iterable[str]) -> CorpusSplit:
    ordered = sorted(relpaths)
    return CorpusSplit(
        train=[path for path in ordered if not is_validation(path)],
        validation=[path for path in ordered if is_validation(path)],
    )


def corpus_fingerprint(sources: Mapping[str, str]) -> str:
    """SHA-256 over sorted paths and contents: equal fingerprints mean an equal corpus."""
    digest = hashlib.sha256()
    for relpath in sorted(sources):
        digest.update(relpath.encode("utf-8") + b"\0")
        digest.update(sources[relpath].encode("utf-8") + b"\0")
    return digest.hexdigest()


def write_split(path: Path, split: CorpusSplit, sources: Mapping[str, str]) -> None:
    """Write the validation file list and counts, so evaluation is reproducible."""
    record = {
        "stdlib_root": str(stdlib_root()),
        "rule": SPLIT_RULE,
        "skipped_directories": sorted(SKIPPED_DIRECTORIES),
        "train_files": len(split.train),
        "validation_files": len(split.validation),
        "train_chars": sum(len(sources[p]) for p in split.train),
        "validation_chars": sum(len(sources[p]) for p in split.validation),
        "corpus_sha256": corpus_fingerprint(sources),
        "validation": split.validation,
    }
    path.write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")


def read_validation_paths(path: Path) -> list[str]:
    record = json.loads(path.read_text(encoding="utf-8"))
    if "validation" not in record:
        raise ValueError(f"{path} has no 'validation' list; rerun train_default_model.py")
    return list(record["validation"])


def encode_documents(tokenizer: Tokenizer, texts: list[str], separator_id: int) -> np.ndarray:
    """Token ids of all `texts`, in order, with `separator_id` between documents."""
    encodings = tokenizer.encode_batch(texts, add_special_tokens=False)
    pieces: list[list[int]] = []
    for index, encoding in enumerate(encodings):
        if index > 0:
            pieces.append([separator_id])
        pieces.append(encoding.ids)
    return np.fromiter((i for piece in pieces for i in piece), dtype=np.int64)


def chop_windows(ids: np.ndarray, window: int, max_windows: int | None = None) -> np.ndarray:
    """Non-overlapping `(n, window)` windows from the start of `ids`; the tail is dropped."""
    count = len(ids) // window
    if max_windows is not None:
        count = min(count, max_windows)
    if count == 0:
        raise ValueError(f"need at least {window} tokens for one window, got {len(ids)}")
    return ids[: count * window].reshape(count, window)


def validation_ids(model_folder: Path, sources: Mapping[str, str] | None = None) -> np.ndarray:
    """Token ids of the held-out stdlib files, tokenized with the model's tokenizer.json: the
    files `split.json` names when the folder has one (all must exist), else the split rule."""
    sources = load_sources(stdlib_root()) if sources is None else sources
    split_file = model_folder / "split.json"
    if split_file.is_file():
        paths = read_validation_paths(split_file)
        missing = [path for path in paths if path not in sources]
        if missing:
            raise FileNotFoundError(
                f"validation files {missing[:3]} are not in {stdlib_root()}; evaluate with the "
                "Python version that trained the model (see training.json)"
            )
    else:
        paths = split_sources(sources).validation
    tokenizer = Tokenizer.from_file(str(model_folder / "tokenizer.json"))
    separator = tokenizer.token_to_id("<|endoftext|>")
    return encode_documents(
        tokenizer, [sources[path] for path in paths], 0 if separator is None else separator
    )


def validation_windows(model_folder: Path, window: int, max_windows: int | None = None) -> np.ndarray:
    """`validation_ids` chopped into non-overlapping (N, window) token windows."""
    return chop_windows(validation_ids(model_folder), window, max_windows)
