// Greedy / sampling decoding over a left-padded batch, as the Python runtime's
// (gptneo_onnx/runtime/generation.py `decode`, itself transformers' `_sample`): the same
// processors, finished rows get the pad token, one uniform per row per step when sampling.
// Environment-neutral. Events: {type: "step", step, tokenIds, active} per step, then
// {type: "result", sequences, finishReasons, promptIndex, scores}.
//
// step(ids, mask, cache) -> {logits: [Float32Array per row], cache}: the model's forward on the
// new ids (one array per row), `mask` the rows' masks over past + new columns; cache null at the prefill.

import { NumericalError } from "./errors.js";
import { argmax, checkChoices, processScores, sample, seededRandom } from "./sampling.js";

/** Prompts (arrays of ids) padded on the left with `pad`: {ids, mask}, arrays of rows. */
export function leftPad(prompts, pad) {
  const longest = Math.max(...prompts.map((row) => row.length));
  return {
    ids: prompts.map((row) => [...new Array(longest - row.length).fill(pad), ...row]),
    mask: prompts.map((row) => [...new Array(longest - row.length).fill(0), ...new Array(row.length).fill(1)]),
  };
}

export function checkFinite(rows) {
  if (rows.every((row) => row.every(Number.isFinite))) return;
  const bad = rows.some((row) => row.some(Number.isNaN)) ? "NaN" : "Inf";
  throw new NumericalError(
    `the model produced ${bad} logits; the export may overflow in its precision (try a float32 export) or the weights are corrupted`,
  );
}

/** Greedy or sampling decoding; rows are repeated num_return_sequences times when sampling. */
export async function* decode(step, prompts, config, eos, pad) {
  const repeat = config.do_sample ? config.num_return_sequences : 1;
  const padded = leftPad(prompts.flatMap((row) => new Array(repeat).fill(row)), pad);
  const tokens = padded.ids;
  const mask = padded.mask;
  const batch = tokens.length;
  const random = config.do_sample ? seededRandom(config.seed) : null;
  const active = new Array(batch).fill(true);
  const reasons = new Array(batch).fill(null);
  const sequences = tokens.map(() => []);
  let { logits, cache } = await step(tokens, mask, null);
  for (let index = 0; index < config.max_new_tokens; index++) {
    checkFinite(logits.filter((_, row) => active[row]));
    const scores = logits.map((row, b) => processScores(row, tokens[b], index, config, eos));
    checkChoices(scores.filter((_, row) => active[row]));
    const next = scores.map((row, b) => {
      const drawn = random ? sample(row, random) : argmax(row); // every row draws, finished ones too
      return active[b] ? drawn : pad;
    });
    const produced = [...active];
    for (let b = 0; b < batch; b++) {
      tokens[b].push(next[b]);
      mask[b].push(1);
      if (!produced[b]) continue;
      sequences[b].push(next[b]);
      if (eos.includes(next[b])) reasons[b] = "eos";
      else if (index + 1 === config.max_new_tokens) reasons[b] = "length";
      if (reasons[b] !== null) active[b] = false;
    }
    yield { type: "step", step: index, tokenIds: next, active: produced };
    if (!active.some(Boolean)) break;
    ({ logits, cache } = await step(next.map((id) => [id]), mask, cache));
  }
  yield {
    type: "result",
    sequences,
    finishReasons: reasons.map((reason) => reason ?? "length"),
    promptIndex: sequences.map((_, row) => Math.floor(row / repeat)),
    scores: null,
  };
}
