"""Load Hugging Face GPT-Neo checkpoints into the reference model, strictly and safely.

Weights come from safetensors when the checkpoint has them; `.bin` pickles are read only with
`torch.load(weights_only=True)`; Flax-only checkpoints (`flax_model.msgpack`) are read with msgpack
and numpy (reference/flax_checkpoint.py). Every tensor must be consumed, every shape must match
and every value must be finite. No
code from a checkpoint ever runs: there is no `trust_remote_code`, and hub downloads fetch no
`.py` files. A truncated or corrupt file is a `CheckpointError` that names it.
"""

from __future__ import annotations

import json
import pickle
import re
from pathlib import Path, PurePosixPath
from typing import Any

import torch
from torch import nn

from gptneo_onnx.config import GPTNeoConfig
from gptneo_onnx.errors import CheckpointError
from gptneo_onnx.reference.heads import TASK_CLASSES, TASKS

# Buffers that old transformers versions saved; they are derived from the config, not weights.
DERIVED_BUFFERS = re.compile(r"\.attn\.attention\.(bias|masked_bias)$")
HEAD_PREFIXES = ("transformer.", "lm_head.", "score.", "classifier.", "qa_outputs.")
HF_CLASS_TASKS = {
    "GPTNeoModel": "base",
    "GPTNeoForCausalLM": "causal-lm",
    "GPTNeoForSequenceClassification": "sequence-classification",
    "GPTNeoForTokenClassification": "token-classification",
    "GPTNeoForQuestionAnswering": "question-answering",
}
# What a hub download fetches: never code (*.py); pickles (*.bin) only when there are no safetensors,
# Flax msgpack only when there is neither.
HUB_PATTERNS = ["*.json", "*.safetensors", "tokenizer*", "*.txt"]
# (single file, shard index), in order of preference: safetensors first.
WEIGHT_FILES = (
    ("model.safetensors", "model.safetensors.index.json"),
    ("pytorch_model.bin", "pytorch_model.bin.index.json"),
    ("flax_model.msgpack", "flax_model.msgpack.index.json"),
)


def reference_name(checkpoint_name: str) -> str | None:
    """Map a transformers tensor name to the reference model's, or None for a derived buffer."""
    if DERIVED_BUFFERS.search(checkpoint_name):
        return None
    name = checkpoint_name.replace(".attn.attention.", ".attn.")
    if not name.startswith(HEAD_PREFIXES):
        name = "transformer." + name  # a bare GPTNeoModel checkpoint
    return name


def build_model(config: GPTNeoConfig, task: str = "causal-lm") -> nn.Module:
    if task not in TASK_CLASSES:
        raise ValueError(f"unknown task {task!r}; expected one of {', '.join(TASKS)}")
    return TASK_CLASSES[task](config).eval()


def load_weights(model: nn.Module, tensors: dict[str, torch.Tensor]) -> None:
    """Copy checkpoint tensors into the model; any missing, unexpected or misshapen one is an error."""
    expected = model.state_dict()
    tied = "lm_head.weight"  # the same Parameter as transformer.wte.weight
    mapped: dict[str, torch.Tensor] = {}
    for checkpoint_name, tensor in tensors.items():
        name = reference_name(checkpoint_name)
        if name is None:
            continue
        if name == tied:
            wte = tensors.get("transformer.wte.weight", tensors.get("wte.weight"))
            if wte is None or not torch.equal(tensor, wte):
                raise CheckpointError("lm_head.weight differs from the token embedding; GPT-Neo ties them")
            continue
        if name not in expected:
            raise CheckpointError(f"unexpected tensor {checkpoint_name!r} in checkpoint")
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
            raise CheckpointError(
                f"tensor {checkpoint_name!r} holds NaN or Inf values; the checkpoint is damaged or "
                "its training diverged"
            )
        if tuple(tensor.shape) != tuple(expected[name].shape):
            raise CheckpointError(
                f"tensor {checkpoint_name!r} has shape {tuple(tensor.shape)}, "
                f"the config expects {tuple(expected[name].shape)}"
            )
        mapped[name] = tensor.to(expected[name].dtype)
    missing = sorted(set(expected) - set(mapped) - {tied})
    if missing:
        raise CheckpointError(f"checkpoint lacks {len(missing)} tensor(s): {', '.join(missing[:8])}")
    if tied in expected:
        mapped[tied] = mapped["transformer.wte.weight"]
    model.load_state_dict(mapped, strict=True)


def read_checkpoint_tensors(folder: Path) -> dict[str, torch.Tensor]:
    """All tensors of a checkpoint folder: safetensors first, then weights-only pickles, then Flax."""
    tensors: dict[str, torch.Tensor] = {}
    for file in weight_files(folder):
        tensors.update(read_weight_file(file))
    return tensors


