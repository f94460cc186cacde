"""Execution providers: pick one, build its options, and report the one that actually runs."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import onnxruntime as ort

from gptneo_onnx.provider_options import GRAPH_OPTIMIZATION_LEVELS, ProviderOptions
from gptneo_onnx.runtime.errors import ExportFolderError, ProviderError

# Our short names, in `auto`'s order of preference, and onnxruntime's names for them.
PROVIDER_NAMES = {
    "tensorrt": "TensorrtExecutionProvider",
    "cuda": "CUDAExecutionProvider",
    "cpu": "CPUExecutionProvider",
}
SHORT_NAMES = {ort_name: short for short, ort_name in PROVIDER_NAMES.items()}
_LEVEL = ort.GraphOptimizationLevel
_ORT_LEVELS = (
    _LEVEL.ORT_DISABLE_ALL,
    _LEVEL.ORT_ENABLE_BASIC,
    _LEVEL.ORT_ENABLE_EXTENDED,
    _LEVEL.ORT_ENABLE_ALL,
)
OPTIMIZATION_LEVELS = dict(zip(GRAPH_OPTIMIZATION_LEVELS, _ORT_LEVELS, strict=True))  # in the same order


def available_providers() -> list[str]:
    """Our short names of the providers this onnxruntime build offers, best first."""
    offered = set(ort.get_available_providers())
    return [short for short, ort_name in PROVIDER_NAMES.items() if ort_name in offered]


def resolve_provider(name: str) -> str:
    """Turn `auto` or an explicit short name into the short name to use; errors list what exists."""
    available = available_providers()
    key = name.lower()
    if key == "auto":
        return available[0] if available else "cpu"
    if key not in PROVIDER_NAMES:
        raise ProviderError(
            f"unknown provider {name!r}; expected auto, {', '.join(PROVIDER_NAMES)}. "
            f"Available here: {', '.join(available) or 'none'}"
        )
    if key not in available:
        raise ProviderError(
            f"provider {key!r} ({PROVIDER_NAMES[key]}) is not available in this onnxruntime build; "
            f"available: {', '.join(available)} "
            f"(onnxruntime reports {', '.join(ort.get_available_providers())}). "
            + ("Install onnxruntime-gpu (`pip install gptneo-onnx[gpu]`)" if key != "cpu" else "")
        )
    return key


def provider_list(short_name: str, options: ProviderOptions) -> list[tuple[str, dict[str, Any]]]:
    """The (provider, options) list for an InferenceSession: the choice, then its fallbacks."""
    cuda = (
        "CUDAExecutionProvider",
        {"device_id": options.device_id, "use_tf32": str(int(options.cuda_tf32))},
    )
    cpu = ("CPUExecutionProvider", {})
    if short_name == "cpu":
        return [cpu]
    if short_name == "cuda":
        return [cuda, cpu]
    trt: dict[str, Any] = {"device_id": options.device_id, "trt_fp16_enable": options.trt_fp16}
    if options.trt_engine_cache_dir is not None:
        cache_dir = Path(options.trt_engine_cache_dir)
        cache_dir.mkdir(parents=True, exist_ok=True)
        trt.update(trt_engine_cache_enable=True, trt_engine_cache_path=str(cache_dir))
    # TensorRT hands the nodes it cannot build to CUDA, then to CPU.
    return [("TensorrtExecutionProvider", trt), cuda, cpu]


def max_intra_op_threads() -> int:
    """The most intra-op threads a session may ask for: 4 per core. More only adds contention (and
    onnxruntime starts every thread up front: 100000 of them hang the process)."""
    return 4 * (os.cpu_count() or 1)


def check_options(options: ProviderOptions) -> None:
    """Threads and device id in range, before onnxruntime sees them."""
    threads, limit = options.intra_op_threads, max_intra_op_threads()
    if threads is not None and (not _is_int(threads) or not 0 <= threads <= limit):
        raise ProviderError(
            f"intra_op_threads must be an integer from 0 (onnxruntime's default) to {limit} "
            f"(4 x this machine's {os.cpu_count()} cores), got {threads!r}"
        )
    if not _is_int(options.device_id) or options.device_id < 0:
        raise ProviderError(f"device_id must be a GPU index >= 0, got {options.device_id!r}")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def session_options(options: ProviderOptions) -> ort.SessionOptions:
    settings = ort.SessionOptions()
    # Errors only: onnxruntime warns on every load that `num_logits_to_keep` (an input with a
    # default, docs/sidecar.md) is not folded as a constant, which is the point of it.
    settings.log_severity_level = 3
    check_options(options)
    if options.intra_op_threads is not None:
        settings.intra_op_num_threads = options.intra_op_threads
    level = options.graph_optimization_level
    if level not in OPTIMIZATION_LEVELS:
        raise ProviderError(
            f"unknown graph_optimization_level {level!r}; expected one of {', '.join(OPTIMIZATION_LEVELS)}"
        )
    settings.graph_optimization_level = OPTIMIZATION_LEVELS[level]
    return settings


def create_session(graph_path: Path, options: ProviderOptions) -> tuple[ort.InferenceSession, str]:
    """An InferenceSession on the requested provider, and the short name of the one that runs.

    Asking explicitly for a GPU provider that onnxruntime cannot start (missing CUDA libraries,
    no device) is an error, never a silent fall back to CPU. With `auto` the fall back is
    allowed, and the returned name says what runs.
    """
    short_name = resolve_provider(options.provider)
    providers = provider_list(short_name, options)
    settings = session_options(options)
    try:
        session = ort.InferenceSession(
            str(graph_path),
            sess_options=settings,
            providers=[name for name, _ in providers],
            provider_options=[settings for _, settings in providers],
        )
    except Exception as error:  # onnxruntime's pybind errors share no public base class
        raise ExportFolderError(
            f"onnxruntime could not load {graph_path} on {short_name}: {error}; "
            "the file may be damaged (load with verify_hashes=True to check it) or need a newer onnxruntime"
        ) from error
    running = SHORT_NAMES.get(session.get_providers()[0], session.get_providers()[0])
    if running != short_name and options.provider.lower() != "auto":
        raise ProviderError(
            f"asked for {short_name!r} but onnxruntime started {running!r} (providers: "
            f"{', '.join(session.get_providers())}); check the GPU drivers and the CUDA/TensorRT libraries, "
            "or ask for provider='cpu'"
        )
    return session, running


def gpu_attention_advice(manifest: dict, provider: str) -> str | None:
    """A warning for fp32 fused attention on a GPU: onnxruntime's GroupQueryAttention has CUDA
    kernels for fp16/bf16 only, so it runs fp32 GQA on the CPU and copies the KV cache between
    host and device on every step, which makes decoding slower than the portable graph and the
    gap grows with the sequence (docs/runtime.md has the figures)."""
    attention = (manifest.get("optimization") or {}).get("attention")
    if provider not in ("cuda", "tensorrt") or attention != "GroupQueryAttention":
        return None
    if manifest.get("precision") != "float32":
        return None
    return (
        "this optimized float32 export runs GroupQueryAttention on the CPU under CUDA (onnxruntime "
        "has GPU kernels for float16 only); for GPUs export with --optimize --precision float16, "
        "or use the portable flavor for float32"
    )
