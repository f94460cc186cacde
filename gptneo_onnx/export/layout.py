"""Where an export puts its graph: `onnx/model<suffix>.onnx`, where transformers.js looks for it.

transformers.js reads `onnx/model.onnx` for fp32 and a suffixed name for other dtypes
(`model_fp16.onnx`, `model_int8.onnx`, `model_q4.onnx`); config.json names the dtype under
`transformers.js_config`, so it never asks for a file the export does not have. Optimum finds the
graph there too (it searches subfolders), and our runtimes follow the sidecar's `graph.file`.
"""

from __future__ import annotations

GRAPH_FOLDER = "onnx"
# Export precision or quantization -> (transformers.js dtype, its file-name suffix).
TRANSFORMERS_JS_DTYPES = {
    "float32": ("fp32", ""),
    "float16": ("fp16", "_fp16"),
    "int8": ("int8", "_int8"),  # dynamic int8 weights (export/quantize.py)
    "int4": ("q4", "_q4"),  # MatMulNBits, what transformers.js calls q4
}
# Every name the graph folder may hold (the graph and its external data, which ONNX resolves from
# the graph's folder).
GRAPH_FOLDER_FILES = frozenset(
    name
    for _, suffix in TRANSFORMERS_JS_DTYPES.values()
    for name in (f"model{suffix}.onnx", f"model{suffix}.onnx.data")
)


def transformers_js_dtype(precision: str, quantize: str | None) -> str:
    return _dtype_entry(precision, quantize)[0]


def graph_file(precision: str, quantize: str | None) -> str:
    """The graph's path in the export folder, e.g. `onnx/model.onnx`."""
    return f"{GRAPH_FOLDER}/model{_dtype_entry(precision, quantize)[1]}.onnx"


def _dtype_entry(precision: str, quantize: str | None) -> tuple[str, str]:
    # An unknown quantization method is refused with its own message by export/quantize.py.
    return TRANSFORMERS_JS_DTYPES.get(quantize or precision, ("fp32", ""))


def external_data_file(graph: str) -> str:
    return f"{graph}.data"
