// Read and check `gptneo_onnx.json`, the export's sidecar (schema: docs/sidecar.md).
// Everything the runner knows about the model comes from here: files and their sha256,
// IO names by role, input rules, cache layout, special tokens and decoding defaults.
// Environment-neutral: the folder's files come through a folder object, a directory in Node
// (node-files.js) or a URL in a browser (clients/web/web-folder.js), with this interface:
//   name                          where the folder is, for messages
//   async sidecarText()           the sidecar's text (refusing a missing or linked sidecar)
//   async file(relative, namedBy) a listed file {name, path, size, sha256(), scan(), text()};
//                                 `relative` has passed checkRelative, the folder refuses links

import { ExportFolderError } from "./errors.js";
import { MalformedGraph } from "./graph-scan.js";

export const SIDECAR_NAME = "gptneo_onnx.json";
const FORMAT = "gptneo-onnx";
const FORMAT_VERSIONS = [1, 2]; // 2: a windowed local cache (`cache.local_window`)
const MIN_MINOR_VERSION = 1; // 1.1 added `io`, which this runner needs
// The fields the runner reads, per object, with their JSON types (docs/sidecar.md, "Required fields").
const TOP_FIELDS = {
  format: "string", format_version: "integer", task: "string", flavor: "string", precision: "string",
  graph: "object", inputs: "array", outputs: "array", model: "object", special_tokens: "object",
};
const GRAPH_FIELDS = { file: "string", sha256: "string", bytes: "integer", external_data: "array", op_domains: "array" };
const FILE_FIELDS = { file: "string", sha256: "string", bytes: "integer" };
const IO_FIELDS = { name: "string", dtype: "string", shape: "array" };
const MODEL_FIELDS = {
  vocab_size: "integer", num_layers: "integer", num_heads: "integer", head_dim: "integer", max_position_embeddings: "integer",
};
const LAYER_FIELDS = { layer: "integer", past_key: "string", past_value: "string", present_key: "string", present_value: "string" };
// The operator domains onnxruntime runs; nodes that read files named inside the graph are refused.
const DEFAULT_DOMAIN = "ai.onnx";
const RUNTIME_DOMAINS = [DEFAULT_DOMAIN, "com.microsoft"];
const FILE_READING_OPERATORS = ["com.microsoft/EPContext"];
const KNOWN_RULES = {
  padding_side: ["left"],
  attention_mask_columns: ["past_and_new"],
  position_ids_rule: ["cumsum_minus_one"],
};
// `validation.status` (docs/sidecar.md): only "passed" and "skipped" exports load.
const VALIDATION_STATUSES = ["passed", "failed", "pending", "skipped"];

/** Load the sidecar from `folder`, check it, the files it lists and (unless `verify` is false) their sha256. */
export async function loadSidecar(folder, { verify = true } = {}) {
  const root = folder.name;
  const sidecarPath = `${root}/${SIDECAR_NAME}`;
  let raw;
  try {
    raw = JSON.parse(await folder.sidecarText());
  } catch (error) {
    if (!(error instanceof SyntaxError)) throw error;
    throw new ExportFolderError(`${sidecarPath} is not valid JSON: ${error.message}`);
  }
  checkFields(raw, sidecarPath);
  checkValidation(root, raw);
  const files = [];
  for (const entry of listedFiles(raw)) {
    const file = await folder.file(checkRelative(entry.file, SIDECAR_NAME), SIDECAR_NAME);
    if (file.size !== entry.bytes) {
      throw new ExportFolderError(
        `${entry.file} in ${root} has ${file.size} bytes, ${SIDECAR_NAME} records ${entry.bytes}; the export is ` +
          "incomplete or was changed (an interrupted export or copy?). Re-export or re-copy it",
      );
    }
    if (verify) checkSha256(entry.file, await file.sha256(), entry.sha256);
    files.push(file);
  }
  await checkGraphReferences(folder, raw, files[0]);
  return {
    folder,
    raw,
    graph: files[0],
    externalData: files.slice(1, 1 + raw.graph.external_data.length),
    tokenizer: raw.tokenizer ? files.at(-1) : null,
    io: raw.io,
    cache: raw.cache,
    vocabSize: raw.model.vocab_size,
    maxPositions: raw.model.max_position_embeddings,
    eosTokenIds: eosIds(raw.special_tokens.eos_token_id),
    padTokenId: raw.special_tokens.pad_token_id,
    generation: raw.generation || {},
  };
}

