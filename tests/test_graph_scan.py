"""The runtime's protobuf scanner against the `onnx` package: same domains, operators and
external-data locations on real exports and on crafted graphs, and a clean refusal of damage."""

from __future__ import annotations

import random

import numpy as np
import onnx
import pytest
from conftest import tiny_hf_model
from onnx import TensorProto, helper, numpy_helper

from gptneo_onnx.export import export
from gptneo_onnx.reference import from_transformers
from gptneo_onnx.runtime.graph_scan import MAX_DEPTH, MalformedGraph, scan_bytes, scan_graph


def onnx_facts(model: onnx.ModelProto):
    """(opset domains, operators, locations) as the onnx package reads them, every graph included."""
    opsets = {entry.domain for entry in model.opset_import}
    operators, locations, tensors = set(), set(), []
    graphs = [
        model.graph,
        *(g for info in model.training_info for g in (info.initialization, info.algorithm)),
    ]
    nodes = [node for function in model.functions for node in function.node]
    opsets |= {entry.domain for function in model.functions for entry in function.opset_import}
    while graphs or nodes:
        if graphs:
            graph = graphs.pop()
            nodes.extend(graph.node)
            tensors.extend(graph.initializer)
            tensors.extend(t for sparse in graph.sparse_initializer for t in (sparse.values, sparse.indices))
            continue
        node = nodes.pop()
        operators.add((node.domain, node.op_type))
        for attribute in node.attribute:
            graphs.extend([attribute.g] if attribute.HasField("g") else [])
            graphs.extend(attribute.graphs)
            tensors.extend([attribute.t] if attribute.HasField("t") else [])
            tensors.extend(attribute.tensors)
    locations = {entry.value for t in tensors for entry in t.external_data if entry.key == "location"}
    return opsets, operators, locations


EXPORTS = {
    "portable": {},
    "portable-external": {"external_data": True},
    "optimized": {"optimize": True},
    "int4": {"optimize": True, "quantize": "int4"},
    "int8-external": {"quantize": "int8", "external_data": True},
}


@pytest.mark.parametrize("name", EXPORTS)
def test_the_scanner_reads_exports_as_onnx_does(tmp_path, name):
    model = from_transformers(tiny_hf_model("causal-lm"))
    graph = (
        tmp_path
        / export(model, tmp_path, progress=False, validate=False, **EXPORTS[name]).manifest["graph"]["file"]
    )
    facts = scan_graph(graph)
    opsets, operators, locations = onnx_facts(onnx.load(str(graph), load_external_data=False))
    assert (facts.opset_domains, facts.operators, facts.external_locations) == (opsets, operators, locations)
    assert ("external" in name) == (locations == {f"{graph.name}.data"})


def external(name: str, location: str, values=(1.0, 2.0)) -> TensorProto:
    tensor = numpy_helper.from_array(np.array(values, np.float32), name)
    tensor.ClearField("raw_data")
    tensor.data_location = TensorProto.EXTERNAL
    for key, value in (("location", location), ("offset", "0"), ("length", "8")):
        entry = tensor.external_data.add()
        entry.key, entry.value = key, value
    return tensor


def crafted_model() -> onnx.ModelProto:
    """External tensors hidden everywhere ONNX allows one, and a local function in its own domain."""
    then_branch = helper.make_graph(
        [helper.make_node("Constant", [], ["c"], value=external("c", "in-attribute.data"))],
        "then",
        [],
        [helper.make_tensor_value_info("c", TensorProto.FLOAT, [2])],
        [external("t", "in-subgraph.data")],
    )
    nodes = [
        helper.make_node("If", ["cond"], ["y"], then_branch=then_branch, else_branch=then_branch),
        helper.make_node("Twice", ["y"], ["z"], domain="local.functions"),
    ]
    sparse = helper.make_sparse_tensor(
        external("sparse_values", "in-sparse.data"), numpy_helper.from_array(np.array([0, 1], np.int64)), [4]
    )
    graph = helper.make_graph(
        nodes,
        "main",
        [helper.make_tensor_value_info("cond", TensorProto.BOOL, [])],
        [helper.make_tensor_value_info("z", TensorProto.FLOAT, [2])],
        [external("w", "weights.data")],
        sparse_initializer=[sparse],
    )
    function = helper.make_function(
        "local.functions",
        "Twice",
        ["x"],
        ["out"],
        [
            helper.make_node("Add", ["x", "x"], ["out"]),
            helper.make_node("Gelu", ["x"], ["g"], domain="com.microsoft"),
        ],
        [helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)],
    )
    opsets = [helper.make_opsetid("", 17), helper.make_opsetid("local.functions", 1)]
    model = helper.make_model(graph, opset_imports=opsets, functions=[function])
    training = model.training_info.add()
    training.initialization.CopyFrom(
        helper.make_graph([], "init", [], [], [external("seed", "in-training.data")])
    )
    return model


