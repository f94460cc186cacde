"""Read Flax checkpoints (`flax_model.msgpack`) with msgpack and numpy only: no jax, no flax.

flax.serialization writes nested string-keyed maps whose leaves are msgpack ExtType code 1,
holding the msgpack array `[shape, dtype name, C-order bytes]`. Arrays over 2^30 bytes are split
into `{"__msgpack_chunked_array__": true, "shape": {"0": ...}, "chunks": {"0": ..., ...}}`, flat
pieces in C order. Names map to transformers' PyTorch names: `a/b/kernel` is the transpose of `a.b.weight`,
`scale` (LayerNorm) and `embedding` are `weight`. Anything else is a CheckpointError that names it.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from gptneo_onnx.errors import CheckpointError

NDARRAY_EXT = 1  # flax's _MsgpackExtType.ndarray; 2 (complex) and 3 (numpy scalar) are not weights
CHUNKED = "__msgpack_chunked_array__"
# Flax leaf name -> (PyTorch leaf name, transpose): Dense kernels are (in, out), nn.Linear is (out, in).
LEAF_NAMES = {
    "kernel": ("weight", True),
    "scale": ("weight", False),
    "embedding": ("weight", False),
    "bias": ("bias", False),
}


def read_flax_checkpoint(file: Path) -> dict[str, torch.Tensor]:
    """The tensors of one `.msgpack` file under transformers' PyTorch names (`transformer.h.0...`)."""
    import msgpack  # the export extra

    try:
        tree = msgpack.unpackb(
            file.read_bytes(), ext_hook=lambda code, data: _ext(file, code, data), raw=False
        )
    except CheckpointError:
        raise
    except (ValueError, TypeError, msgpack.UnpackException) as error:  # ExtraData, FormatError, ...
        raise CheckpointError(
            f"{file} is not a readable Flax msgpack checkpoint, truncated or corrupt "
            f"({type(error).__name__}: {error}); re-download or re-save it"
        ) from error
    if not isinstance(tree, dict):
        raise CheckpointError(f"{file} does not hold a Flax parameter tree (a map at the top)")
    return {_torch_name(file, path): _tensor(file, path, leaf) for path, leaf in _leaves(file, tree, ())}


def _ext(file: Path, code: int, data: bytes) -> np.ndarray:
    if code != NDARRAY_EXT:
        raise CheckpointError(
            f"{file} holds a msgpack extension of type {code}; Flax weights are ndarrays (type {NDARRAY_EXT})"
        )
    import msgpack

    try:
        shape, dtype_name, raw = msgpack.unpackb(data, raw=False)
        shape = tuple(int(size) for size in shape)
    except (ValueError, TypeError, msgpack.UnpackException) as error:
        raise CheckpointError(f"{file} holds a damaged array ({type(error).__name__}: {error})") from error
    return _array(file, shape, dtype_name, raw)


def _array(file: Path, shape: tuple[int, ...], dtype_name: str, raw: bytes) -> np.ndarray:
    """Bytes to a float32 array (bfloat16 is the upper half of a float32; numpy lacks the dtype)."""
    if dtype_name == "bfloat16":
        dtype = np.dtype("<u2")
    elif dtype_name in ("float16", "float32", "float64"):
        dtype = np.dtype(dtype_name).newbyteorder("<")
    else:
        raise CheckpointError(
            f"{file} holds an array of dtype {dtype_name!r}; expected floating-point weights"
        )
    count = int(np.prod(shape, dtype=np.int64))
    if not isinstance(raw, bytes) or len(raw) != count * dtype.itemsize:
        raise CheckpointError(
            f"{file} holds a {dtype_name} array of shape {shape} with {len(raw)} bytes, not "
            f"{count * dtype.itemsize}: the file is truncated or corrupt"
        )
    values = np.frombuffer(raw, dtype=dtype).reshape(shape)
    if dtype_name == "bfloat16":
        return (values.astype(np.uint32) << 16).view(np.float32)
    return values.astype(np.float32)


def _leaves(file: Path, tree: dict, path: tuple[str, ...]):
    """(path, leaf) pairs of the nested maps; a chunked-array map is one leaf."""
    for key, value in tree.items():
        if not isinstance(key, str):
            raise CheckpointError(f"{file} has a non-string key {key!r} under {'/'.join(path) or 'the top'}")
        here = (*path, *key.split("/"))  # sharded checkpoints may hold flattened "a/b/c" keys
        if isinstance(value, dict) and not value.get(CHUNKED):
            yield from _leaves(file, value, here)
        else:
            yield here, value


def _tensor(file: Path, path: tuple[str, ...], leaf) -> torch.Tensor:
    if isinstance(leaf, dict):  # a chunked array: flat chunks, and the shape, as {"0": ..., "1": ...}
        try:
            shape = tuple(int(leaf["shape"][str(i)]) for i in range(len(leaf["shape"])))
            chunks = [leaf["chunks"][str(i)] for i in range(len(leaf["chunks"]))]
            leaf = np.concatenate([chunk.reshape(-1) for chunk in chunks]).reshape(shape)
        except (KeyError, TypeError, ValueError, AttributeError) as error:
            raise CheckpointError(
                f"{file}: the chunked array {'/'.join(path)} is damaged ({type(error).__name__}: {error})"
            ) from error
    if not isinstance(leaf, np.ndarray):
        raise CheckpointError(f"{file}: {'/'.join(path)} is a {type(leaf).__name__}, not an array")
    _, transpose = LEAF_NAMES[path[-1]]
    if transpose and leaf.ndim != 2:
        raise CheckpointError(f"{file}: the kernel {'/'.join(path)} has shape {leaf.shape}; kernels are 2-D")
    return torch.from_numpy(np.ascontiguousarray(leaf.T if transpose else leaf))


def _torch_name(file: Path, path: tuple[str, ...]) -> str:
    if path[-1] not in LEAF_NAMES:
        raise CheckpointError(
            f"{file} has the parameter {'/'.join(path)!r}, which GPT-Neo does not have "
            f"(Flax leaves are {', '.join(LEAF_NAMES)})"
        )
    return ".".join((*path[:-1], LEAF_NAMES[path[-1]][0]))
