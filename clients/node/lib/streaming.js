// Token ids to text pieces, as the Python runtime streams them (gptneo_onnx/runtime/streaming.py):
// byte-level BPE splits multi-byte characters across tokens, and a token decoded alone then
// ends with U+FFFD. Text is held back until it no longer does, so every piece is final.

const REPLACEMENT_CHARACTER = "\ufffd";

export class IncrementalDecoder {
  constructor(decode) {
    this.decode = decode; // (ids) => text, special tokens skipped
    this.tokenIds = [];
    this.prefixOffset = 0; // start of the window decoded for context
    this.readOffset = 0; // tokens before this have been emitted
  }

  /** Add one token; return the new text it completes ("" while a character is incomplete). */
  push(tokenId) {
    this.tokenIds.push(tokenId);
    const emitted = this.decode(this.tokenIds.slice(this.prefixOffset, this.readOffset));
    const current = this.decode(this.tokenIds.slice(this.prefixOffset));
    if (current.length > emitted.length && !current.endsWith(REPLACEMENT_CHARACTER)) {
      this.prefixOffset = this.readOffset;
      this.readOffset = this.tokenIds.length;
      return current.slice(emitted.length);
    }
    return "";
  }

  /** The text still held back (an incomplete character decodes to U+FFFD here). */
  flush() {
    const emitted = this.decode(this.tokenIds.slice(this.prefixOffset, this.readOffset));
    const current = this.decode(this.tokenIds.slice(this.prefixOffset));
    this.prefixOffset = this.readOffset = this.tokenIds.length;
    return current.slice(emitted.length);
  }
}
