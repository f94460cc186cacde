"""Weight quantization of an exported graph: int8 dynamic and int4 weight-only (MatMulNBits).

Both methods first untie lm_head (the portable graph reads the embedding table through
`Gemm(transB=1)`), so lm_head becomes a MatMul with its own (E, V) weight that the quantizer
covers, and the token embedding becomes a block-quantized `GatherBlockQuantized`.
"""

from __future__ import annotations

import logging
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import onnx
from onnx import helper, numpy_helper

from gptneo_onnx.errors import QuantizationError
from gptneo_onnx.export.plan import Quantization

__all__ = [
    "QuantizationError",
    "block_quantize_rows",
    "quantize_embedding",
    "quantize_graph",
    "untie_lm_head",
]
EMBEDDING = "transformer.wte.weight"
LM_HEAD = "lm_head.weight"


def untie_lm_head(model: onnx.ModelProto) -> bool:
    """Replace `Gemm(hidden, wte, transB=1)` by `MatMul(hidden, lm_head.weight)`; True if found."""
    graph = model.graph
    initializers = {tensor.name: tensor for tensor in graph.initializer}
    for index, node in enumerate(graph.node):
        if node.op_type != "Gemm" or len(node.input) < 2 or node.input[1] != EMBEDDING:
            continue
        attrs = {attr.name: helper.get_attribute_value(attr) for attr in node.attribute}
        if attrs.get("transB") != 1 or attrs.get("transA", 0) or len(node.input) > 2:
            raise QuantizationError(f"unexpected lm_head node {node.name}: {attrs}")
        table = numpy_helper.to_array(initializers[EMBEDDING])
        graph.initializer.append(numpy_helper.from_array(np.ascontiguousarray(table.T), LM_HEAD))
        matmul = helper.make_node(
            "MatMul", [node.input[0], LM_HEAD], list(node.output), name="lm_head.MatMul"
        )
        graph.node.remove(node)
        graph.node.insert(index, matmul)
        return True
    return False