/** passed, failed, pending (validation never finished) or skipped, as runtime/manifest.py reads it. */
export function validationStatus(raw) {
  const validation = raw.validation;
  if (validation === null || validation === undefined) return "skipped";
  if (validation.status === undefined) return validation.passed ? "passed" : "failed";
  return validation.status;
}

const warnedUnvalidated = new Set();

function checkValidation(root, raw) {
  const status = validationStatus(raw);
  if (status === "failed") {
    throw new ExportFolderError(
      `${root} failed its parity validation against PyTorch (see ${raw.validation.report ?? "parity_report.json"}); ` +
        "it is kept for inspection, not for running. Fix the cause and re-export",
    );
  }
  if (status === "pending") {
    throw new ExportFolderError(
      `${root} was never validated to the end (validation.status is 'pending': the export was interrupted); re-export it`,
    );
  }
  if (!VALIDATION_STATUSES.includes(status)) {
    throw new ExportFolderError(`${root}: validation.status is ${JSON.stringify(status)}, expected one of ${VALIDATION_STATUSES.join(", ")}`);
  }
}

/** Once per folder, for the caller to run after every check passed: an export made without validation. */
export function warnIfUnvalidated({ folder, raw }) {
  const root = folder.name ?? folder;
  if (validationStatus(raw) === "skipped" && !warnedUnvalidated.has(root)) {
    warnedUnvalidated.add(root);
    console.warn(
      `warning: ${root} was exported without validation (--no-validate): nothing compared it with PyTorch; ` +
        "run `gptneo-onnx verify` on it",
    );
  }
}

/** The graph's input/output metadata as the sidecar lists it, by name. */
export function ioSpec(sidecar, name) {
  const spec = [...sidecar.raw.inputs, ...sidecar.raw.outputs].find((item) => item.name === name);
  if (!spec) throw new ExportFolderError(`${SIDECAR_NAME} names ${name} in \`io\` or \`cache\` but does not list it`);
  return spec;
}

