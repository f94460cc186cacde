// What the runner must check in an ONNX file before onnxruntime opens it, read straight from the
// protobuf wire format (as gptneo_onnx/runtime/graph_scan.py does): the operator domains it
// imports or uses, the (domain, op_type) of every node, and every external-data `location`.
// Only fields that can lead to a node, an opset import or a tensor are entered; everything else,
// weights included, is skipped by its length, so a multi-GB graph is scanned without reading it.
// Field numbers are those of onnx/onnx.proto. Environment-neutral: the bytes come from a reader
// ({byte(position), text(start, end)}), a file in Node (node-files.js) or an array in a browser.

const MAX_DEPTH = 64;
// For each message, the length-delimited fields to descend into: field number -> message.
const CHILDREN = {
  ModelProto: { 7: "GraphProto", 8: "OperatorSetIdProto", 20: "TrainingInfoProto", 25: "FunctionProto" },
  TrainingInfoProto: { 1: "GraphProto", 2: "GraphProto" },
  FunctionProto: { 7: "NodeProto", 9: "OperatorSetIdProto", 11: "AttributeProto" },
  GraphProto: { 1: "NodeProto", 5: "TensorProto", 15: "SparseTensorProto" },
  NodeProto: { 5: "AttributeProto" },
  AttributeProto: { 5: "TensorProto", 6: "GraphProto", 10: "TensorProto", 11: "GraphProto", 22: "SparseTensorProto", 23: "SparseTensorProto" },
  SparseTensorProto: { 1: "TensorProto", 2: "TensorProto" },
  TensorProto: { 13: "StringStringEntryProto" },
  OperatorSetIdProto: {},
  StringStringEntryProto: {},
};
// The string fields to read, by message: field number -> name.
const STRINGS = {
  NodeProto: { 4: "op_type", 7: "domain" },
  OperatorSetIdProto: { 1: "domain" },
  StringStringEntryProto: { 1: "key", 2: "value" },
};
const VARINT = 0, FIXED64 = 1, LENGTH_DELIMITED = 2, FIXED32 = 5;

export class MalformedGraph extends Error {}

/** Scan an ONNX model of `size` bytes read through `bytes`: {domains, operators ("domain/op_type"), externalLocations}, Sets. */
export function scanGraph(bytes, size) {
  if (size === 0) throw new MalformedGraph("the file is empty");
  const facts = { domains: new Set(), operators: new Set(), externalLocations: new Set() };
  scan(bytes, 0, size, "ModelProto", facts, 0);
  return facts;
}

/** A reader over bytes in memory (a Uint8Array). */
export class ArrayBytes {
  constructor(array) {
    this.array = array;
  }

  byte(position) {
    if (position >= this.array.length) throw new MalformedGraph(`the file ends early at byte ${position}`);
    return this.array[position];
  }

  text(start, end) {
    return utf8(this.array.subarray(start, end), start);
  }
}

/** Strict UTF-8 decoding of a string field that starts at byte `start`. */
export function utf8(bytes, start) {
  try {
    return new TextDecoder("utf-8", { fatal: true }).decode(bytes);
  } catch {
    throw new MalformedGraph(`a string field that is not UTF-8 at byte ${start}`);
  }
}

function scan(data, start, end, message, facts, depth) {
  if (depth > MAX_DEPTH) throw new MalformedGraph(`messages nested deeper than ${MAX_DEPTH}`);
  const strings = {};
  const children = CHILDREN[message];
  let position = start;
  while (position < end) {
    let key;
    [key, position] = varint(data, position, end);
    const number = Math.floor(key / 8), wireType = key % 8;
    if (number === 0) throw new MalformedGraph(`field number 0 at byte ${position}`);
    if (wireType === VARINT) {
      position = varint(data, position, end)[1];
    } else if (wireType === FIXED64) {
      position += 8;
    } else if (wireType === FIXED32) {
      position += 4;
    } else if (wireType === LENGTH_DELIMITED) {
      let length;
      [length, position] = varint(data, position, end);
      if (position + length > end) {
        throw new MalformedGraph(`a field of ${length} bytes runs past its message at byte ${position}`);
      }
      const name = STRINGS[message]?.[number];
      if (name) {
        strings[name] = data.text(position, position + length);
      } else if (children[number]) {
        const child = children[number];
        record(child, scan(data, position, position + length, child, facts, depth + 1), facts);
      }
      position += length;
    } else {
      throw new MalformedGraph(`unsupported wire type ${wireType} at byte ${position}`);
    }
  }
  if (position !== end) throw new MalformedGraph(`a field runs past the end of its message at byte ${end}`);
  return strings;
}

function record(message, strings, facts) {
  if (message === "OperatorSetIdProto") {
    facts.domains.add(strings.domain ?? "");
  } else if (message === "NodeProto") {
    facts.domains.add(strings.domain ?? "");
    facts.operators.add(`${strings.domain ?? ""}/${strings.op_type ?? ""}`);
  } else if (message === "StringStringEntryProto" && strings.key === "location") {
    facts.externalLocations.add(strings.value ?? ""); // any tensor's external_data "location"
  }
}

/** A protobuf varint at `position` (as a double: exact to 2^53, enough for any length here). */
function varint(data, position, end) {
  let value = 0;
  let scale = 1;
  for (let shift = 0; shift <= 63; shift += 7) {
    if (position >= end) break;
    const byte = data.byte(position++);
    value += (byte & 0x7f) * scale;
    if (byte < 0x80) return [value, position];
    scale *= 128;
  }
  throw new MalformedGraph(`a truncated or overlong varint at byte ${position}`);
}
