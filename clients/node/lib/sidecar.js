// Read and check `gptneo_onnx.json`, the export's sidecar (schema: docs/sidecar.md).
// Everything the runner knows about the model comes from here: files and their sha256,
// IO names by role, input rules, cache layout, special tokens and decoding defaults.

import { createHash } from "node:crypto";
import fs from "node:fs";
import path from "node:path";

import { ExportFolderError } from "./errors.js";

export const SIDECAR_NAME = "gptneo_onnx.json";
const FORMAT = "gptneo-onnx";
const FORMAT_VERSIONS = [1];
const MIN_MINOR_VERSION = 1; // 1.1 added `io`, which this runner needs
const REQUIRED = ["format", "format_version", "task", "graph", "inputs", "outputs", "model", "special_tokens"];
const KNOWN_RULES = {
  padding_side: ["left"],
  attention_mask_columns: ["past_and_new"],
  position_ids_rule: ["cumsum_minus_one"],
};
const HASH_CHUNK = 1 << 20;

/** Load `gptneo_onnx.json` from `folder`, check it, the files it lists and (unless `verify` is false) their sha256. */
export function loadSidecar(folder, { verify = true } = {}) {
  if (!folder || !isDirectory(folder)) {
    throw new ExportFolderError(`export folder ${folder} does not exist or is not a folder`);
  }
  const root = fs.realpathSync(folder);
  const sidecarPath = path.join(root, SIDECAR_NAME);
  if (!fs.existsSync(sidecarPath)) {
    throw new ExportFolderError(
      `${root} has no ${SIDECAR_NAME}; is it an export folder written by \`gptneo-onnx export\`?`,
    );
  }
  let raw;
  try {
    raw = JSON.parse(fs.readFileSync(sidecarPath, "utf8"));
  } catch (error) {
    throw new ExportFolderError(`${sidecarPath} is not valid JSON: ${error.message}`);
  }
  checkFields(raw, sidecarPath);
  const files = listedFiles(raw).map(([relative, sha256]) => {
    const file = insideFolder(root, relative);
    if (verify) checkSha256(file, sha256);
    return file;
  });
  return {
    folder: root,
    raw,
    graphPath: files[0],
    tokenizerPath: raw.tokenizer ? path.join(root, raw.tokenizer.file) : null,
    io: raw.io,
    cache: raw.cache,
    vocabSize: raw.model.vocab_size,
    maxPositions: raw.model.max_position_embeddings,
    eosTokenIds: eosIds(raw.special_tokens.eos_token_id),
    padTokenId: raw.special_tokens.pad_token_id,
    generation: raw.generation || {},
  };
}

/** The graph's input/output metadata as the sidecar lists it, by name. */
export function ioSpec(sidecar, name) {
  const spec = [...sidecar.raw.inputs, ...sidecar.raw.outputs].find((item) => item.name === name);
  if (!spec) throw new ExportFolderError(`${SIDECAR_NAME} names ${name} in \`io\` or \`cache\` but does not list it`);
  return spec;
}

function checkFields(raw, sidecarPath) {
  if (raw === null || typeof raw !== "object" || Array.isArray(raw)) {
    throw new ExportFolderError(`${sidecarPath} must hold a JSON object`);
  }
  const missing = REQUIRED.filter((name) => !(name in raw));
  if (missing.length) throw new ExportFolderError(`${sidecarPath} lacks required fields: ${missing.join(", ")}`);
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
  const graph = raw.graph;
  if (!graph || typeof graph.file !== "string" || typeof graph.sha256 !== "string") {
    throw new ExportFolderError(`${sidecarPath}: \`graph\` must have \`file\` and \`sha256\``);
  }
  for (const name of ["vocab_size", "max_position_embeddings"]) {
    if (!Number.isInteger(raw.model[name])) throw new ExportFolderError(`${sidecarPath}: \`model\` lacks ${name}`);
  }
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
  if (!Array.isArray(cache.layout) || !cache.layout.includes("past_sequence_length")) {
    throw new ExportFolderError(`${sidecarPath}: \`cache.layout\` must name the past_sequence_length axis`);
  }
}

function listedFiles(raw) {
  const files = [[raw.graph.file, raw.graph.sha256]];
  for (const item of raw.graph.external_data || []) files.push([item.file, item.sha256]);
  if (raw.tokenizer) files.push([raw.tokenizer.file, raw.tokenizer.sha256]);
  return files;
}

/** The path of a listed file, refusing absolute paths, `..`, drive letters, links and non-files. */
function insideFolder(root, relative) {
  if (typeof relative !== "string" || !relative) {
    throw new ExportFolderError(`${SIDECAR_NAME} lists an invalid file name ${JSON.stringify(relative)}`);
  }
  const parts = relative.replaceAll("\\", "/").split("/");
  if (relative.startsWith("/") || relative.startsWith("\\") || parts.includes("..") || relative.includes(":")) {
    throw new ExportFolderError(
      `${SIDECAR_NAME} lists ${JSON.stringify(relative)}, which points outside the export folder; ` +
        "files must be plain names relative to the folder",
    );
  }
  const file = path.join(root, ...parts);
  let stat;
  try {
    stat = fs.lstatSync(file);
  } catch {
    throw new ExportFolderError(`${root} is missing ${relative}, which ${SIDECAR_NAME} lists; re-copy the export`);
  }
  const real = stat.isSymbolicLink() ? null : fs.realpathSync(file);
  if (real === null || path.relative(root, real).startsWith("..")) {
    throw new ExportFolderError(`${relative} in ${root} is a link; copy the real file into the export folder`);
  }
  if (!stat.isFile()) throw new ExportFolderError(`${relative} in ${root} is not a regular file`);
  return file;
}

function checkSha256(file, expected) {
  const hash = createHash("sha256");
  const buffer = Buffer.alloc(HASH_CHUNK);
  const fd = fs.openSync(file, "r");
  try {
    let read;
    while ((read = fs.readSync(fd, buffer, 0, HASH_CHUNK, null)) > 0) hash.update(buffer.subarray(0, read));
  } finally {
    fs.closeSync(fd);
  }
  const actual = hash.digest("hex");
  if (actual !== String(expected).toLowerCase()) {
    throw new ExportFolderError(
      `${path.basename(file)} does not match the sha256 recorded in ${SIDECAR_NAME} ` +
        `(expected ${expected}, got ${actual}); the file was changed or corrupted, re-export`,
    );
  }
}

function eosIds(eos) {
  if (eos === null || eos === undefined) return [];
  return Array.isArray(eos) ? eos.map(Number) : [Number(eos)];
}

function isDirectory(folder) {
  try {
    return fs.statSync(folder).isDirectory();
  } catch {
    return false;
  }
}
