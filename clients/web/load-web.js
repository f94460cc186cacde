// Load a causal-lm export in the browser: the sidecar and its files checked as the other runtimes
// check them (clients/node/lib/sidecar.js), an onnxruntime-web (wasm) session, the tokenizer.

import * as ort from "onnxruntime-web";

import { CausalLM, loadTokenizer } from "../node/lib/causal-lm.js";
import { ExportFolderError } from "../node/lib/errors.js";
import { loadSidecar } from "../node/lib/sidecar.js";

ort.env.wasm.wasmPaths = new URL("./node_modules/onnxruntime-web/dist/", import.meta.url).href;
// Threads need cross-origin isolation (COOP/COEP headers, as serve.py sends).
ort.env.wasm.numThreads = self.crossOriginIsolated ? Math.min(4, navigator.hardwareConcurrency || 1) : 1;

/**
 * Load and verify an export folder (web-folder.js). The cache is `concat`: a shared buffer needs
 * the graph to write into its input, which wasm's copies between JS and its heap don't allow.
 */
export async function loadCausalLM(folder, { verify = true } = {}) {
  const sidecar = await loadSidecar(folder, { verify });
  const externalData = sidecar.externalData.map((file) => ({ path: file.name, data: file.bytes }));
  let session;
  try {
    session = await ort.InferenceSession.create(sidecar.graph.bytes, {
      executionProviders: ["wasm"],
      graphOptimizationLevel: "all",
      externalData,
    });
  } catch (error) {
    throw new ExportFolderError(
      `onnxruntime-web ${ort.env.versions.web} could not load ${sidecar.graph.name}: ${error.message ?? error}; ` +
        `the export was made with onnxruntime ${sidecar.raw.tools?.onnxruntime ?? "unknown"}`,
    );
  }
  const tokenizer = await loadTokenizer(sidecar);
  return new CausalLM({ ort, sidecar, session, tokenizer, cacheMode: "concat" });
}

export const runtimeVersion = () => `onnxruntime-web ${ort.env.versions.web}, ${ort.env.wasm.numThreads} thread(s)`;
