"""The export plan: every option of `export()` resolved once, before anything is built.

The graph builder (export/graphs.py, export/optimized.py), the quantizer, the sidecar
(export/sidecar.py) and validation read their decisions from the plan instead of working them
out again: the flavor, whether local layers get a cache window of their own, which attention
kernel each layer runs (and why not the fused one), whether the weights go to external data, and
how they are quantized. A combination of options that cannot be exported is refused here, with
one error, before the first graph node is made.
"""

from __future__ import annotations

from dataclasses import dataclass

from gptneo_onnx.config import GPTNeoConfig
from gptneo_onnx.contract import (
    ACCURACY_LEVEL_RULE,
    ACCURACY_LEVELS,
    BLOCK_SIZE_RULE,
    DEFAULT_ACCURACY_LEVEL,
    DEFAULT_BLOCK_SIZE,
    FLAVORS,
    PRECISIONS,
    QUANTIZATION_METHODS,
    TASKS,
    is_block_size,
)
from gptneo_onnx.errors import QuantizationError
from gptneo_onnx.export.graph_builder import OPSET
from gptneo_onnx.export.layout import external_data_file, graph_file

# Protobuf cannot hold more than 2 GiB; stay clear of it, since the graph itself adds bytes.
EXTERNAL_DATA_THRESHOLD = 1_800_000_000
WEIGHT_BYTES = {"float32": 4, "float16": 2}
FUSED_ATTENTION, PORTABLE_ATTENTION = "GroupQueryAttention", "portable"


@dataclass(frozen=True)
class Quantization:
    """How the weights are quantized once the float32 graph is written (export/quantize.py)."""

    method: str  # a key of QUANTIZATION_METHODS
    block_size: int
    accuracy_level: int  # MatMulNBits' (int4 only)

    def record(self) -> dict:
        """The sidecar's `quantization` object as planned; the quantizer adds what it changed."""
        if self.method == "int8":
            return {"method": QUANTIZATION_METHODS["int8"], "embedding_block_size": self.block_size}
        return {
            "method": QUANTIZATION_METHODS[self.method],
            "block_size": self.block_size,
            "accuracy_level": self.accuracy_level,
        }


@dataclass(frozen=True)
class LayerPlan:
    """One block: its attention window, the kernel that computes it, and the mask it reads."""

    layer: int
    window: int | None  # None: a global layer
    attention: str  # FUSED_ATTENTION or PORTABLE_ATTENTION
    windowed_cache: bool  # reads `local_attention_mask`, so its cache may hold only the newest rows


@dataclass(frozen=True)
class ExportPlan:
    task: str
    precision: str
    flavor: str  # portable or optimized
    opset: int
    external_data: bool
    quantization: Quantization | None
    local_window: int | None  # the windowed local cache's window; None when it is off
    layers: tuple[LayerPlan, ...]
    attention_fallback_reason: str | None  # why an optimized graph computes attention portably
    validate: bool

    @property
    def cached(self) -> bool:
        """The graph takes position ids and a KV cache (causal-lm)."""
        return TASKS[self.task].cached

    @property
    def windowed_local_cache(self) -> bool:
        return self.local_window is not None

    @property
    def fused_attention(self) -> bool:
        return any(layer.attention == FUSED_ATTENTION for layer in self.layers)

    @property
    def quantize(self) -> str | None:
        return self.quantization.method if self.quantization else None

    @property
    def graph_file(self) -> str:
        return graph_file(self.precision, self.quantize)

    @property
    def external_data_file(self) -> str | None:
        return external_data_file(self.graph_file) if self.external_data else None

    @property
    def lm_head_row_views(self) -> bool:
        """The tied lm_head reads the embedding table through row views of the external data.
        Quantization rewrites the lm_head itself (untied, then quantized): no views for it."""
        return self.external_data and self.quantization is None


