// Decoding parameters, the logits processors and the sampler, in the Python runtime's order
// (gptneo_onnx/runtime/sampling.py, itself transformers' order): repetition penalty, EOS
// suppression for min_new_tokens, then when sampling temperature, top-k and top-p.
//
// Scores stay in a Float32Array, so the penalty and the temperature round to float32 as numpy
// does, and greedy decoding picks the same tokens as Python. Seeded sampling draws from the
// generator and by the rule Python's does (SplitMix64, docs/sidecar.md), so a seed gives the same
// tokens in both.

import { GenerationConfigError } from "./errors.js";

const fround = Math.fround;

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
  length_penalty: 1.0,
  early_stopping: false, // true, false or "never"
  num_return_sequences: 1,
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
    [config.seed === null || (Number.isSafeInteger(config.seed) && config.seed >= 0), "seed must be an integer in [0, 2^53)"],
  ];
  for (const [ok, message] of checks) {
    if (!ok) {
      const name = message.split(" ")[0];
      throw new GenerationConfigError(`${message}; got ${name}=${JSON.stringify(config[name])}`);
    }
  }
  const beams = config.num_beams;
  if (!isInt(beams) || beams < 1) throw new GenerationConfigError(`num_beams must be an integer >= 1; got num_beams=${beams}`);
  if (![true, false, "never"].includes(config.early_stopping)) {
    throw new GenerationConfigError(`early_stopping must be true, false or "never"; got ${JSON.stringify(config.early_stopping)}`);
  }
  const count = config.num_return_sequences;
  if (!isInt(count) || count < 1) throw new GenerationConfigError(`num_return_sequences must be an integer >= 1; got ${count}`);
  if (beams > 1 && count > beams) {
    throw new GenerationConfigError(`num_return_sequences (${count}) must be <= num_beams (${beams})`);
  }
  if (beams === 1 && !config.do_sample && count > 1) {
    throw new GenerationConfigError("greedy decoding returns one sequence per prompt; pass --do-sample or --num-beams > 1");
  }
}

/** Every active row must keep a token to choose (Python's check_choices). */
export function checkChoices(rows) {
  if (rows.every((row) => row.some((score) => score > -Infinity))) return;
  throw new GenerationConfigError(
    "every token was filtered out, so there is none to choose: eos_token_id may cover the whole vocabulary while min_new_tokens still suppresses it",
  );
}

