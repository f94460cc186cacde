// The page: load an export folder (a URL, or a folder picked from disk), then stream a completion
// of the prompt token by token, with the decode rate. The decoding is the Node runner's
// (clients/node/lib), so the page gives the Python runtime's tokens for the same settings.

import { IncrementalDecoder } from "../node/lib/streaming.js";
import { loadCausalLM, runtimeVersion } from "./load-web.js";
import { PickedFolder, UrlFolder } from "./web-folder.js";

const $ = (id) => document.getElementById(id);
let model = null;

function setStatus(text, state) {
  $("status").textContent = text;
  $("status").dataset.state = state;
}

function showError(error) {
  setStatus(`error: ${error.message ?? error}`, "error");
}

async function load(folder) {
  $("generate").disabled = true;
  setStatus(`Loading and verifying ${folder.name} ...`, "loading");
  const started = performance.now();
  model = await loadCausalLM(folder);
  const { raw } = model.sidecar;
  const seconds = ((performance.now() - started) / 1000).toFixed(1);
  $("model-info").textContent =
    `${raw.task} export, ${raw.flavor} ${raw.precision}, ${raw.model.num_layers} layers, ` +
    `context ${raw.model.max_position_embeddings}; sha256 verified; ${runtimeVersion()}; loaded in ${seconds} s`;
  $("max-new-tokens").value = model.generationConfig().max_new_tokens;
  $("generate").disabled = false;
  setStatus("Ready: type a prompt and press Generate.", "ready");
}

async function generate() {
  const prompt = $("prompt").value;
  const sampling = $("do-sample").checked;
  const config = model.generationConfig({
    max_new_tokens: Number($("max-new-tokens").value) || null,
    do_sample: sampling,
    seed: sampling ? Number($("seed").value) : null,
  });
  const promptIds = model.checkPrompt(model.encode(prompt), config.max_new_tokens);
  $("generate").disabled = true;
  $("output-prompt").textContent = prompt;
  $("completion").textContent = "";
  $("token-ids").textContent = "";
  const decoder = new IncrementalDecoder((ids) => model.decode(ids));
  const tokenIds = [];
  const started = performance.now();
  let firstToken = null;
  const rate = () => {
    const seconds = (performance.now() - firstToken) / 1000;
    const perSecond = tokenIds.length > 1 && seconds > 0 ? ((tokenIds.length - 1) / seconds).toFixed(1) : "-";
    return `${tokenIds.length} tokens, ${perSecond} tokens/s (prompt: ${promptIds.length} tokens in ${(firstToken - started).toFixed(0)} ms)`;
  };
  setStatus(`Generating (prompt: ${promptIds.length} tokens) ...`, "generating");
  for await (const event of model.generate([promptIds], config)) {
    if (event.type !== "step" || !event.active[0]) continue;
    firstToken ??= performance.now();
    tokenIds.push(event.tokenIds[0]);
    $("completion").textContent += decoder.push(event.tokenIds[0]);
    setStatus(`${rate()} ...`, "generating");
    await new Promise((resolve) => setTimeout(resolve, 0)); // let the page paint each token
  }
  $("completion").textContent += decoder.flush();
  $("token-ids").textContent = JSON.stringify({ prompt: promptIds, completion: tokenIds });
  setStatus(`Done: ${rate()}`, "done");
  $("generate").disabled = false;
}

function run(task) {
  task().catch((error) => {
    showError(error);
    $("generate").disabled = model === null;
  });
}

$("load").addEventListener("click", () => run(() => load(new UrlFolder($("export-url").value || "/export/"))));
$("export-folder").addEventListener("change", (event) => run(() => load(new PickedFolder(event.target.files))));
$("generate").addEventListener("click", () => run(generate));
const fromQuery = new URLSearchParams(location.search).get("export");
if (fromQuery) {
  $("export-url").value = fromQuery;
  run(() => load(new UrlFolder(fromQuery)));
}
