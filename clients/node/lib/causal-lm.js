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
//
// Environment-neutral: onnxruntime comes in as `ort` (onnxruntime-node from load-node.js,
// onnxruntime-web from clients/web), the session and tokenizer ready-made. Batches are
// left-padded, as the sidecar's io.padding_side says.

import { Tokenizer } from "@huggingface/tokenizers";

import { beamSearch } from "./beam-search.js";
import { decode } from "./decoding.js";
import { ExportFolderError, InputError } from "./errors.js";
import { generationConfig } from "./sampling.js";
import { ioSpec } from "./sidecar.js";

const INT_ARRAYS = { int64: BigInt64Array, int32: Int32Array };
const FLOAT_ARRAYS = { float32: Float32Array, float16: Uint16Array }; // float16 tensors take raw bits
const CACHE_MODES = ["auto", "concat", "shared-buffer"];

export class CausalLM {
  /**
   * `cacheMode`: auto (shared-buffer when offered), concat or shared-buffer. `feedOptionalInputs`:
   * feed `num_logits_to_keep` (format x.2) so the lm_head runs on the last position only;
   * onnxruntime-node takes it, onnxruntime-web refuses feeds outside `session.inputNames`.
   */
  constructor({ ort, sidecar, session, tokenizer, cacheMode = "auto", feedOptionalInputs = false }) {
    this.ort = ort;
    this.feedOptionalInputs = feedOptionalInputs;
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
  checkPrompt(ids, maxNewTokens, truncate = false, index = 0) {
    if (!ids.length) throw new InputError(`prompt ${index} is empty; every prompt needs at least one token`);
    const vocab = this.sidecar.vocabSize;
    const bad = ids.find((id) => !Number.isInteger(id) || id < 0 || id >= vocab);
    if (bad !== undefined) {
      throw new InputError(
        `prompt ${index} has token id ${bad} outside the vocabulary [0, ${vocab}); check the tokenizer matches this export`,
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
   * Decode a batch of prompts (arrays of token ids, checked by checkPrompt), left-padded: greedy,
   * sampling or beam search as `config` says. Yields {type: "step", step, tokenIds, active} per
   * token (beam search: {type: "beam-step", ...}), then {type: "result", sequences,
   * finishReasons, promptIndex, scores}, as the Python runtime's generate_steps.
   */
  async *generate(prompts, config) {
    const eos = config.eos_token_id === null ? this.sidecar.eosTokenIds : [].concat(config.eos_token_id);
    const pad = this.sidecar.padTokenId ?? eos[0] ?? 0;
    const capacity = Math.max(...prompts.map((row) => row.length)) + config.max_new_tokens;
    const step = async (ids, mask, cache) => {
      cache ??= this.emptyCache(ids.length, capacity);
      return { logits: await this.forward(ids, mask, cache), cache };
    };
    const reorder = (cache, rows) => this.reorderCache(cache, rows);
    yield* config.num_beams > 1
      ? beamSearch(step, reorder, prompts, config, eos, pad)
      : decode(step, prompts, config, eos, pad);
  }

  /**
   * Run the graph on `newIds` (one array per row, equal lengths) with `mask` (per row, past + new
   * columns); returns each row's last-position float32 logits (copies). `cache` grows in place.
   */
  async forward(newIds, mask, cache) {
    const ort = this.ort;
    const spec = (role) => ioSpec(this.sidecar, this.io[role]);
    const batch = newIds.length;
    const length = newIds[0].length;
    const total = mask[0].length;
    const feeds = {
      [this.io.input_ids]: intTensor(ort, spec("input_ids").dtype, newIds.flat(), [batch, length]),
      [this.io.attention_mask]: intTensor(ort, spec("attention_mask").dtype, mask.flat(), [batch, total]),
    };
    if (this.io.position_ids) {
      // io.position_ids_rule "cumsum_minus_one": cumsum(mask) - 1, clipped at 0, new tokens only
      const positions = mask.flatMap((row) => {
        let seen = 0;
        return row.map((column) => Math.max((seen += column) - 1, 0)).slice(total - length);
      });
      feeds[this.io.position_ids] = intTensor(ort, spec("position_ids").dtype, positions, [batch, length]);
    }
    const local = this.localWindow;
    if (local) {
      const columns = cache.localRows + length; // the local layers' rows, then the new tokens
      const localMask = mask.flatMap((row) => row.slice(total - columns));
      feeds[local.input] = intTensor(ort, spec("attention_mask").dtype, localMask, [batch, columns]);
    }
    if (this.io.num_logits_to_keep && this.feedOptionalInputs) {
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
    if (local) this.trimLocal(cache, cache.localRows + length);
    const logits = results[this.io.logits];
    const vocab = logits.dims.at(-1);
    if (vocab !== this.sidecar.vocabSize) {
      throw new ExportFolderError(
        `the graph gives ${vocab} logits per token but the sidecar's vocab_size is ${this.sidecar.vocabSize}; re-export the folder`,
      );
    }
    const rowSize = logits.data.length / batch; // (batch, length or 1, vocab)
    return Array.from({ length: batch }, (_, b) => logits.data.slice((b + 1) * rowSize - vocab, (b + 1) * rowSize));
  }

  /** The local layers now hold `rows` rows: past min_rows + slack, keep only the newest min_rows. */
  trimLocal(cache, rows) {
    const { min_rows: keep, slack, pastNames } = this.localWindow;
    cache.localRows = rows;
    if (rows <= keep + slack) return;
    for (const name of pastNames) {
      const tensor = cache.pasts[name];
      const [batch, heads, capacity, width] = tensor.dims; // (batch, heads, rows or capacity, head_dim)
      if (this.cacheMode === "shared-buffer") {
        for (let h = 0; h < batch * heads; h++) {
          const base = h * capacity * width;
          tensor.data.copyWithin(base, base + (rows - keep) * width, base + rows * width);
        }
      } else {
        const data = new this.cacheArray(batch * heads * keep * width);
        for (let h = 0; h < batch * heads; h++) {
          const from = (h * capacity + rows - keep) * width;
          data.set(tensor.data.subarray(from, from + keep * width), h * keep * width);
        }
        cache.pasts[name] = new this.ort.Tensor(tensor.type, data, [batch, heads, keep, width]);
      }
    }
    cache.localRows = keep;
  }

  /** Select cache rows (beam search): row i of the result is row rows[i]; shared buffers are rewritten in place. */
  reorderCache(cache, rows) {
    for (const [name, tensor] of Object.entries(cache.pasts)) {
      const rowSize = tensor.data.length / tensor.dims[0];
      const data = this.cacheMode === "shared-buffer" ? tensor.data : new this.cacheArray(rows.length * rowSize);
      const source = this.cacheMode === "shared-buffer" ? tensor.data.slice() : tensor.data;
      rows.forEach((row, i) => data.set(source.subarray(row * rowSize, (row + 1) * rowSize), i * rowSize));
      if (data !== tensor.data) cache.pasts[name] = new this.ort.Tensor(tensor.type, data, [rows.length, ...tensor.dims.slice(1)]);
    }
    return cache;
  }

  /** Pasts for a prefill of `batch` rows: 0 rows (concat) or zeroed buffers of `capacity` rows (shared-buffer). */
  emptyCache(batch, capacity) {
    const pastAxis = this.sidecar.cache.layout.indexOf("past_sequence_length");
    const rows = this.cacheMode === "shared-buffer" ? capacity : 0;
    const pasts = {};
    for (const layer of this.layers) {
      for (const name of [layer.past_key, layer.past_value]) {
        const dims = ioSpec(this.sidecar, name).shape.map((dim, axis) => {
          if (axis === pastAxis) return rows;
          if (dim === "batch_size") return batch;
          if (Number.isInteger(dim)) return dim;
          throw new ExportFolderError(`cannot size ${name}: its axis ${axis} is ${JSON.stringify(dim)}`);
        });
        const size = dims.reduce((a, b) => a * b, 1);
        pasts[name] = new this.ort.Tensor(this.sidecar.cache.dtype, new this.cacheArray(size), dims);
      }
    }
    return { pasts, capacity, localRows: 0 };
  }
}

function intTensor(ort, dtype, values, dims) {
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
      `${sidecar.graph.name} does not match its gptneo_onnx.json: missing inputs [${missingInputs}], ` +
        `missing outputs [${missingOutputs}]; re-export the folder`,
    );
  }
}

/** The export's tokenizer (null when it has none), which must fit the model: every token id below vocab_size. */
export async function loadTokenizer(sidecar) {
  if (!sidecar.tokenizer) return null;
  const where = `${sidecar.folder.name}/${sidecar.tokenizer.name}`;
  let tokenizer;
  try {
    tokenizer = new Tokenizer(JSON.parse(await sidecar.tokenizer.text()), {});
  } catch (error) {
    throw new ExportFolderError(`${where} is not a valid tokenizers JSON file: ${error.message}`);
  }
  let largest = -1;
  let largestToken = null;
  for (const [token, id] of tokenizer.get_vocab(true)) {
    if (id > largest) [largest, largestToken] = [id, token];
  }
  if (largest >= sidecar.vocabSize) {
    throw new ExportFolderError(
      `${where} does not fit the model: token ${JSON.stringify(largestToken)} has id ${largest}, ` +
        `but the model's vocab_size is ${sidecar.vocabSize}. The tokenizer belongs to another model; re-export with the checkpoint's own`,
    );
  }
  return tokenizer;
}
