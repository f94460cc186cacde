"""What every KV cache of one export shares (`CacheSpec`), read from its sidecar."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import onnxruntime as ort

from gptneo_onnx.runtime.local_window import LocalWindow
from gptneo_onnx.runtime.manifest import Manifest

Device = tuple[str, int]  # onnxruntime's device name and id: ("cpu", 0), ("cuda", 1)


@dataclass(frozen=True)
class CacheSpec:
    """What every cache of one export shares: IO names, shape, dtype, windowing and device."""

    names: tuple[tuple[str, str], ...]  # (past input, present output), per layer key and value
    num_heads: int
    head_dim: int
    dtype: np.dtype
    logits: str  # the logits output
    vocab_size: int
    local: LocalWindow | None = None
    device: Device = ("cpu", 0)
    num_logits_to_keep: str | None = None  # the input (format x.2): logits of the last K positions only

    @classmethod
    def from_manifest(cls, manifest: Manifest, device: Device = ("cpu", 0)) -> CacheSpec:
        names = tuple(
            pair
            for layer in manifest.cache_layers
            for pair in ((layer.past_key, layer.present_key), (layer.past_value, layer.present_value))
        )
        model = manifest.model
        return cls(
            names=names,
            num_heads=int(model["num_heads"]),
            head_dim=int(model["head_dim"]),
            dtype=np.dtype(manifest.cache_dtype),
            logits=str(manifest.io["logits"]),
            vocab_size=manifest.vocab_size,
            local=manifest.local_window,
            device=device,
            num_logits_to_keep=manifest.io.get("num_logits_to_keep"),
        )

    @property
    def on_host(self) -> bool:
        return self.device[0] == "cpu"

    @property
    def bytes_per_token(self) -> int:
        """Cache bytes one row needs per token: keys and values of every layer."""
        return len(self.names) * self.num_heads * self.head_dim * self.dtype.itemsize

    def output_names(self) -> list[str]:
        return [self.logits, *(present for _, present in self.names)]

    def is_local(self, name: str) -> bool:
        return self.local is not None and name in self.local.past_names

    def logits_rows(self, feeds: dict[str, Any], new: int) -> int:
        """Positions the graph returns logits for: the last `num_logits_to_keep` if fed (0: all)."""
        keep = int(feeds.get(self.num_logits_to_keep, 0)) if self.num_logits_to_keep else 0
        return min(keep, new) if keep else new


def bind_host_inputs(binding: ort.IOBinding, feeds: dict[str, np.ndarray]) -> list[ort.OrtValue]:
    """Bind host arrays as inputs. Through OrtValues: `bind_cpu_input` can't find inputs that
    have a default (`num_logits_to_keep`). Keep the returned values until the run is done."""
    values = [
        ort.OrtValue.ortvalue_from_numpy(np.require(array, requirements="C")) for array in feeds.values()
    ]
    for name, value in zip(feeds, values, strict=True):
        binding.bind_ortvalue_input(name, value)
    return values
