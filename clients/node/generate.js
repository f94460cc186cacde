#!/usr/bin/env node
// Generate text with a gptneo-onnx causal-lm export, without Python:
//   node generate.js EXPORT_DIR "prompt" ["prompt" ...] [--max-new-tokens N] [--do-sample
//        --temperature T --top-k K --top-p P --seed S] [--num-beams N] [--token-ids] [--json]
// One prompt streams its completion to stdout; several run as one left-padded batch and print
// one completion per line. --json prints token ids and text as one JSON object.
// Decoding defaults come from the export's sidecar. Errors the user can fix exit with 2.

import { parseArgs } from "node:util";

import { RuntimeModelError } from "./lib/errors.js";

const USAGE = `usage: node generate.js EXPORT_DIR PROMPT [PROMPT ...] [options]

decoding (defaults come from the export's gptneo_onnx.json):
  --max-new-tokens N      --min-new-tokens N      --do-sample | --greedy
  --temperature T         --top-k K (0 = off)     --top-p P
  --repetition-penalty R  --seed S                --eos-token-id ID (repeatable)
  --ignore-eos            always generate max_new_tokens tokens
  --num-beams N           --length-penalty L      --early-stopping true|false|never
  --num-return-sequences N                        --truncate (keep the last tokens of a too-long prompt)
input and output:
  --token-ids             each PROMPT is token ids: "12,5,99"
  --json                  print {prompt_token_ids: [per prompt], sequences: [{prompt_index, token_ids, text, finish_reason, score}]}
runtime:
  --cache-mode MODE       auto (default: shared-buffer when offered), concat, shared-buffer
  --threads N             intra-op threads (default: onnxruntime's)
  --no-verify             skip the sha256 checks of the export's files
`;

const OPTIONS = {
  "max-new-tokens": { type: "string" },
  "min-new-tokens": { type: "string" },
  "do-sample": { type: "boolean" },
  greedy: { type: "boolean" },
  temperature: { type: "string" },
  "top-k": { type: "string" },
  "top-p": { type: "string" },
  "repetition-penalty": { type: "string" },
  seed: { type: "string" },
  "eos-token-id": { type: "string", multiple: true },
  "ignore-eos": { type: "boolean" },
  "num-beams": { type: "string" },
  "length-penalty": { type: "string" },
  "early-stopping": { type: "string" },
  "num-return-sequences": { type: "string" },
  truncate: { type: "boolean" },
  "token-ids": { type: "boolean" },
  json: { type: "boolean" },
  "cache-mode": { type: "string", default: "auto" },
  threads: { type: "string" },
  "no-verify": { type: "boolean" },
  help: { type: "boolean", short: "h" },
};

class UsageError extends Error {}

function number(values, name, integer) {
  const text = values[name];
  if (text === undefined) return null;
  const value = Number(text);
  if (text.trim() === "" || !Number.isFinite(value) || (integer && !Number.isInteger(value))) {
    throw new UsageError(`--${name} must be ${integer ? "an integer" : "a number"}, got ${JSON.stringify(text)}`);
  }
  return value;
}

function parseTokenIds(text) {
  const parts = text.split(/[\s,]+/).filter(Boolean);
  const ids = parts.map(Number);
  if (ids.some((id) => !Number.isInteger(id))) {
    throw new UsageError(`--token-ids prompts must be integers separated by commas, got ${JSON.stringify(text)}`);
  }
  return ids;
}

/** `--top-k -1` as argparse reads it: a negative number after an option that takes a value is its value. */
function joinNegativeValues(argv) {
  const args = [];
  for (let i = 0; i < argv.length; i++) {
    const name = argv[i].startsWith("--") ? argv[i].slice(2) : null;
    if (OPTIONS[name]?.type === "string" && /^-[\d.]/.test(argv[i + 1] ?? "")) args.push(`${argv[i]}=${argv[++i]}`);
    else args.push(argv[i]);
  }
  return args;
}