def weight_files(folder: Path) -> list[Path]:
    """The files to read: the safetensors when there are any, else the `.bin` pickles, else Flax's."""
    for single, index in WEIGHT_FILES:
        if (folder / index).is_file():
            suffix = Path(single).suffix
            return [folder / shard for shard in _index_shards(folder / index, suffix)]
        if (folder / single).is_file():
            return [folder / single]
    raise FileNotFoundError(
        f"no weights in {folder}: expected model.safetensors, pytorch_model.bin or flax_model.msgpack "
        "(or a sharded index)"
    )


def _index_shards(index: Path, suffix: str) -> list[str]:
    """The shard names of a `*.index.json`: plain file names of the index's own format, all present."""
    try:
        shards = sorted(set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values()))
    except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, AttributeError) as error:
        raise CheckpointError(
            f"{index} is not a valid shard index ({type(error).__name__}: {error}); re-download it"
        ) from error
    for shard in shards:
        if (
            not isinstance(shard, str)
            or len(PurePosixPath(shard.replace("\\", "/")).parts) != 1
            or shard in (".", "..")
            or not shard.endswith(suffix)
        ):
            raise CheckpointError(
                f"{index} lists the shard {shard!r}; shards must be plain {suffix} file names in the "
                "checkpoint folder"
            )
        if not (index.parent / shard).is_file():
            raise CheckpointError(f"{index} lists {shard}, which is missing; re-download the checkpoint")
    return shards


def read_weight_file(file: Path) -> dict[str, torch.Tensor]:
    """One weight file: safetensors, Flax msgpack, or a pickle read with `weights_only=True`. Errors
    name the file."""
    if file.suffix == ".msgpack":
        from gptneo_onnx.reference.flax_checkpoint import read_flax_checkpoint

        return read_flax_checkpoint(file)
    if file.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(str(file))
        except (SafetensorError, OSError) as error:
            raise CheckpointError(
                f"{file} is truncated or corrupt ({error}); re-download or re-save it"
            ) from error
    try:
        tensors = torch.load(file, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        if "weights only" not in str(error).lower():
            raise CheckpointError(f"{file} is truncated or corrupt ({error}); re-download it") from error
        raise CheckpointError(
            f"{file} was refused: it holds pickled objects other than tensors, which could run code, "
            "or it is corrupt (pickles are read only with torch.load(weights_only=True)). Use a "
            "safetensors checkpoint, or convert this one with a tool you trust"
        ) from error
    except Exception as error:  # torch.load raises RuntimeError, EOFError, KeyError, ... on damage
        raise CheckpointError(
            f"{file} is truncated or corrupt ({type(error).__name__}: {error}); re-download it"
        ) from error
    if not isinstance(tensors, dict) or not all(isinstance(v, torch.Tensor) for v in tensors.values()):
        raise CheckpointError(f"{file} does not hold a dict of tensors")
    return tensors


def resolve_checkpoint(path_or_hub_id: str | Path, revision: str | None = None) -> Path:
    """A local folder as is, or a hub id downloaded with huggingface_hub (safetensors preferred)."""
    path = Path(path_or_hub_id)
    if path.is_dir():
        return path
    if path.exists() or str(path_or_hub_id).startswith((".", "/")) or str(path).count("/") > 1:
        raise FileNotFoundError(f"{path_or_hub_id} is not a checkpoint folder")
    from huggingface_hub import list_repo_files, snapshot_download

    repo_id = str(path_or_hub_id)
    try:
        files = list_repo_files(repo_id, revision=revision)
        patterns = list(HUB_PATTERNS)
        if not any(name.endswith(".safetensors") for name in files):
            patterns.append("*.bin" if any(name.endswith(".bin") for name in files) else "*.msgpack")
        return Path(snapshot_download(repo_id, revision=revision, allow_patterns=patterns))
    except Exception as error:  # network, auth, or unknown repo: say which and what to do
        raise FileNotFoundError(
            f"could not fetch {repo_id!r} from the Hugging Face hub ({type(error).__name__}: {error}). "
            "Pass a local checkpoint folder when offline."
        ) from error


def from_pretrained(
    path_or_hub_id: str | Path,
    task: str = "causal-lm",
    dtype: torch.dtype = torch.float32,
    revision: str | None = None,
) -> nn.Module:
    """Load a GPT-Neo checkpoint (local folder or hub id) as the reference model for `task`."""
    folder = resolve_checkpoint(path_or_hub_id, revision)
    config = GPTNeoConfig.from_json_file(folder / "config.json")
    model = build_model(config, task).to(dtype)
    load_weights(model, read_checkpoint_tensors(folder))
    return model


def from_transformers(hf_model: Any, dtype: torch.dtype | None = None) -> nn.Module:
    """Convert an in-memory transformers GPTNeo* model to the reference model."""
    class_name = type(hf_model).__name__
    if class_name not in HF_CLASS_TASKS:
        raise TypeError(f"expected a transformers GPTNeo* model, got {class_name}")
    config = GPTNeoConfig.from_transformers(hf_model.config)
    state = hf_model.state_dict()
    model = build_model(config, HF_CLASS_TASKS[class_name])
    model.to(dtype or next(iter(state.values())).dtype)
    load_weights(model, state)
    return model
