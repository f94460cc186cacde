// A causal-lm export driven by its sidecar alone: prefill, then one decode step per token with
// the KV cache. Names, dtypes, shapes, the cache layout and the input rules come from
// gptneo_onnx.json (docs/sidecar.md); nothing here is specific to GPT-Neo.
//
// Cache modes (sidecar `cache.mode` / `cache.modes`):
// - concat: pasts start with 0 rows; each step feeds the presents back as the next pasts.
// - shared-buffer: one zeroed (batch, ..., capacity, ...) buffer per past tensor, passed both as
//   the past input and as the preallocated present output, so the graph writes new rows in place.
// With `cache.local_window` (format 2), local layers' caches keep only their newest rows: their
// own mask input covers those rows plus the new tokens, and once they pass min_rows + slack the
// newest min_rows move to the front (as gptneo_onnx/runtime/local_window.py does).

import fs from "node:fs";

import { Tokenizer } from "@huggingface/tokenizers";
import ort from "onnxruntime-node";

import { ExportFolderError, InputError, NumericalError } from "./errors.js";
import { argmax, generationConfig, processScores, sample, seededRandom } from "./sampling.js";
import { ioSpec, loadSidecar } from "./sidecar.js";

const INT_ARRAYS = { int64: BigInt64Array, int32: Int32Array };
const FLOAT_ARRAYS = { float32: Float32Array, float16: Uint16Array }; // float16 tensors take raw bits
const CACHE_MODES = ["auto", "concat", "shared-buffer"];

export class CausalLM {
  /** Load and verify an export folder; `cacheMode` is auto (shared-buffer when offered), concat or shared-buffer. */
  static async load(folder, { verify = true, cacheMode = "auto", threads = null } = {}) {
    const sidecar = loadSidecar(folder, { verify });
    // logSeverityLevel 3 (errors): onnxruntime warns on every load that `num_logits_to_keep`, an
    // input with a default value (docs/sidecar.md), is not folded as a constant.
    const options = { executionProviders: ["cpu"], graphOptimizationLevel: "all", logSeverityLevel: 3 };
    if (threads !== null) {
      if (threads < 0) throw new InputError(`--threads must be >= 0 (0 = onnxruntime's default), got ${threads}`);
      options.intraOpNumThreads = threads;
    }
    let session;
    try {
      session = await ort.InferenceSession.create(sidecar.graphPath, options);
    } catch (error) {
      throw new ExportFolderError(
        `onnxruntime-node ${ort.env.versions.node} could not load ${sidecar.graphPath}: ${error.message}; ` +
          `the file may be damaged (load without --no-verify to check it) or need a newer onnxruntime ` +
          `(the export was made with onnxruntime ${sidecar.raw.tools?.onnxruntime ?? "unknown"})`,
      );
    }
    const tokenizer = sidecar.tokenizerPath ? loadTokenizer(sidecar) : null;
    return new CausalLM(sidecar, session, tokenizer, cacheMode);
  }

  constructor(sidecar, session, tokenizer, cacheMode) {
    this.sidecar = sidecar;
    this.session = session;
    this.tokenizer = tokenizer;
    this.io = sidecar.io;
    this.layers = sidecar.cache.layers;
    checkGraphIO(sidecar, session);
    const modes = sidecar.cache.modes || ["concat"];
    if (!CACHE_MODES.includes(cacheMode)) {
      throw new InputError(`unknown cache mode ${JSON.stringify(cacheMode)}; expected one of ${CACHE_MODES.join(", ")}`);
    }
    if (cacheMode === "auto") cacheMode = modes.includes("shared-buffer") ? "shared-buffer" : "concat";
    if (!modes.includes(cacheMode)) {
      throw new InputError(`cache mode ${JSON.stringify(cacheMode)} is not offered by this export; it offers ${modes.join(", ")}`);
    }
    this.cacheMode = cacheMode;
    const local = sidecar.cache.local_window ?? null;
    this.localWindow = local && {
      ...local,
      slack: Math.max(1, Math.floor(local.window / 4)),
      pastNames: this.layers.filter((l) => l.window).flatMap((l) => [l.past_key, l.past_value]),
    };
    this.cacheArray = FLOAT_ARRAYS[sidecar.cache.dtype];
    if (!this.cacheArray) throw new ExportFolderError(`unsupported cache dtype ${JSON.stringify(sidecar.cache.dtype)}`);
    const logits = ioSpec(sidecar, this.io.logits);
    if (logits.dtype !== "float32") {
      throw new ExportFolderError(`this runner reads float32 logits; ${this.io.logits} is ${logits.dtype}`);
    }
    if (logits.shape.at(-1) !== sidecar.vocabSize) {
      throw new ExportFolderError(
        `${this.io.logits} has ${logits.shape.at(-1)} logits per token but the sidecar's vocab_size is ${sidecar.vocabSize}; re-export the folder`,
      );
    }
  }

  /** Token ids of a text prompt, as Python's `tokenizers` encodes it. */
  encode(text) {
    if (this.tokenizer === null) {
      throw new InputError("this export has no tokenizer, so prompts must be token ids (--token-ids \"12,5,99\")");
    }
    if (!text) return [];
    const addSpecial = this.sidecar.raw.tokenizer.add_special_tokens ?? true;
    return this.tokenizer.encode(text, { add_special_tokens: addSpecial }).ids.map(Number);
  }

