// Beam search, step for step the Python runtime's (gptneo_onnx/runtime/beam_search.py, a port of
// transformers' vectorized `_beam_search`), so it returns the same tokens: the same candidate pool
// (max(2, 1 + number of EOS ids) * num_beams per prompt), the same -1e9 masking, length penalty
// and early-stopping heuristic, and the same float32 arithmetic (Math.fround at every step
// numpy rounds). Beam sampling (do_sample) draws the candidates without replacement from the
// shared generator (docs/sidecar.md), as Python does. Environment-neutral; `step` as in
// decoding.js, and `reorder(cache, rows)` selects cache rows.

import { checkChoices, logSoftmax32, processScores, sampleWithoutReplacement, seededRandom } from "./sampling.js";
import { checkFinite, leftPad } from "./decoding.js";

const BIG = Math.fround(1e9);
const fround = Math.fround;

/** Indices of the `k` largest `values`, largest first, ties by the lowest index (a stable argsort of -values). */
function topK(values, k) {
  const sorted = Float32Array.from(values).sort(); // ascending; the k-th largest is the threshold
  const threshold = sorted[Math.max(0, sorted.length - k)];
  const candidates = [];
  for (let i = 0; i < values.length; i++) if (values[i] >= threshold) candidates.push(i);
  return candidates.sort((a, b) => values[b] - values[a] || a - b).slice(0, k);
}

/** Add `-BIG` where `flags` are set, as numpy's `scores + flags.astype(float32) * -BIG`. */
function maskScores(scores, flags) {
  return scores.map((score, i) => fround(score + (flags[i] ? -BIG : -0)));
}

