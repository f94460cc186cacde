"""Read what the runtime must check in an ONNX file, without the `onnx` package.

An ONNX file is a protobuf `ModelProto`. This walks its wire format and collects the operator
domains it imports, the (domain, op_type) of every node, and every external-data `location`. It descends only
into the fields that can lead to a node, an opset import or a tensor (graphs, nodes, attributes
with tensors or subgraphs, sparse tensors, local functions, training graphs) and skips every
other field by its length, so a graph of several GB is scanned without reading its weights.
Field numbers are those of onnx/onnx.proto, which keeps them stable across versions.
"""

from __future__ import annotations

import mmap
from dataclasses import dataclass, field
from pathlib import Path

MAX_DEPTH = 64  # messages nested deeper than this are refused (our graphs use 4)

# For each message, the length-delimited fields to descend into: field number -> message.
CHILDREN: dict[str, dict[int, str]] = {
    "ModelProto": {7: "GraphProto", 8: "OperatorSetIdProto", 20: "TrainingInfoProto", 25: "FunctionProto"},
    "TrainingInfoProto": {1: "GraphProto", 2: "GraphProto"},
    "FunctionProto": {7: "NodeProto", 9: "OperatorSetIdProto", 11: "AttributeProto"},
    "GraphProto": {1: "NodeProto", 5: "TensorProto", 15: "SparseTensorProto"},
    "NodeProto": {5: "AttributeProto"},
    "AttributeProto": {
        5: "TensorProto",
        6: "GraphProto",
        10: "TensorProto",
        11: "GraphProto",
        22: "SparseTensorProto",
        23: "SparseTensorProto",
    },
    "SparseTensorProto": {1: "TensorProto", 2: "TensorProto"},
    "TensorProto": {13: "StringStringEntryProto"},
    "OperatorSetIdProto": {},
    "StringStringEntryProto": {},
}
# The string fields to read: (message, field number) -> name.
STRINGS = {
    ("NodeProto", 4): "op_type",
    ("NodeProto", 7): "domain",
    ("OperatorSetIdProto", 1): "domain",
    ("StringStringEntryProto", 1): "key",
    ("StringStringEntryProto", 2): "value",
}
VARINT, FIXED64, LENGTH_DELIMITED, FIXED32 = 0, 1, 2, 5


class MalformedGraph(ValueError):
    """The bytes are not a well-formed protobuf message."""


@dataclass
class GraphFacts:
    """What `scan_graph` found; domains are as written ("" is the default domain)."""

    opset_domains: set[str] = field(default_factory=set)
    operators: set[tuple[str, str]] = field(default_factory=set)  # (domain, op_type)
    external_locations: set[str] = field(default_factory=set)

    @property
    def domains(self) -> set[str]:
        """Every domain imported or used by a node."""
        return self.opset_domains | {domain for domain, _ in self.operators}


def scan_graph(path: Path) -> GraphFacts:
    """Scan the ONNX file at `path`; raises MalformedGraph when it is not a valid protobuf."""
    facts = GraphFacts()
    with path.open("rb") as handle:
        if path.stat().st_size == 0:
            raise MalformedGraph("the file is empty")
        with mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ) as data:
            _scan(data, 0, len(data), "ModelProto", facts, 0)
    return facts


def scan_bytes(data: bytes) -> GraphFacts:
    """Scan a serialized ModelProto held in memory."""
    facts = GraphFacts()
    _scan(data, 0, len(data), "ModelProto", facts, 0)
    return facts


def _scan(data, start: int, end: int, message: str, facts: GraphFacts, depth: int) -> dict[str, str]:
    """Walk one message in data[start:end]; returns its STRINGS fields, records facts of children."""
    if depth > MAX_DEPTH:
        raise MalformedGraph(f"messages nested deeper than {MAX_DEPTH}")
    strings: dict[str, str] = {}
    children = CHILDREN[message]
    position = start
    while position < end:
        key, position = _varint(data, position, end)
        number, wire_type = key >> 3, key & 7
        if number == 0:
            raise MalformedGraph(f"field number 0 at byte {position}")
        if wire_type == VARINT:
            _, position = _varint(data, position, end)
        elif wire_type == FIXED64:
            position += 8
        elif wire_type == FIXED32:
            position += 4
        elif wire_type == LENGTH_DELIMITED:
            length, position = _varint(data, position, end)
            if position + length > end:
                raise MalformedGraph(f"a field of {length} bytes runs past its message at byte {position}")
            if (message, number) in STRINGS:
                strings[STRINGS[message, number]] = _text(data, position, position + length)
            elif number in children:
                child = children[number]
                found = _scan(data, position, position + length, child, facts, depth + 1)
                _record(child, found, facts)
            position += length
        else:
            raise MalformedGraph(f"unsupported wire type {wire_type} at byte {position}")
    if position != end:
        raise MalformedGraph(f"a field runs past the end of its message at byte {end}")
    return strings


def _record(message: str, strings: dict[str, str], facts: GraphFacts) -> None:
    if message == "OperatorSetIdProto":
        facts.opset_domains.add(strings.get("domain", ""))
    elif message == "NodeProto":
        facts.operators.add((strings.get("domain", ""), strings.get("op_type", "")))
    elif message == "StringStringEntryProto" and strings.get("key") == "location":
        # any tensor's external_data entry named "location", whatever its data_location says
        facts.external_locations.add(strings.get("value", ""))


def _varint(data, position: int, end: int) -> tuple[int, int]:
    value, shift = 0, 0
    while True:
        if position >= end or shift > 63:
            raise MalformedGraph(f"a truncated or overlong varint at byte {position}")
        byte = data[position]
        position += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, position
        shift += 7


def _text(data, start: int, end: int) -> str:
    try:
        return bytes(data[start:end]).decode("utf-8")
    except UnicodeDecodeError as error:
        raise MalformedGraph(f"a string field that is not UTF-8 at byte {start}") from error
