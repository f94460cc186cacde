// Load a causal-lm export folder in Node: the sidecar and its files checked (node-files.js),
// an onnxruntime-node session, the tokenizer; the runner itself is the neutral causal-lm.js.

import ort from "onnxruntime-node";

import { CausalLM, loadTokenizer } from "./causal-lm.js";
import { ExportFolderError, InputError } from "./errors.js";
import { NodeFolder } from "./node-files.js";
import { loadSidecar } from "./sidecar.js";

/** Load and verify an export folder; `cacheMode` is auto (shared-buffer when offered), concat or shared-buffer. */
export async function loadCausalLM(folder, { verify = true, cacheMode = "auto", threads = null } = {}) {
  const sidecar = await loadSidecar(new NodeFolder(folder), { verify });
  // logSeverityLevel 3 (errors): onnxruntime warns on every load that `num_logits_to_keep`, an
  // input with a default value (docs/sidecar.md), is not folded as a constant.
  const options = { executionProviders: ["cpu"], graphOptimizationLevel: "all", logSeverityLevel: 3 };
  if (threads !== null) {
    if (threads < 0) throw new InputError(`--threads must be >= 0 (0 = onnxruntime's default), got ${threads}`);
    options.intraOpNumThreads = threads;
  }
  let session;
  try {
    session = await ort.InferenceSession.create(sidecar.graph.path, options);
  } catch (error) {
    throw new ExportFolderError(
      `onnxruntime-node ${ort.env.versions.node} could not load ${sidecar.graph.path}: ${error.message}; ` +
        `the file may be damaged (load without --no-verify to check it) or need a newer onnxruntime ` +
        `(the export was made with onnxruntime ${sidecar.raw.tools?.onnxruntime ?? "unknown"})`,
    );
  }
  const tokenizer = await loadTokenizer(sidecar);
  return new CausalLM({ ort, sidecar, session, tokenizer, cacheMode, feedOptionalInputs: true });
}
