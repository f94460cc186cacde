// Decoding parameters, the logits processors and the sampler, in the Python runtime's order
// (gptneo_onnx/runtime/sampling.py, itself transformers' order): repetition penalty, EOS
// suppression for min_new_tokens, then when sampling temperature, top-k and top-p.
//
// Scores stay in a Float32Array, so the penalty and the temperature round to float32 as numpy
// does, and greedy decoding picks the same tokens as Python. Seeded sampling uses its own generator (xoshiro128**), so it is reproducible run to
// run but does not draw the same tokens as Python's numpy generator for the same seed.

import { GenerationConfigError } from "./errors.js";

// The Python runtime's GenerationConfig defaults, for keys the sidecar's `generation` lacks.
const BASE_CONFIG = {
  max_new_tokens: 20,
  min_new_tokens: 0,
  do_sample: false,
  temperature: 1.0,
  top_k: 50,
  top_p: 1.0,
  repetition_penalty: 1.0,
  num_beams: 1,
  seed: null,
  eos_token_id: null, // null: the sidecar's special_tokens.eos_token_id
};

/** The sidecar's `generation` defaults, then the non-null `overrides`; validated. */
export function generationConfig(defaults, overrides = {}) {
  const config = { ...BASE_CONFIG };
  for (const source of [defaults, overrides]) {
    for (const key of Object.keys(BASE_CONFIG)) {
      if (source[key] !== null && source[key] !== undefined) config[key] = source[key];
    }
  }
  validate(config);
  return config;
}

function validate(config) {
  const isInt = Number.isInteger;
  const checks = [
    [isInt(config.max_new_tokens) && config.max_new_tokens >= 1, "max_new_tokens must be an integer >= 1"],
    [isInt(config.min_new_tokens) && config.min_new_tokens >= 0, "min_new_tokens must be an integer >= 0"],
    [isInt(config.top_k) && config.top_k >= 0, "top_k must be an integer >= 0 (0 disables top-k)"],
    [config.top_p > 0 && config.top_p <= 1, "top_p must be in (0, 1]"],
    [config.repetition_penalty > 0, "repetition_penalty must be > 0 (1.0 = no penalty)"],
    [!config.do_sample || config.temperature > 0, "temperature must be > 0 when sampling"],
    [config.seed === null || isInt(config.seed), "seed must be an integer"],
  ];
  for (const [ok, message] of checks) {
    if (!ok) {
      const name = message.split(" ")[0];
      throw new GenerationConfigError(`${message}; got ${name}=${JSON.stringify(config[name])}`);
    }
  }
  if (config.num_beams !== 1) {
    throw new GenerationConfigError(
      `this runner decodes greedily or by sampling; beam search (num_beams=${config.num_beams}) is Python-only, pass --num-beams 1`,
    );
  }
}

/** Process one row of float32 `scores` in place; `tokens` is the whole row so far (prompt included). */
export function processScores(scores, tokens, newTokens, config, eosTokenIds) {
  if (config.repetition_penalty !== 1.0) applyRepetitionPenalty(scores, tokens, config.repetition_penalty);
  if (newTokens < config.min_new_tokens) for (const eos of eosTokenIds) scores[eos] = -Infinity;
  if (config.do_sample) {
    if (config.temperature !== 1.0) {
      const temperature = Math.fround(config.temperature);
      for (let i = 0; i < scores.length; i++) scores[i] = scores[i] / temperature;
    }
    if (config.top_k) applyTopK(scores, config.top_k);
    if (config.top_p < 1.0) applyTopP(scores, config.top_p);
  }
  return scores;
}

/** transformers' RepetitionPenaltyLogitsProcessor: each token seen in the row is penalized once. */
function applyRepetitionPenalty(scores, tokens, penalty) {
  const p = Math.fround(penalty);
  for (const token of new Set(tokens)) {
    const score = scores[token];
    scores[token] = score < 0 ? score * p : score / p; // the Float32Array store rounds as numpy's float32 op
  }
}

/** Keep the k highest scores (ties with the k-th stay). */
function applyTopK(scores, topK) {
  const k = Math.min(topK, scores.length);
  const kth = Float32Array.from(scores).sort()[scores.length - k];
  for (let i = 0; i < scores.length; i++) if (scores[i] < kth) scores[i] = -Infinity;
}

/** Keep the smallest set of tokens whose probability sums to top_p (at least one). */
function applyTopP(scores, topP) {
  const order = Array.from(scores.keys()).sort((a, b) => scores[a] - scores[b] || a - b); // ascending, stable
  const probs = softmax(order.map((i) => scores[i]));
  let cumulative = 0;
  for (let rank = 0; rank < order.length - 1; rank++) {
    cumulative += probs[rank];
    if (cumulative <= 1 - topP) scores[order[rank]] = -Infinity;
  }
}

export function softmax(values) {
  let max = -Infinity;
  for (const v of values) if (v > max) max = v;
  const exp = values.map((v) => Math.exp(v - max));
  const total = exp.reduce((a, b) => a + b, 0);
  return exp.map((v) => v / total);
}

/** The index of the highest score; the first on ties, as numpy's argmax. */
export function argmax(scores) {
  let best = 0;
  for (let i = 1; i < scores.length; i++) if (scores[i] > scores[best]) best = i;
  return best;
}

/** Draw one index from softmax(scores) with `random()` in [0, 1). */
export function sample(scores, random) {
  const probs = softmax(Array.from(scores));
  const cdf = new Float64Array(probs.length);
  let total = 0;
  for (let i = 0; i < probs.length; i++) cdf[i] = total += probs[i];
  const draw = random() * total;
  let index = 0;
  while (index < cdf.length - 1 && cdf[index] <= draw) index++;
  return index;
}

/** A seeded generator of doubles in [0, 1): xoshiro128** seeded through splitmix32. */
export function seededRandom(seed) {
  let s = (seed ?? Math.floor(Math.random() * 2 ** 32)) >>> 0;
  const splitmix = () => {
    s = (s + 0x9e3779b9) >>> 0;
    let z = s;
    z = Math.imul(z ^ (z >>> 16), 0x85ebca6b) >>> 0;
    z = Math.imul(z ^ (z >>> 13), 0xc2b2ae35) >>> 0;
    return (z ^ (z >>> 16)) >>> 0;
  };
  const state = [splitmix(), splitmix(), splitmix(), splitmix()];
  const next = () => {
    const result = Math.imul(rotl(Math.imul(state[1], 5) >>> 0, 7), 9) >>> 0;
    const t = (state[1] << 9) >>> 0;
    state[2] ^= state[0];
    state[3] ^= state[1];
    state[1] ^= state[2];
    state[0] ^= state[3];
    state[2] ^= t;
    state[3] = rotl(state[3], 11);
    return result;
  };
  return () => ((next() >>> 5) * 67108864 + (next() >>> 6)) / 9007199254740992; // 53 random bits
}

function rotl(x, k) {
  return ((x << k) | (x >>> (32 - k))) >>> 0;
}
