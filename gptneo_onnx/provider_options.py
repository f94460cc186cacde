"""ProviderOptions: how `Model.load` runs a graph, and the one list of the CLI's provider flags.

Light on purpose (no onnxruntime import): the CLI builds its flags from these fields at parse
time (gptneo_onnx.cli.provider_flags); gptneo_onnx.runtime.providers turns them into a session.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

# onnxruntime's graph optimization levels, by our names (runtime/providers.py maps them).
GRAPH_OPTIMIZATION_LEVELS = ("disable", "basic", "extended", "all")


def _option(default: Any, text: str, flag: str | None = None, **argparse_settings: Any) -> Any:
    """A ProviderOptions field: its default, the help text and flag name of its CLI flag, and
    argparse settings such as `minimum` or `choices` (read by gptneo_onnx.cli.provider_flags)."""
    return field(default=default, metadata={"help": text, "flag": flag, **argparse_settings})


@dataclass(frozen=True)
class ProviderOptions:
    """How to run a graph: provider, its options, and session settings.

    The one list of these options: `Model.load` takes them as `options=` or as keywords, and
    the CLI's provider flags are generated from these fields (their metadata holds the help).
    """

    provider: str = _option(
        "auto", "auto (TensorRT > CUDA > CPU, what this install has), cpu, cuda, tensorrt"
    )
    device_id: int = _option(0, "GPU index (CUDA and TensorRT)", minimum=0)
    trt_fp16: bool = _option(False, "TensorRT: build fp16 engines")
    trt_engine_cache_dir: str | Path | None = _option(
        None, "TensorRT: engine cache folder", flag="--trt-engine-cache", metavar="DIR"
    )
    cuda_tf32: bool = _option(
        False, "CUDA: TF32 matmuls (faster on Ampere and later, but fp32 logits move ~1e-3 off the reference)"
    )
    intra_op_threads: int | None = _option(
        None, "intra-op threads, at most 4 per core (default: onnxruntime's, one per core)",
        flag="--threads", minimum=1, metavar="N",
    )  # fmt: skip
    graph_optimization_level: str = _option(
        "all", "onnxruntime graph optimization level", flag="--optimization-level",
        choices=GRAPH_OPTIMIZATION_LEVELS,
    )  # fmt: skip

    @classmethod
    def names(cls) -> tuple[str, ...]:
        return tuple(item.name for item in fields(cls))

    @classmethod
    def split(cls, keywords: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
        """`keywords` parted into (provider options, the rest)."""
        names = set(cls.names())
        return (
            {key: value for key, value in keywords.items() if key in names},
            {key: value for key, value in keywords.items() if key not in names},
        )