  /** Text of token ids, special tokens skipped as the sidecar says. */
  decode(ids) {
    if (!ids.length) return ""; // tokenizers.js refuses an empty list
    const skipSpecial = this.sidecar.raw.tokenizer?.skip_special_tokens ?? true;
    return this.tokenizer.decode(ids, { skip_special_tokens: skipSpecial, clean_up_tokenization_spaces: false });
  }

  /** Check prompt ids and fit prompt + max_new_tokens in the context (messages as the Python runtime's). */
  checkPrompt(ids, maxNewTokens, truncate = false) {
    if (!ids.length) throw new InputError("prompt 0 is empty; every prompt needs at least one token");
    const vocab = this.sidecar.vocabSize;
    const bad = ids.find((id) => !Number.isInteger(id) || id < 0 || id >= vocab);
    if (bad !== undefined) {
      throw new InputError(
        `prompt 0 has token id ${bad} outside the vocabulary [0, ${vocab}); check the tokenizer matches this export`,
      );
    }
    const maxPositions = this.sidecar.maxPositions;
    const budget = maxPositions - maxNewTokens;
    if (budget < 1) {
      throw new InputError(
        `max_new_tokens (${maxNewTokens}) leaves no room for a prompt: the model's max_position_embeddings is ${maxPositions}`,
      );
    }
    if (ids.length <= budget) return ids;
    if (truncate) return ids.slice(-budget);
    throw new InputError(
      `a prompt of ${ids.length} tokens plus max_new_tokens=${maxNewTokens} exceeds the model's ` +
        `max_position_embeddings (${maxPositions}); shorten the prompt, lower max_new_tokens, ` +
        "or pass --truncate to keep the last tokens",
    );
  }

  /** The sidecar's decoding defaults with `overrides` applied, validated. */
  generationConfig(overrides = {}) {
    return generationConfig(this.sidecar.generation, overrides);
  }

  /**
   * Decode from prompt token ids; yields {step, tokenId, finishReason} per new token
   * (finishReason "eos" or "length" on the last one, else null).
   */
  async *generate(promptIds, config) {
    const eos = config.eos_token_id === null ? this.sidecar.eosTokenIds : [].concat(config.eos_token_id);
    const random = config.do_sample ? seededRandom(config.seed) : null;
    const tokens = [...promptIds];
    const cache = this.emptyCache(promptIds.length + config.max_new_tokens);
    let logits = await this.forward(promptIds, tokens.length, cache);
    for (let step = 0; step < config.max_new_tokens; step++) {
      if (!logits.every(Number.isFinite)) {
        throw new NumericalError(
          "the model produced NaN or Inf logits; the export may overflow in its precision (try a float32 export) or the weights are corrupted",
        );
      }
      const scores = processScores(logits, tokens, step, config, eos);
      const tokenId = config.do_sample ? sample(scores, random) : argmax(scores);
      tokens.push(tokenId);
      const finishReason = eos.includes(tokenId) ? "eos" : step + 1 === config.max_new_tokens ? "length" : null;
      yield { step, tokenId, finishReason };
      if (finishReason !== null) return;
      logits = await this.forward([tokenId], tokens.length, cache);
    }
  }

  /** Run the graph on `newIds` with `total` tokens so far; returns the last position's float32 logits (a copy). */
  async forward(newIds, total, cache) {
    const spec = (role) => ioSpec(this.sidecar, this.io[role]);
    const mask = new Array(total).fill(1); // one row, no padding: every column is a real token
    const feeds = {
      [this.io.input_ids]: intTensor(spec("input_ids").dtype, newIds, [1, newIds.length]),
      [this.io.attention_mask]: intTensor(spec("attention_mask").dtype, mask, [1, total]), // past + new columns
    };
    if (this.io.position_ids) {
      let seen = 0; // io.position_ids_rule "cumsum_minus_one": cumsum(mask) - 1, clipped at 0, new tokens only
      const positions = mask.map((column) => Math.max((seen += column) - 1, 0)).slice(total - newIds.length);
      feeds[this.io.position_ids] = intTensor(spec("position_ids").dtype, positions, [1, newIds.length]);
    }
    const local = this.localWindow;
    if (local) {
      const columns = cache.localRows + newIds.length; // the local layers' rows, then the new tokens
      feeds[local.input] = intTensor(spec("attention_mask").dtype, mask.slice(total - columns), [1, columns]);
    }
    if (this.io.num_logits_to_keep) {
      // format x.2: the lm_head runs on the last position only (this runner reads no other)
      feeds[this.io.num_logits_to_keep] = new ort.Tensor("int64", BigInt64Array.from([1n]), []);
    }
    Object.assign(feeds, cache.pasts);
    let results;
    if (this.cacheMode === "shared-buffer") {
      if (total > cache.capacity) {
        throw new InputError(`${total} tokens exceed the cache capacity (${cache.capacity})`);
      }
      const fetches = { [this.io.logits]: null };
      for (const layer of this.layers) {
        fetches[layer.present_key] = cache.pasts[layer.past_key];
        fetches[layer.present_value] = cache.pasts[layer.past_value];
      }
      results = await this.session.run(feeds, fetches);
    } else {
      results = await this.session.run(feeds);
      for (const layer of this.layers) {
        cache.pasts[layer.past_key] = results[layer.present_key];
        cache.pasts[layer.past_value] = results[layer.present_value];
      }
    }
    if (local) this.trimLocal(cache, cache.localRows + newIds.length);
    const logits = results[this.io.logits];
    const vocab = logits.dims.at(-1);
    if (vocab !== this.sidecar.vocabSize) {
      throw new ExportFolderError(
        `the graph gives ${vocab} logits per token but the sidecar's vocab_size is ${this.sidecar.vocabSize}; re-export the folder`,
      );
    }
    return Float32Array.from(logits.data.subarray(logits.data.length - vocab));
  }