def fused_attention_problem(config: GPTNeoConfig, task: str = "causal-lm") -> str | None:
    """Why GroupQueryAttention can't serve this config and task, or None when it can."""
    if config.head_dim % 8:
        return f"head_dim {config.head_dim} is not a multiple of 8 (GroupQueryAttention on CPU needs it)"
    if task == "question-answering":
        # QA logits are compared at padded positions too. A padded query sees no real key; the
        # reference then spreads softmax over all keys, GQA only over the causal ones.
        return "question-answering scores padded positions, whose fully masked rows GQA computes differently"
    return None


def local_cache_window(config: GPTNeoConfig, task: str) -> int | None:
    """The local layers' window, when a causal-lm graph can give them their own mask input.

    A local layer attends to the newest `window` tokens only, yet attention reads every cache row
    it is given. With its own mask, `local_attention_mask`, covering just the rows its cache
    holds plus the new tokens, a runner may keep only the newest `window - 1` past rows: keys
    carry no position (GPT-Neo's positions are absolute embeddings), so a suffix that covers the
    window attends exactly like the whole past."""
    if not TASKS[task].cached:
        return None
    windows = {config.layer_window(i) for i in range(config.num_layers)} - {None}
    if len(windows) != 1:  # no local layer (or, never in GPT-Neo, several window sizes)
        return None
    return windows.pop()


def plan_export(
    config: GPTNeoConfig,
    task: str,
    parameter_count: int,
    *,
    precision: str = "float32",
    optimize: bool = False,
    external_data: bool | None = None,
    quantize: str | None = None,
    block_size: int = DEFAULT_BLOCK_SIZE,
    accuracy_level: int = DEFAULT_ACCURACY_LEVEL,
    windowed_local_cache: bool | None = None,
    validate: bool = True,
) -> ExportPlan:
    """Resolve `export()`'s options (see its docstring) for a model of `config` with
    `parameter_count` weights (the tied table counted once). Raises ValueError (QuantizationError
    for the quantization options) on a combination that can't be exported."""
    if task not in TASKS:
        raise ValueError(f"task must be one of {', '.join(TASKS)}, got {task!r}")
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    quantization = _quantization(quantize, precision, block_size, accuracy_level)
    if windowed_local_cache and not TASKS[task].cached:
        raise ValueError(
            "windowed_local_cache applies to causal-lm exports only (they alone keep a KV cache)"
        )
    flavor = FLAVORS[1] if optimize else FLAVORS[0]
    if external_data is None:
        external_data = parameter_count * WEIGHT_BYTES[precision] > EXTERNAL_DATA_THRESHOLD
    # On by default for the optimized flavor; off for the portable one, whose IO then stays exactly
    # Optimum's. A model without local layers has nothing to window.
    windowed = optimize if windowed_local_cache is None else windowed_local_cache
    local_window = local_cache_window(config, task) if windowed else None
    problem = fused_attention_problem(config, task) if optimize else None
    kernel = FUSED_ATTENTION if optimize and problem is None else PORTABLE_ATTENTION
    layers = tuple(
        LayerPlan(
            layer=i,
            window=config.layer_window(i),
            attention=kernel,
            windowed_cache=local_window is not None and config.layer_window(i) is not None,
        )
        for i in range(config.num_layers)
    )
    return ExportPlan(
        task=task,
        precision=precision,
        flavor=flavor,
        opset=OPSET,
        external_data=bool(external_data),
        quantization=quantization,
        local_window=local_window,
        layers=layers,
        attention_fallback_reason=problem,
        validate=validate,
    )


def _quantization(method: str | None, precision: str, block_size: int, accuracy_level: int):
    if method is None:
        return None
    if method not in QUANTIZATION_METHODS:
        raise QuantizationError(f"quantize must be one of {', '.join(QUANTIZATION_METHODS)}, got {method!r}")
    if precision != "float32":
        raise ValueError(f"quantize needs precision='float32' weights to start from, got {precision!r}")
    if not is_block_size(block_size):
        raise QuantizationError(f"block_size must be {BLOCK_SIZE_RULE}, got {block_size}")
    if method == "int4" and accuracy_level not in ACCURACY_LEVELS:
        raise QuantizationError(
            f"accuracy_level must be {ACCURACY_LEVEL_RULE} (MatMulNBits), got {accuracy_level}"
        )
    return Quantization(method, block_size, accuracy_level)