def test_the_scanner_finds_what_hides_in_subgraphs_functions_and_sparse_tensors():
    model = crafted_model()
    facts = scan_bytes(model.SerializeToString())
    assert facts.external_locations == {
        "weights.data",
        "in-subgraph.data",
        "in-attribute.data",
        "in-sparse.data",
        "in-training.data",
    }
    assert ("com.microsoft", "Gelu") in facts.operators and ("local.functions", "Twice") in facts.operators
    assert facts.domains == {"", "local.functions", "com.microsoft"}
    assert (facts.opset_domains, facts.operators, facts.external_locations) == onnx_facts(model)


def length_delimited(number: int, payload: bytes) -> bytes:
    def varint(value):
        out = b""
        while value >= 0x80:
            out, value = out + bytes([value & 0x7F | 0x80]), value >> 7
        return out + bytes([value])

    return varint(number << 3 | 2) + varint(len(payload)) + payload


def nested(levels: int) -> bytes:
    """A ModelProto whose graph nests `levels` subgraphs (graph > node > attribute > graph ...),
    written by hand: protobuf's own encoder stops at 100 nested messages."""
    graph = b""
    for _ in range(levels):
        graph = length_delimited(1, length_delimited(5, length_delimited(6, graph)))
    return length_delimited(7, graph)


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"\x3a\x10\x0a", "runs past its message"),  # graph field: 16 bytes announced, 1 there
        (b"\x3b\x00", "wire type 3"),  # a group, which ONNX never uses
        (b"\x08" + b"\xff" * 11, "overlong varint"),
        (b"\x08", "truncated"),
        (b"\x00\x00", "field number 0"),
        (b"\x3a\x02\x0a\x05" + b"\x00" * 5, "runs past its message"),  # a node longer than its graph
        (nested(MAX_DEPTH // 3 + 1), "nested deeper"),
    ],
)
def test_malformed_bytes_are_refused(data, message):
    with pytest.raises(MalformedGraph, match=message):
        scan_bytes(data)


def test_an_empty_file_is_refused(tmp_path):
    (tmp_path / "model.onnx").write_bytes(b"")
    with pytest.raises(MalformedGraph, match="empty"):
        scan_graph(tmp_path / "model.onnx")


def test_damaged_graphs_are_refused_or_read_at_least_as_onnx_reads_them():
    """Random flips and cuts: the scanner raises MalformedGraph or sees every location and domain
    that protobuf sees; it never fails another way."""
    original = crafted_model().SerializeToString()
    generator = random.Random(0)
    parsed = 0
    for _ in range(400):
        data = bytearray(original)
        for _ in range(generator.randint(1, 3)):
            data[generator.randrange(len(data))] = generator.randrange(256)
        if generator.random() < 0.2:
            data = data[: generator.randrange(len(data))]
        try:
            facts = scan_bytes(bytes(data))
        except MalformedGraph:
            continue
        try:
            model = onnx.ModelProto.FromString(bytes(data))
        except Exception:  # protobuf's DecodeError and friends
            continue
        parsed += 1
        opsets, operators, locations = onnx_facts(model)
        assert locations <= facts.external_locations and opsets <= facts.opset_domains
        assert {domain for domain, _ in operators} <= facts.domains
    assert parsed > 50
