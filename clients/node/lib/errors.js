// The runner's errors, named as in the Python runtime (gptneo_onnx/runtime/errors.py). Each
// message says what was wrong, the limit, and what to do; the CLI prints it as one line.

export class RuntimeModelError extends Error {
  constructor(message) {
    super(message);
    this.name = this.constructor.name;
  }
}

/** The export folder is missing, incomplete, tampered with, or not a causal-lm export. */
export class ExportFolderError extends RuntimeModelError {}

/** Bad user input: empty prompt, token id outside the vocabulary, sequence too long, ... */
export class InputError extends RuntimeModelError {}

/** Invalid decoding parameters (temperature, top_p, top_k, ...). */
export class GenerationConfigError extends RuntimeModelError {}

/** The graph produced NaN or Inf logits. */
export class NumericalError extends RuntimeModelError {}