async function main(argv) {
  let parsed;
  try {
    parsed = parseArgs({ args: joinNegativeValues(argv), options: OPTIONS, allowPositionals: true, strict: true });
  } catch (error) {
    throw new UsageError(error.message);
  }
  const { values, positionals } = parsed;
  if (values.help) {
    process.stdout.write(USAGE);
    return 0;
  }
  if (positionals.length < 2) throw new UsageError(`expected EXPORT_DIR and at least one PROMPT, got ${positionals.length} arguments\n${USAGE}`);
  const [exportDir, ...prompts] = positionals;
  const stopping = values["early-stopping"];
  if (stopping !== undefined && !["true", "false", "never"].includes(stopping)) {
    throw new UsageError(`--early-stopping must be true, false or never, got ${JSON.stringify(stopping)}`);
  }
  const overrides = {
    max_new_tokens: number(values, "max-new-tokens", true),
    min_new_tokens: number(values, "min-new-tokens", true),
    do_sample: values["do-sample"] ? true : values.greedy ? false : null,
    temperature: number(values, "temperature", false),
    top_k: number(values, "top-k", true),
    top_p: number(values, "top-p", false),
    repetition_penalty: number(values, "repetition-penalty", false),
    seed: number(values, "seed", true),
    num_beams: number(values, "num-beams", true),
    length_penalty: number(values, "length-penalty", false),
    early_stopping: stopping === undefined ? null : stopping === "never" ? "never" : stopping === "true",
    num_return_sequences: number(values, "num-return-sequences", true),
    eos_token_id: values["ignore-eos"] ? [] : values["eos-token-id"]?.map((id) => number({ "eos-token-id": id }, "eos-token-id", true)) ?? null,
  };
  const threads = number(values, "threads", true);

  let loadCausalLM;
  try {
    ({ loadCausalLM } = await import("./lib/load-node.js"));
  } catch (error) {
    if (error.code !== "ERR_MODULE_NOT_FOUND") throw error;
    throw new UsageError(
      `${error.message}\nthe runner's packages are not installed: run ` +
        "`cd clients/node && ONNXRUNTIME_NODE_INSTALL_CUDA=skip npm ci`",
    );
  }
  const model = await loadCausalLM(exportDir, { verify: !values["no-verify"], cacheMode: values["cache-mode"], threads });
  const { warnIfUnvalidated } = await import("./lib/sidecar.js");
  warnIfUnvalidated(model.sidecar); // after every check passed: a refused folder gets only its error
  const config = model.generationConfig(overrides);
  const promptIds = prompts.map((prompt, index) =>
    model.checkPrompt(values["token-ids"] ? parseTokenIds(prompt) : model.encode(prompt), config.max_new_tokens, values.truncate, index),
  );
  const stream = prompts.length === 1 && config.num_beams === 1 && config.num_return_sequences === 1 && !values.json;
  if (!stream) {
    let result;
    for await (const event of model.generate(promptIds, config)) result = event;
    const sequences = result.sequences.map((tokenIds, i) => ({
      prompt_index: result.promptIndex[i],
      text: model.tokenizer ? model.decode(tokenIds) : null,
      token_ids: tokenIds,
      finish_reason: result.finishReasons[i],
      ...(result.scores ? { score: result.scores[i] } : {}),
    }));
    if (values.json) {
      const payload = { runtime: "node", provider: "cpu", cache_mode: model.cacheMode, prompt_token_ids: promptIds, sequences };
      process.stdout.write(`${JSON.stringify(payload, null, 2)}\n`);
    } else {
      for (const sequence of sequences) {
        const context = values["token-ids"] ? "" : prompts[sequence.prompt_index];
        process.stdout.write(`${sequence.text === null ? sequence.token_ids.join(" ") : context + sequence.text}\n`);
      }
    }
    return 0;
  }
  const { IncrementalDecoder } = await import("./lib/streaming.js");
  const decoder = model.tokenizer ? new IncrementalDecoder((ids) => model.decode(ids)) : null;
  if (decoder && !values["token-ids"]) process.stdout.write(prompts[0]); // the completion reads in context
  for await (const event of model.generate(promptIds, config)) {
    if (event.type !== "step" || !event.active[0]) continue;
    const tokenId = event.tokenIds[0];
    process.stdout.write(decoder ? decoder.push(tokenId) : `${tokenId} `);
  }
  process.stdout.write(`${decoder ? decoder.flush() : ""}\n`);
  return 0;
}

// A reader that goes away (`| head -c 10`) ends the run quietly, as Unix tools do (exit 141 = 128 + SIGPIPE).
process.stdout.on("error", (error) => {
  if (error.code !== "EPIPE") throw error;
  process.exit(141);
});

try {
  process.exitCode = await main(process.argv.slice(2));
} catch (error) {
  const userError = error instanceof UsageError || error instanceof RuntimeModelError;
  process.stderr.write(`error: ${userError ? error.message : error.stack}\n`);
  process.exitCode = userError ? 2 : 1;
}