export async function* beamSearch(step, reorder, prompts, config, eos, pad) {
  const { num_beams: beams, length_penalty: lengthPenalty, early_stopping: earlyStopping } = config;
  const padded = leftPad(prompts, pad);
  const batch = prompts.length;
  const promptLength = padded.ids[0].length;
  const maxLength = promptLength + config.max_new_tokens;
  const pool = Math.max(2, 1 + eos.length) * beams;
  const random = config.do_sample ? seededRandom(config.seed) : null;
  const keep = config.do_sample ? Math.max(2, eos.length + 1) : 1; // top-k / top-p keep this many
  // Per prompt b: running beams (sequences, scores, beam indices) and the finished pool.
  let runningRows = padded.ids.map((row) => Array.from({ length: beams }, () => [...row]));
  let runningScores = Array.from({ length: batch }, () => Array.from({ length: beams }, (_, k) => (k ? -BIG : 0)));
  let runningIndices = Array.from({ length: batch }, () => Array.from({ length: beams }, () => []));
  let finished = padded.ids.map((row) => Array.from({ length: beams }, () => [...row]));
  let finishedScores = Array.from({ length: batch }, () => new Array(beams).fill(-BIG));
  let finishedIndices = Array.from({ length: batch }, () => Array.from({ length: beams }, () => []));
  let isFinished = Array.from({ length: batch }, () => new Array(beams).fill(false));
  let unsatisfied = new Array(batch).fill(true);
  const mask = padded.mask.flatMap((row) => Array.from({ length: beams }, () => [...row]));

  let curLen = promptLength;
  let cache = null;
  while (true) {
    const flat = runningRows.flat();
    const ids = cache === null ? flat : flat.map((row) => [row.at(-1)]);
    let logits;
    ({ logits, cache } = await step(ids, mask, cache));
    checkFinite(logits);
    const logProbs = logits.map((row, r) => processScores(logSoftmax32(row), flat[r], curLen - promptLength, config, eos, keep));
    checkChoices(logProbs);
    const vocab = logProbs[0].length;
    const hitsAll = [];
    const nextRunning = [], nextScores = [], nextIndices = [];
    const reorderRows = [];
    for (let b = 0; b < batch; b++) {
      const scores = new Float32Array(beams * vocab);
      for (let k = 0; k < beams; k++) {
        const row = logProbs[b * beams + k];
        for (let v = 0; v < vocab; v++) scores[k * vocab + v] = row[v] + runningScores[b][k];
      }
      // c. the top candidates over all beams of this prompt
      const top = random ? sampleWithoutReplacement(scores, pool, random) : topK(scores, pool);
      const topScores = top.map((i) => scores[i]);
      const topBeam = top.map((i) => Math.floor(i / vocab));
      const topIds = top.map((i) => i % vocab);
      const topSequences = top.map((_, c) => [...runningRows[b][topBeam[c]], topIds[c]]);
      const topIndices = top.map((_, c) => [...runningIndices[b][topBeam[c]], topBeam[c] + b * beams]);
      // d. which candidates stop: max length or EOS
      const hits = topIds.map((id) => curLen + 1 >= maxLength || eos.includes(id));
      hitsAll.push(...hits);
      // e. the best `beams` unfinished candidates keep running
      const runningLogProbs = maskScores(topScores, hits);
      const keepRunning = topK(runningLogProbs, beams);
      nextRunning.push(keepRunning.map((c) => topSequences[c]));
      nextScores.push(keepRunning.map((c) => runningLogProbs[c]));
      nextIndices.push(keepRunning.map((c) => topIndices[c]));
      reorderRows.push(...keepRunning.map((c) => topIndices[c].at(-1)));
      // f. finished candidates among the top `beams` join the finished pool if good enough
      const justFinished = hits.map((hit, c) => hit && c < beams);
      const penalty = fround((curLen + 1 - promptLength) ** lengthPenalty);
      let candidateScores = topScores.map((score) => fround(score / penalty));
      const beamsFull = isFinished[b].every(Boolean) && earlyStopping === true;
      candidateScores = maskScores(candidateScores, candidateScores.map(() => beamsFull));
      candidateScores = maskScores(candidateScores, candidateScores.map(() => !unsatisfied[b]));
      candidateScores = maskScores(candidateScores, justFinished.map((flag) => !flag));
      const merged = [...finishedScores[b], ...candidateScores];
      const keep = topK(merged, beams);
      const mergedSequences = [...finished[b], ...topSequences];
      const mergedIndices = [...finishedIndices[b], ...topIndices];
      const mergedFinished = [...isFinished[b], ...justFinished];
      finished[b] = keep.map((c) => mergedSequences[c]);
      finishedScores[b] = keep.map((c) => merged[c]);
      finishedIndices[b] = keep.map((c) => mergedIndices[c]);
      isFinished[b] = keep.map((c) => mergedFinished[c]);
    }
    runningRows = nextRunning;
    runningScores = nextScores;
    runningIndices = nextIndices;
    // g. follow the surviving beams' caches, then decide whether to go on
    cache = reorder(cache, reorderRows);
    for (const row of mask) row.push(1);
    curLen += 1;
    const bestLength = earlyStopping === "never" && lengthPenalty > 0 ? maxLength - promptLength : curLen - promptLength;
    const lengthScale = fround(bestLength ** lengthPenalty);
    unsatisfied = unsatisfied.map((flag, b) => {
      const bestRunning = fround(runningScores[b][0] / lengthScale);
      const worst = Math.min(...finishedScores[b]);
      return flag && isFinished[b].some((done) => bestRunning > (done ? worst : -BIG));
    });
    yield { type: "beam-step", step: curLen - promptLength - 1, runningSequences: runningRows, runningScores };
    const openBeam = !(isFinished.flat().every(Boolean) && earlyStopping === true);
    if (!(unsatisfied.some(Boolean) && openBeam && !hitsAll.every(Boolean))) break;
  }

  const sequences = [], finishReasons = [], promptIndex = [], scores = [];
  for (let b = 0; b < batch; b++) {
    for (let k = 0; k < config.num_return_sequences; k++) {
      const tokens = finished[b][k].slice(promptLength, promptLength + finishedIndices[b][k].length);
      sequences.push(tokens);
      scores.push(finishedScores[b][k]);
      promptIndex.push(b);
      finishReasons.push(tokens.length && eos.includes(tokens.at(-1)) ? "eos" : "length");
    }
  }
  yield { type: "result", sequences, finishReasons, promptIndex, scores };
}
