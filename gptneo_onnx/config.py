"""GPT-Neo configuration, read from a Hugging Face `config.json` without importing torch."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gptneo_onnx.contract import ACTIVATIONS, UNSUPPORTED_ACTIVATIONS

ATTENTION_TYPES = ("global", "local")


class ConfigError(ValueError):
    """A GPT-Neo configuration that is inconsistent or uses something unsupported."""


def expand_attention_types(attention_types: list) -> list[str]:
    """Expand run-length encoded `[[["global", "local"], 12]]` into one type per layer."""
    layers: list[str] = []
    for item in attention_types:
        if not (isinstance(item, (list, tuple)) and len(item) == 2 and isinstance(item[1], int)):
            raise ConfigError(
                f"attention_types entries must look like [['global', 'local'], repeat], got {item!r}"
            )
        pattern, repeat = item
        for name in pattern:
            if name not in ATTENTION_TYPES:
                raise ConfigError(
                    f"unknown attention type {name!r}; expected one of {', '.join(ATTENTION_TYPES)}"
                )
        layers.extend(list(pattern) * repeat)
    return layers


@dataclass
class GPTNeoConfig:
    """Every field of transformers' GPTNeoConfig, with GPT-Neo's defaults and derived fields."""

    vocab_size: int = 50257
    max_position_embeddings: int = 2048
    hidden_size: int = 2048
    num_layers: int = 24
    attention_types: list = field(default_factory=lambda: [[["global", "local"], 12]])
    num_heads: int = 16
    intermediate_size: int | None = None
    window_size: int = 256
    activation_function: str = "gelu_new"
    resid_dropout: float = 0.0
    embed_dropout: float = 0.0
    attention_dropout: float = 0.0
    classifier_dropout: float = 0.1
    layer_norm_epsilon: float = 1e-5
    initializer_range: float = 0.02
    use_cache: bool = True
    bos_token_id: int | None = 50256
    eos_token_id: int | list[int] | None = 50256
    pad_token_id: int | None = None
    id2label: dict[int, str] | None = None
    label2id: dict[str, int] | None = None
    num_labels: int | None = None

    def __post_init__(self) -> None:
        self.attention_layers = expand_attention_types(self.attention_types)
        if len(self.attention_layers) != self.num_layers:
            raise ConfigError(
                f"attention_types expand to {len(self.attention_layers)} layers but num_layers is "
                f"{self.num_layers}; fix the repeat counts in attention_types"
            )
        if self.num_heads <= 0 or self.hidden_size % self.num_heads:
            raise ConfigError(
                f"hidden_size ({self.hidden_size}) must be divisible by num_heads ({self.num_heads})"
            )
        if self.activation_function in UNSUPPORTED_ACTIVATIONS:
            raise ConfigError(
                f"activation {self.activation_function!r} has learned parameters and is not supported"
            )
        if self.activation_function not in ACTIVATIONS:
            raise ConfigError(
                f"unknown activation_function {self.activation_function!r}; "
                f"expected one of {', '.join(ACTIVATIONS)}"
            )
        if "local" in self.attention_layers and self.window_size < 1:
            raise ConfigError(f"window_size must be >= 1 for local layers, got {self.window_size}")
        self._normalize_labels()

    def _normalize_labels(self) -> None:
        if self.id2label is not None:
            self.id2label = {int(k): str(v) for k, v in self.id2label.items()}
        if self.num_labels is None:
            self.num_labels = len(self.id2label) if self.id2label else 2
        if self.id2label is None:
            self.id2label = {i: f"LABEL_{i}" for i in range(self.num_labels)}
        if len(self.id2label) != self.num_labels:
            raise ConfigError(
                f"num_labels is {self.num_labels} but id2label has {len(self.id2label)} entries"
            )
        if self.label2id is None:
            self.label2id = {label: i for i, label in self.id2label.items()}
        self.label2id = {str(k): int(v) for k, v in self.label2id.items()}

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def inner_size(self) -> int:
        """The MLP width: intermediate_size, or 4 * hidden_size when it is None."""
        return self.intermediate_size if self.intermediate_size is not None else 4 * self.hidden_size

    def layer_window(self, layer: int) -> int | None:
        """The local window of a layer, or None for a global layer."""
        return self.window_size if self.attention_layers[layer] == "local" else None

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> GPTNeoConfig:
        data = dict(data)
        model_type = data.get("model_type", "gpt_neo")
        if model_type != "gpt_neo":
            raise ConfigError(f"expected a GPT-Neo config (model_type 'gpt_neo'), got {model_type!r}")
        # transformers' aliases
        if "num_attention_heads" in data:
            data.setdefault("num_heads", data.pop("num_attention_heads"))
        if "num_hidden_layers" in data:
            data.setdefault("num_layers", data.pop("num_hidden_layers"))
        known = set(cls.__dataclass_fields__)
        return cls(**{key: value for key, value in data.items() if key in known})

    @classmethod
    def from_json_file(cls, path: str | Path) -> GPTNeoConfig:
        """Read a checkpoint's config.json, which must say `"model_type": "gpt_neo"`."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"no config.json at {path}")
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as error:
            raise ConfigError(f"{path} is not valid JSON: {error}") from error
        if not isinstance(data, dict) or data.get("model_type") != "gpt_neo":
            found = data.get("model_type") if isinstance(data, dict) else None
            raise ConfigError(
                f"{path} has model_type {found!r}; only GPT-Neo checkpoints (model_type 'gpt_neo') "
                "are loaded, and no checkpoint code is ever run"
            )
        try:
            return cls.from_dict(data)
        except (ConfigError, TypeError) as error:
            raise ConfigError(f"{path}: {error}") from error

    @classmethod
    def from_transformers(cls, hf_config: Any) -> GPTNeoConfig:
        """Build from a `transformers.GPTNeoConfig` object."""
        return cls.from_dict(hf_config.to_dict())

    def to_dict(self) -> dict[str, Any]:
        """The config.json fields, in Hugging Face's spelling."""
        data = {name: getattr(self, name) for name in self.__dataclass_fields__}
        data["id2label"] = {str(k): v for k, v in self.id2label.items()}
        data["model_type"] = "gpt_neo"
        return data