function checkFields(raw, sidecarPath) {
  if (!isObject(raw)) throw new ExportFolderError(`${sidecarPath} must hold a JSON object`);
  requireFields(raw, "", TOP_FIELDS, sidecarPath);
  if (raw.format !== FORMAT) {
    throw new ExportFolderError(`${sidecarPath} has format ${JSON.stringify(raw.format)}, expected "${FORMAT}"`);
  }
  if (!FORMAT_VERSIONS.includes(raw.format_version)) {
    throw new ExportFolderError(
      `${sidecarPath} has format_version ${JSON.stringify(raw.format_version)}; this runner reads versions ` +
        `${FORMAT_VERSIONS.join(", ")}. Update the runner or re-export`,
    );
  }
  if ((raw.format_minor_version ?? 0) < MIN_MINOR_VERSION || !raw.io) {
    throw new ExportFolderError(
      `${sidecarPath} is format ${raw.format_version}.${raw.format_minor_version ?? 0}, without the \`io\` ` +
        `roles this runner needs (format ${FORMAT_VERSIONS.at(-1)}.${MIN_MINOR_VERSION}); re-export with a current gptneo-onnx`,
    );
  }
  if (raw.task !== "causal-lm") {
    throw new ExportFolderError(
      `${sidecarPath} holds a ${JSON.stringify(raw.task)} export; this runner generates text with causal-lm exports only`,
    );
  }
  requireFields(raw.graph, "graph", GRAPH_FIELDS, sidecarPath);
  raw.graph.external_data.forEach((entry, i) => requireFields(entry, `graph.external_data[${i}]`, FILE_FIELDS, sidecarPath));
  raw.graph.op_domains.forEach((domain, i) => requireFields({ domain }, `graph.op_domains[${i}]`, { domain: "string" }, sidecarPath));
  for (const key of ["inputs", "outputs"]) {
    raw[key].forEach((item, i) => requireFields(item, `${key}[${i}]`, IO_FIELDS, sidecarPath));
  }
  requireFields(raw.model, "model", MODEL_FIELDS, sidecarPath);
  for (const name of Object.keys(MODEL_FIELDS)) {
    if (raw.model[name] < 1) throw new ExportFolderError(`${sidecarPath}: model.${name} must be >= 1, got ${raw.model[name]}`);
  }
  if (raw.tokenizer) requireFields(raw.tokenizer, "tokenizer", FILE_FIELDS, sidecarPath);
  checkSpecialTokens(raw.special_tokens, raw.model.vocab_size, sidecarPath);
  for (const role of ["input_ids", "attention_mask", "logits"]) {
    if (typeof raw.io[role] !== "string") throw new ExportFolderError(`${sidecarPath}: \`io.${role}\` must name a graph tensor`);
  }
  for (const [rule, known] of Object.entries(KNOWN_RULES)) {
    if (!known.includes(raw.io[rule])) {
      throw new ExportFolderError(
        `${sidecarPath}: io.${rule} is ${JSON.stringify(raw.io[rule])}; this runner knows ${known.join(", ")}. Update the runner`,
      );
    }
  }
  const cache = raw.cache;
  if (!cache || cache.mode !== "concat" || !Array.isArray(cache.layers) || !cache.layers.length) {
    throw new ExportFolderError(
      `${sidecarPath}: a causal-lm export needs \`cache\` with mode "concat" and its layers; re-export with a current gptneo-onnx`,
    );
  }
  cache.layers.forEach((layer, i) => requireFields(layer, `cache.layers[${i}]`, LAYER_FIELDS, sidecarPath));
  if (!Array.isArray(cache.layout) || !cache.layout.includes("past_sequence_length")) {
    throw new ExportFolderError(`${sidecarPath}: \`cache.layout\` must name the past_sequence_length axis`);
  }
  if (cache.local_window != null) checkLocalWindow(raw, sidecarPath);
}

/** `cache.local_window`: its mask is a graph input and its rows cover the window. */
function checkLocalWindow(raw, sidecarPath) {
  const local = raw.cache.local_window;
  requireFields(local, "cache.local_window", { input: "string", window: "integer", min_rows: "integer" }, sidecarPath);
  if (!raw.inputs.some((item) => item.name === local.input)) {
    throw new ExportFolderError(`${sidecarPath}: cache.local_window.input ${JSON.stringify(local.input)} is not a graph input`);
  }
  if (local.window < 1 || local.min_rows < local.window - 1) {
    throw new ExportFolderError(`${sidecarPath}: cache.local_window needs window >= 1 and min_rows >= window - 1`);
  }
}

/** `item` is an object holding each of `fields` with its JSON type; errors name the dotted field. */
function requireFields(item, where, fields, sidecarPath) {
  if (!isObject(item)) throw new ExportFolderError(`${sidecarPath}: \`${where || "the sidecar"}\` must be a JSON object`);
  for (const [name, type] of Object.entries(fields)) {
    const field = where ? `${where}.${name}` : name;
    if (!(name in item)) {
      throw new ExportFolderError(
        `${sidecarPath} lacks the required field \`${field}\`; it was written by another tool or an older ` +
          "gptneo-onnx, or was edited. Re-export",
      );
    }
    if (jsonType(item[name]) !== type) {
      throw new ExportFolderError(`${sidecarPath}: \`${field}\` must be a JSON ${type}, got ${JSON.stringify(item[name])}`);
    }
  }
}

function jsonType(value) {
  if (Array.isArray(value)) return "array";
  if (Number.isInteger(value)) return "integer";
  return value === null ? "null" : typeof value;
}