  /** The local layers now hold `rows` rows: past min_rows + slack, keep only the newest min_rows. */
  trimLocal(cache, rows) {
    const { min_rows: keep, slack, pastNames } = this.localWindow;
    cache.localRows = rows;
    if (rows <= keep + slack) return;
    for (const name of pastNames) {
      const tensor = cache.pasts[name];
      const [heads, capacity, width] = tensor.dims.slice(1); // (1, heads, rows or capacity, head_dim)
      if (this.cacheMode === "shared-buffer") {
        for (let h = 0; h < heads; h++) {
          const base = h * capacity * width;
          tensor.data.copyWithin(base, base + (rows - keep) * width, base + rows * width);
        }
      } else {
        const data = new this.cacheArray(heads * keep * width);
        for (let h = 0; h < heads; h++) {
          const from = (h * capacity + rows - keep) * width;
          data.set(tensor.data.subarray(from, from + keep * width), h * keep * width);
        }
        cache.pasts[name] = new ort.Tensor(tensor.type, data, [1, heads, keep, width]);
      }
    }
    cache.localRows = keep;
  }

  /** Pasts for a prefill: 0 rows (concat) or zeroed buffers of `capacity` rows (shared-buffer). */
  emptyCache(capacity) {
    const pastAxis = this.sidecar.cache.layout.indexOf("past_sequence_length");
    const rows = this.cacheMode === "shared-buffer" ? capacity : 0;
    const pasts = {};
    for (const layer of this.layers) {
      for (const name of [layer.past_key, layer.past_value]) {
        const dims = ioSpec(this.sidecar, name).shape.map((dim, axis) => {
          if (axis === pastAxis) return rows;
          if (dim === "batch_size") return 1;
          if (Number.isInteger(dim)) return dim;
          throw new ExportFolderError(`cannot size ${name}: its axis ${axis} is ${JSON.stringify(dim)}`);
        });
        const size = dims.reduce((a, b) => a * b, 1);
        pasts[name] = new ort.Tensor(this.sidecar.cache.dtype, new this.cacheArray(size), dims);
      }
    }
    return { pasts, capacity, localRows: 0 };
  }
}

function intTensor(dtype, values, dims) {
  if (!(dtype in INT_ARRAYS)) throw new ExportFolderError(`unsupported integer input dtype ${JSON.stringify(dtype)}`);
  const data = dtype === "int64" ? BigInt64Array.from(values, BigInt) : Int32Array.from(values);
  return new ort.Tensor(dtype, data, dims);
}

/** The graph's input and output names must be the ones the sidecar promises. */
function checkGraphIO(sidecar, session) {
  const missingInputs = sidecar.raw.inputs.map((i) => i.name).filter((n) => !session.inputNames.includes(n));
  const missingOutputs = sidecar.raw.outputs.map((o) => o.name).filter((n) => !session.outputNames.includes(n));
  if (missingInputs.length || missingOutputs.length) {
    throw new ExportFolderError(
      `${sidecar.graphPath} does not match its gptneo_onnx.json: missing inputs [${missingInputs}], ` +
        `missing outputs [${missingOutputs}]; re-export the folder`,
    );
  }
}

/** The export's tokenizer, which must fit the model: every token id below vocab_size. */
function loadTokenizer(sidecar) {
  let tokenizer;
  try {
    tokenizer = new Tokenizer(JSON.parse(fs.readFileSync(sidecar.tokenizerPath, "utf8")), {});
  } catch (error) {
    throw new ExportFolderError(`${sidecar.tokenizerPath} is not a valid tokenizers JSON file: ${error.message}`);
  }
  let largest = -1;
  let largestToken = null;
  for (const [token, id] of tokenizer.get_vocab(true)) {
    if (id > largest) [largest, largestToken] = [id, token];
  }
  if (largest >= sidecar.vocabSize) {
    throw new ExportFolderError(
      `${sidecar.tokenizerPath} does not fit the model: token ${JSON.stringify(largestToken)} has id ${largest}, ` +
        `but the model's vocab_size is ${sidecar.vocabSize}. The tokenizer belongs to another model; re-export with the checkpoint's own`,
    );
  }
  return tokenizer;
}
