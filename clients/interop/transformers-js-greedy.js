#!/usr/bin/env node
// Greedy completions of a gptneo-onnx export in transformers.js, loaded as any user would load it:
// from_pretrained(folder), nothing renamed or added (docs/interop.md).
//
//   node transformers-js-greedy.js <export folder> <max new tokens> <prompt> [<prompt> ...]
//
// The prompts go in as one left-padded batch; prints JSON {input_ids, sequences} (token ids).
import { AutoModelForCausalLM, AutoTokenizer, env } from "@huggingface/transformers";

env.allowRemoteModels = false; // a local folder only: never the hub

const ids = (tensor) => tensor.tolist().map((row) => row.map(Number)); // int64 arrives as BigInt

try {
  const [folder, maxNewTokens, ...prompts] = process.argv.slice(2);
  if (!folder || !(Number(maxNewTokens) > 0) || prompts.length === 0) {
    throw new Error("usage: transformers-js-greedy.js <export folder> <max new tokens> <prompt>...");
  }
  const tokenizer = await AutoTokenizer.from_pretrained(folder);
  const model = await AutoModelForCausalLM.from_pretrained(folder, {
    session_options: { intraOpNumThreads: 1, interOpNumThreads: 1 },
  });
  const inputs = tokenizer(prompts, { padding: true });
  const sequences = await model.generate({ ...inputs, max_new_tokens: Number(maxNewTokens), do_sample: false });
  console.log(JSON.stringify({ input_ids: ids(inputs.input_ids), sequences: ids(sequences) }));
} catch (error) {
  console.error(`error: ${error.message.split("\n")[0]}`);
  process.exit(1);
}