/** bos, eos and pad ids must be token ids of the model (generation feeds them to the graph). */
function checkSpecialTokens(tokens, vocabSize, sidecarPath) {
  const ids = { eos_token_id: [].concat(tokens.eos_token_id ?? []), bos_token_id: [tokens.bos_token_id], pad_token_id: [tokens.pad_token_id] };
  for (const [name, values] of Object.entries(ids)) {
    for (const value of values) {
      if (value === null || value === undefined) continue;
      if (!Number.isInteger(value) || value < 0 || value >= vocabSize) {
        throw new ExportFolderError(
          `${sidecarPath}: special_tokens.${name} ${JSON.stringify(value)} is not a token id of the model (vocab_size ${vocabSize})`,
        );
      }
    }
  }
}

/** Scan the graph: its external-data locations and operator domains must be the sidecar's. */
async function checkGraphReferences(folder, raw, graph) {
  const name = graph.name.split("/").at(-1);
  let facts;
  try {
    facts = await graph.scan();
  } catch (error) {
    if (!(error instanceof MalformedGraph)) throw error;
    throw new ExportFolderError(`${name} is not a valid ONNX file (${error.message}); re-export`);
  }
  const listed = new Set(raw.graph.external_data.map((entry) => entry.file));
  for (const location of [...facts.externalLocations].sort()) {
    await folder.file(checkRelative(location, `${name}'s external data`), `${name}'s external data`);
    if (!listed.has(location)) {
      throw new ExportFolderError(
        `${name} reads external data from ${JSON.stringify(location)}, which ${SIDECAR_NAME} does not list ` +
          "under graph.external_data; the graph or sidecar was changed. Re-export",
      );
    }
  }
  const declared = new Set(raw.graph.op_domains);
  const unknown = [...declared].filter((domain) => !RUNTIME_DOMAINS.includes(domain)).sort();
  if (unknown.length) {
    throw new ExportFolderError(
      `${SIDECAR_NAME} declares operator domain(s) ${unknown.join(", ")}; this runner runs only ${RUNTIME_DOMAINS.join(", ")}`,
    );
  }
  const used = new Set([...facts.domains].map((domain) => domain || DEFAULT_DOMAIN));
  const undeclared = [...used].filter((domain) => !declared.has(domain)).sort();
  if (undeclared.length) {
    throw new ExportFolderError(
      `${name} uses operator domain(s) ${undeclared.join(", ")}, which ${SIDECAR_NAME} does not declare ` +
        `(graph.op_domains: ${[...declared].sort().join(", ")}); the graph was changed. Re-export`,
    );
  }
  for (const operator of FILE_READING_OPERATORS) {
    if (facts.operators.has(operator)) {
      throw new ExportFolderError(
        `${name} has a ${operator.replace("/", ".")} node, which loads a file named inside the graph; ` +
          "exports never contain one, so it is refused",
      );
    }
  }
}

/** Every file entry ({file, sha256, bytes}) the sidecar lists: graph, external data, tokenizer. */
function listedFiles(raw) {
  return [raw.graph, ...raw.graph.external_data, ...(raw.tokenizer ? [raw.tokenizer] : [])];
}

/** A listed file's name, refusing absolute paths, `..` and drive letters; returns it with "/" separators. */
export function checkRelative(relative, namedBy) {
  if (typeof relative !== "string" || !relative || relative.includes("\0")) {
    throw new ExportFolderError(`${namedBy} names an invalid file ${JSON.stringify(relative)}`);
  }
  const parts = relative.replaceAll("\\", "/").split("/");
  if (relative.startsWith("/") || relative.startsWith("\\") || parts.includes("..") || relative.includes(":")) {
    throw new ExportFolderError(
      `${namedBy} names ${JSON.stringify(relative)}, which points outside the export folder; ` +
        "files must be plain names relative to the folder",
    );
  }
  return parts.join("/");
}

function checkSha256(name, actual, expected) {
  if (actual !== String(expected).toLowerCase()) {
    throw new ExportFolderError(
      `${name.split("/").at(-1)} does not match the sha256 recorded in ${SIDECAR_NAME} ` +
        `(expected ${expected}, got ${actual}); the file was changed or corrupted, re-export`,
    );
  }
}

function eosIds(eos) {
  if (eos === null || eos === undefined) return [];
  return Array.isArray(eos) ? eos.map(Number) : [Number(eos)];
}

function isObject(value) {
  return value !== null && typeof value === "object" && !Array.isArray(value);
}
