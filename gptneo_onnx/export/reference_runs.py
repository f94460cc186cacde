"""The reference model's side of parity validation: its outputs on the validation batch, in a
chosen precision (float64 for the truth, the export's precision for its own rounding).

`computing_in` runs a model in another dtype without copying it: each leaf module is cast just
before it runs and cast back right after, so at most one layer's weights exist twice, whatever
the model's size. float32 -> float64 -> float32 is exact, so the model is unchanged afterwards.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch


@dataclass(frozen=True)
class Output:
    """One output of the reference, and which of its elements are compared.

    keep: a (B, S) mask of real (non-pad) tokens, or None for all; cache: a (B, H, T, D) cache
    tensor, compared as (B, T, H, D) rows; top1: its argmax over the last axis is checked; group:
    the outputs whose rounding is measured together (one step's cache rows, all layers)."""

    values: np.ndarray  # float64
    keep: np.ndarray | None
    top1: bool
    group: str
    cache: bool = False

    def select(self, array: np.ndarray) -> np.ndarray:
        return array if self.keep is None else array[self.keep]


@contextmanager
def computing_in(model: torch.nn.Module, dtype: torch.dtype) -> Iterator[None]:
    """Run `model` in `dtype` inside the block (floating inputs of each leaf are cast too)."""
    leaves = [m for m in model.modules() if next(m.parameters(recurse=False), None) is not None]
    original = {id(m): next(m.parameters(recurse=False)).dtype for m in leaves}

    def before(module, args):
        module.to(dtype)
        return tuple(a.to(dtype) if torch.is_tensor(a) and a.is_floating_point() else a for a in args)

    def after(module, args, output):
        module.to(original[id(module)])

    hooks = [leaf.register_forward_pre_hook(before) for leaf in leaves]
    hooks += [leaf.register_forward_hook(after) for leaf in leaves]
    try:
        yield
    finally:
        for hook in hooks:
            hook.remove()
        for leaf in leaves:
            leaf.to(original[id(leaf)])


def positions(mask: np.ndarray, query_length: int) -> np.ndarray:
    """Position ids that skip left padding (cumsum of the mask minus one, at least 0). (B, S)"""
    return np.maximum(np.cumsum(mask, axis=1) - 1, 0)[:, -query_length:]


def _numpy(tensor: torch.Tensor) -> np.ndarray:
    return tensor.detach().to(torch.float64).numpy()


@torch.no_grad()
def reference_causal_lm(
    model, cache: dict, ids: np.ndarray, mask: np.ndarray, steps: tuple[int, ...], dtype: torch.dtype
) -> dict[str, Output]:
    """Logits and presents of each step (`steps`: new tokens per step), named as the export's
    outputs (`step{i}.{name}`). Windowed local layers (`cache.local_window`) are compared on the
    rows the export returns for them: the newest `min_rows` past rows plus the new ones."""
    config = model.config
    batch = ids.shape[0]
    empty = torch.zeros((batch, config.num_heads, 0, config.head_dim), dtype=dtype)
    past = [(empty, empty) for _ in range(config.num_layers)]
    local_window = cache.get("local_window")
    windowed = {layer["layer"] for layer in cache["layers"] if local_window and layer.get("window")}
    local_rows, start, outputs = 0, 0, {}
    for step, size in enumerate(steps):
        chunk, step_mask = ids[:, start : start + size], mask[:, : start + size]
        pos = positions(step_mask, size)
        logits, past = model(
            torch.from_numpy(chunk), torch.from_numpy(step_mask), torch.from_numpy(pos), past
        )
        keep = step_mask[:, -size:].astype(bool)
        outputs[f"step{step}.logits"] = Output(_numpy(logits), keep, top1=True, group=f"step{step}.logits")
        for layer, (key, value) in zip(cache["layers"], past):
            rows = local_rows + size if layer["layer"] in windowed else step_mask.shape[1]
            visible = step_mask[:, -rows:].astype(bool)  # (B, rows): cache rows of real tokens only
            for tensor, name in ((key, layer["present_key"]), (value, layer["present_value"])):
                values = _numpy(tensor[:, :, -rows:]).transpose(0, 2, 1, 3)  # (B, rows, H, D)
                outputs[f"step{step}.{name}"] = Output(
                    values, visible, False, f"step{step}.present", cache=True
                )
        if local_window:
            local_rows = min(local_rows + size, local_window["min_rows"])
        start += size
    return outputs


@torch.no_grad()
def reference_single_pass(model, manifest: dict, ids: np.ndarray, mask: np.ndarray) -> dict[str, Output]:
    """The outputs of a head without a cache, named as the manifest's outputs."""
    expected = model(torch.from_numpy(ids), torch.from_numpy(mask))
    expected = expected if isinstance(expected, tuple) else (expected,)
    top1 = manifest["task"] != "base"
    outputs = {}
    for spec, tensor in zip(manifest["outputs"], expected, strict=True):
        values = _numpy(tensor)
        per_token = values.ndim >= 2 and values.shape[:2] == ids.shape
        # question answering: (B, S) start/end scores, argmax over all positions
        keep = mask.astype(bool) if per_token and manifest["task"] != "question-answering" else None
        outputs[spec["name"]] = Output(values, keep, top1, group=spec["name"])
    return outputs
