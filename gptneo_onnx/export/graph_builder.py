"""A small helper for writing ONNX graphs op by op, with weights kept as numpy until saved."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

OPSET = 17  # LayerNormalization; loadable by onnxruntime >= 1.12, onnxruntime-web, TensorRT 8.6+
MS_DOMAIN = "com.microsoft"
INT64_MAX = int(np.iinfo(np.int64).max)  # ONNX's "to the end" for Slice ends
PAGE = 4096  # external-data alignment of large weights, so that onnxruntime can map them
NUMPY_TO_ONNX = {
    np.dtype("float32"): TensorProto.FLOAT,
    np.dtype("float16"): TensorProto.FLOAT16,
    np.dtype("int64"): TensorProto.INT64,
    np.dtype("int32"): TensorProto.INT32,
    np.dtype("bool"): TensorProto.BOOL,
}


class GraphBuilder:
    """Collects nodes, inputs, outputs and initializers; `make_node` returns output names."""

    def __init__(self, name: str, external_data: bool = False):
        self.name = name
        self.external_data = external_data  # weights will go to an external file (views allowed)
        self.nodes: list[onnx.NodeProto] = []
        self.inputs: list[onnx.ValueInfoProto] = []
        self.outputs: list[onnx.ValueInfoProto] = []
        self.weights: dict[str, np.ndarray] = {}
        self.views: dict[str, tuple[str, int, int]] = {}  # name -> (weight, first row, end row)
        self.uses_ms_domain = False
        self._counter = 0

    def unique(self, hint: str) -> str:
        self._counter += 1
        return f"{hint}_{self._counter}"

    def add_input(self, name: str, dtype: np.dtype | type, shape: list) -> str:
        self.inputs.append(helper.make_tensor_value_info(name, NUMPY_TO_ONNX[np.dtype(dtype)], shape))
        return name

    def add_output(self, value: str, name: str, dtype: np.dtype | type, shape: list) -> str:
        self.op("Identity", [value], outputs=[name])
        self.outputs.append(helper.make_tensor_value_info(name, NUMPY_TO_ONNX[np.dtype(dtype)], shape))
        return name

    def weight(self, name: str, array: np.ndarray) -> str:
        if name in self.weights:
            raise ValueError(f"weight {name} added twice")
        # np.asarray keeps 0-d arrays rank 0 (np.ascontiguousarray would make them shape [1]): the
        # spec wants true scalars for Range's inputs, CumSum's axis and others (tract checks).
        self.weights[name] = np.asarray(array, order="C")
        return name

    def row_views(self, name: str, max_bytes: int) -> list[str]:
        """Split weight `name` into initializers of at most ~`max_bytes` that alias its rows in the
        external-data file (no bytes are written twice). onnxruntime then prepacks each slice on
        its own and frees the original pages before the next: the load-time peak holds one slice,
        not the whole table. Without external data there is nothing to alias: `[name]`."""
        array = self.weights[name]
        row_bytes = array[0].nbytes
        # Slices start on page boundaries so onnxruntime can map them (the weight itself is
        # page-aligned in the file, see external_tensor).
        rows_per_page = PAGE // np.gcd(row_bytes, PAGE)
        rows = max(rows_per_page, max_bytes // row_bytes // rows_per_page * rows_per_page)
        if not self.external_data or rows >= len(array):
            return [name]
        for start in range(0, len(array), rows):
            self.views[f"{name}.rows_{start}"] = (name, start, min(start + rows, len(array)))
        return [view for view, (base, _, _) in self.views.items() if base == name]

    def const(self, value, dtype: np.dtype | type = np.int64) -> str:
        """A small constant as an initializer: a Python scalar gives a rank-0 tensor, a list 1-D."""
        return self.weight(self.unique("const"), np.array(value, dtype=dtype))

    def op(self, op_type: str, inputs: list[str], outputs: list[str] | int = 1, domain: str = "", **attrs):
        """Add a node; returns its output name, or a list of names when it has several."""
        if isinstance(outputs, int):
            outputs = [self.unique(op_type.lower()) for _ in range(outputs)]
        if domain == MS_DOMAIN:
            self.uses_ms_domain = True
        self.nodes.append(
            helper.make_node(op_type, inputs, outputs, name=self.unique(op_type), domain=domain, **attrs)
        )
        return outputs[0] if len(outputs) == 1 else outputs

    def to_model(self, external_data_file: Path | None = None) -> onnx.ModelProto:
        """The ModelProto; with `external_data_file`, weights are streamed there instead."""
        if self.views and external_data_file is None:
            raise ValueError("row views alias external data: build with external_data=True")
        initializers = []
        handle = external_data_file.open("wb") if external_data_file else None
        try:
            for name, array in self.weights.items():
                if handle is None or array.nbytes < 1024:
                    initializers.append(numpy_helper.from_array(array, name))
                    continue
                initializers.append(external_tensor(name, array, handle, external_data_file.name))
        finally:
            if handle:
                handle.close()
        written = {tensor.name: tensor for tensor in initializers}
        for view, (base, start, end) in self.views.items():
            initializers.append(_row_view(view, written[base], start, end))
        graph = helper.make_graph(self.nodes, self.name, self.inputs, self.outputs, initializers)
        opsets = [helper.make_opsetid("", OPSET)]
        if self.uses_ms_domain:
            opsets.append(helper.make_opsetid(MS_DOMAIN, 1))
        model = helper.make_model(graph, opset_imports=opsets, producer_name="gptneo-onnx")
        model.ir_version = 8  # readable by onnxruntime >= 1.14
        return model


def external_tensor(name: str, array: np.ndarray, handle, location: str) -> TensorProto:
    """A TensorProto whose bytes go to the open external-data file: page-aligned when large (so
    onnxruntime can map it), else 64-byte aligned."""
    padding = (-handle.tell()) % (PAGE if array.nbytes >= PAGE else 64)
    handle.write(b"\0" * padding)
    offset = handle.tell()
    data = array.astype(array.dtype.newbyteorder("<"), copy=False).tobytes()
    handle.write(data)
    tensor = TensorProto(name=name, data_type=NUMPY_TO_ONNX[array.dtype], dims=array.shape)
    tensor.data_location = TensorProto.EXTERNAL
    for key, value in (("location", location), ("offset", str(offset)), ("length", str(len(data)))):
        entry = tensor.external_data.add()
        entry.key, entry.value = key, value
    return tensor


def _row_view(name: str, base: TensorProto, start: int, end: int) -> TensorProto:
    """An external tensor for rows [start, end) of `base`, pointing at the same bytes."""
    fields = {entry.key: entry.value for entry in base.external_data}
    row_bytes = int(fields["length"]) // base.dims[0]
    tensor = TensorProto(name=name, data_type=base.data_type, dims=[end - start, *base.dims[1:]])
    tensor.data_location = TensorProto.EXTERNAL
    offset = int(fields["offset"]) + start * row_bytes
    for key, value in (
        ("location", fields["location"]),
        ("offset", str(offset)),
        ("length", str((end - start) * row_bytes)),
    ):
        entry = tensor.external_data.add()
        entry.key, entry.value = key, value
    return tensor