/** Process one row of float32 `scores` in place; `tokens` is the whole row so far (prompt included). */
/** `keep`: the fewest tokens top-k and top-p leave (beam sampling keeps max(2, 1 + number of EOS ids)). */
export function processScores(scores, tokens, newTokens, config, eosTokenIds, keep = 1) {
  if (config.repetition_penalty !== 1.0) applyRepetitionPenalty(scores, tokens, config.repetition_penalty);
  if (newTokens < config.min_new_tokens) for (const eos of eosTokenIds) scores[eos] = -Infinity;
  if (config.do_sample) {
    if (config.temperature !== 1.0) {
      const temperature = Math.fround(config.temperature);
      for (let i = 0; i < scores.length; i++) scores[i] = scores[i] / temperature;
    }
    if (config.top_k) applyTopK(scores, config.top_k, keep);
    if (config.top_p < 1.0) applyTopP(scores, config.top_p, keep);
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
function applyTopK(scores, topK, keep) {
  const k = Math.min(Math.max(topK, keep), scores.length);
  const kth = Float32Array.from(scores).sort()[scores.length - k];
  for (let i = 0; i < scores.length; i++) if (scores[i] < kth) scores[i] = -Infinity;
}

/** Keep the smallest set of tokens whose probability sums to top_p (at least one), in numpy's float32 arithmetic. */
function applyTopP(scores, topP, keep) {
  const order = Array.from(scores.keys()).sort((a, b) => scores[a] - scores[b] || a - b); // ascending, stable
  const probs = softmax32(Float32Array.from(order, (i) => scores[i]));
  const limit = fround(1 - topP);
  let cumulative = 0;
  for (let rank = 0; rank < order.length - keep; rank++) {
    cumulative = fround(cumulative + probs[rank]);
    if (cumulative <= limit) scores[order[rank]] = -Infinity;
  }
}

/** numpy's float32 softmax (Float32Array in and out): exp(x - max) / sum, the sum pairwise. */
function softmax32(values) {
  let max = -Infinity;
  for (const v of values) if (v > max) max = v;
  const exp = values.map((v) => Math.exp(fround(v - max)));
  const total = pairwiseSum32(exp, 0, exp.length);
  return exp.map((v) => v / total);
}

/** numpy's float32 log_softmax (Float32Array in and out): shifted - log(sum(exp(shifted))). */
export function logSoftmax32(values) {
  let max = -Infinity;
  for (const v of values) if (v > max) max = v;
  const shifted = values.map((v) => v - max);
  const exp = shifted.map((v) => Math.exp(v));
  const log = fround(Math.log(pairwiseSum32(exp, 0, exp.length)));
  return shifted.map((v) => v - log);
}

/** numpy's pairwise summation (its add.reduce over a contiguous float32 axis), in float32. */
function pairwiseSum32(a, start, n) {
  if (n < 8) {
    let sum = -0;
    for (let i = start; i < start + n; i++) sum = fround(sum + a[i]);
    return sum;
  }
  if (n <= 128) {
    const r = Array.from({ length: 8 }, (_, j) => a[start + j]);
    let i = 8;
    for (; i < n - (n % 8); i += 8) for (let j = 0; j < 8; j++) r[j] = fround(r[j] + a[start + i + j]);
    let sum = fround(fround(fround(r[0] + r[1]) + fround(r[2] + r[3])) + fround(fround(r[4] + r[5]) + fround(r[6] + r[7])));
    for (; i < n; i++) sum = fround(sum + a[start + i]);
    return sum;
  }
  let half = Math.floor(n / 2);
  half -= half % 8;
  return fround(pairwiseSum32(a, start, half) + pairwiseSum32(a, start + half, n - half));
}

/** The index of the highest score; the first on ties, as numpy's argmax. */
export function argmax(scores) {
  let best = 0;
  for (let i = 1; i < scores.length; i++) if (scores[i] > scores[best]) best = i;
  return best;
}

/**
 * Draw one index from softmax(scores) with `random()` in [0, 1), by the rule Python's sampler
 * follows (docs/sidecar.md, "Seeded sampling"): float64 weights exp(score - max), summed in token
 * order; the first index whose running sum exceeds random() * total.
 */
export function sample(scores, random) {
  let max = -Infinity;
  for (const v of scores) if (v > max) max = v;
  const cdf = new Float64Array(scores.length);
  let total = 0;
  for (let i = 0; i < scores.length; i++) cdf[i] = total += Math.exp(scores[i] - max);
  const draw = random() * total; // below the total: a token with weight > 0 always qualifies
  const index = cdf.findIndex((sum) => sum > draw);
  return index === -1 ? 0 : index; // -1 only for a row with no finite score (a finished row), as numpy's count gives 0
}

/** Draw `count` distinct indices from softmax(scores) (beam sampling): one draw after another by `sample`'s rule, each from the weights left. */
export function sampleWithoutReplacement(scores, count, random) {
  let max = -Infinity;
  for (const v of scores) if (v > max) max = v;
  const weights = Float64Array.from(scores, (v) => Math.exp(v - max));
  const available = weights.reduce((n, w) => n + (w > 0), 0);
  if (available < count) {
    throw new GenerationConfigError(
      `beam sampling needs ${count} candidates but only ${available} tokens survive the filters; raise top_k / top_p or lower num_beams`,
    );
  }
  const picked = [];
  for (let n = 0; n < count; n++) {
    let total = 0;
    const cdf = weights.map((w) => (total += w));
    const draw = random() * total;
    const index = cdf.findIndex((sum) => sum > draw);
    picked.push(index);
    weights[index] = 0;
  }
  return picked;
}

const UINT64 = (1n << 64n) - 1n;

/** splitmix64 (docs/sidecar.md): `random()` gives the top 53 bits of each output over 2^53; `seed` is taken mod 2^64. */
export class SplitMix64 {
  constructor(seed = null) {
    const entropy = () => crypto.getRandomValues(new BigUint64Array(1))[0];
    this.state = BigInt.asUintN(64, seed === null || seed === undefined ? entropy() : BigInt(seed));
  }

  nextUint64() {
    this.state = (this.state + 0x9e3779b97f4a7c15n) & UINT64;
    let z = this.state;
    z = ((z ^ (z >> 30n)) * 0xbf58476d1ce4e5b9n) & UINT64;
    z = ((z ^ (z >> 27n)) * 0x94d049bb133111ebn) & UINT64;
    return z ^ (z >> 31n);
  }

  random() {
    return Number(this.nextUint64() >> 11n) / 2 ** 53;
  }
}

/** A seeded `random()` in [0, 1): SplitMix64's, so Node and Python draw the same tokens for a seed. */
export function seededRandom(seed) {
  const generator = new SplitMix64(seed);
  return () => generator.random();
}