def block_quantize_rows(table: np.ndarray, bits: int, block_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric block quantization along the last axis, as GatherBlockQuantized reads uint8 data.

    Returns (data uint8, scales float): value = (q - 2**(bits-1)) * scale. 4-bit values are packed
    two per byte along the last axis, low-order nibble first.
    """
    rows, width = table.shape
    if width % block_size:
        raise QuantizationError(f"hidden size {width} is not a multiple of block_size {block_size}")
    blocks = table.astype(np.float32).reshape(rows, width // block_size, block_size)
    largest = 2 ** (bits - 1) - 1
    scales = np.abs(blocks).max(axis=-1, keepdims=True) / largest
    scales[scales == 0] = 1.0
    quantized = np.clip(np.rint(blocks / scales), -largest, largest).astype(np.int32) + 2 ** (bits - 1)
    quantized = quantized.reshape(rows, width).astype(np.uint8)
    if bits == 4:
        quantized = quantized[:, 0::2] | (quantized[:, 1::2] << 4)
    return quantized, scales.reshape(rows, -1).astype(table.dtype)


def quantize_embedding(model: onnx.ModelProto, bits: int, block_size: int) -> bool:
    """Swap the token-embedding Gather for GatherBlockQuantized; False when it can't serve."""
    graph = model.graph
    initializers = {tensor.name: tensor for tensor in graph.initializer}
    users = [node for node in graph.node if EMBEDDING in node.input]
    if len(users) != 1 or users[0].op_type != "Gather" or users[0].input[0] != EMBEDDING:
        return False  # still tied to lm_head, or used elsewhere
    table = numpy_helper.to_array(initializers[EMBEDDING])
    if table.shape[1] % block_size or table.shape[1] % 2:
        return False
    data, scales = block_quantize_rows(table, bits, block_size)
    graph.initializer.remove(initializers[EMBEDDING])
    graph.initializer.extend(
        [
            numpy_helper.from_array(data, f"{EMBEDDING}.quantized"),
            numpy_helper.from_array(scales, f"{EMBEDDING}.scales"),
        ]
    )
    node = users[0]
    index = list(graph.node).index(node)
    gather = helper.make_node(
        "GatherBlockQuantized",
        [f"{EMBEDDING}.quantized", node.input[1], f"{EMBEDDING}.scales"],
        list(node.output),
        name="wte.GatherBlockQuantized",
        domain="com.microsoft",
        bits=bits,
        block_size=block_size,
        gather_axis=0,
        quantize_axis=1,
    )
    graph.node.remove(node)
    graph.node.insert(index, gather)
    if not any(opset.domain == "com.microsoft" for opset in model.opset_import):
        model.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    return True


def quantize_graph(
    graph_path: Path, quantization: Quantization, external_data_file: str | None = None
) -> dict:
    """Quantize the graph at `graph_path` in place, as planned; returns the manifest `quantization`
    record: the plan's, with what the quantizer changed."""
    method, block_size, accuracy_level = (
        quantization.method,
        quantization.block_size,
        quantization.accuracy_level,
    )
    record = quantization.record()
    try:
        import onnxruntime.quantization  # noqa: F401
    except ImportError as error:
        raise ImportError("quantization needs onnxruntime: install gptneo-onnx[cpu]") from error
    model = onnx.load(str(graph_path))
    record["lm_head"] = "untied MatMul" if untie_lm_head(model) else "not found"
    bits = 8 if method == "int8" else 4
    embedded = quantize_embedding(model, bits, block_size)
    record["embedding"] = f"GatherBlockQuantized {bits}-bit" if embedded else "float (not quantized)"
    with _quiet_logging():
        _quantize_weights(model, graph_path, method, block_size, accuracy_level, external_data_file)
    counts = _count_ops(onnx.load(str(graph_path), load_external_data=False))
    record["quantized_nodes"] = {
        op: counts[op]
        for op in ("MatMulNBits", "DynamicQuantizeMatMul", "MatMulInteger", "GatherBlockQuantized")
        if op in counts
    }
    record["float_matmuls_left"] = counts.get("MatMul", 0)  # includes attention's activation MatMuls
    return record


@contextmanager
def _quiet_logging():
    """onnxruntime.quantization logs through the root logger; mute its info and warnings."""
    logging.disable(logging.WARNING)
    try:
        yield
    finally:
        logging.disable(logging.NOTSET)


def _quantize_weights(model, graph_path: Path, method: str, block_size, accuracy_level, external_data_file):
    from onnxruntime.quantization import QuantType, quantize_dynamic
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    if method == "int4":
        quantizer = MatMulNBitsQuantizer(
            model, bits=4, block_size=block_size, is_symmetric=True, accuracy_level=accuracy_level
        )
        quantizer.process()
        model = quantizer.model.model
        _save(model, graph_path, external_data_file)
    else:
        _save(model, graph_path, external_data_file)
        quantize_dynamic(
            graph_path,
            graph_path,
            op_types_to_quantize=["MatMul"],
            weight_type=QuantType.QInt8,
            per_channel=False,
            extra_options={"MatMulConstBOnly": True, "DefaultTensorType": onnx.TensorProto.FLOAT},
            use_external_data_format=external_data_file is not None,
        )


def _save(model: onnx.ModelProto, path: Path, external_data_file: str | None) -> None:
    if external_data_file:
        (path.parent / external_data_file).unlink(missing_ok=True)
        onnx.save_model(model, str(path), save_as_external_data=True, location=external_data_file)
    else:
        onnx.save_model(model, str(path))


def _count_ops(model: onnx.ModelProto) -> dict[str, int]:
    counts: dict[str, int] = {}
    for node in model.graph.node:
        counts[node.op_type] = counts.get(node.op_type, 0) + 1
    return counts
