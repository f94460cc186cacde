"""The single-pass heads: sequence and token classification, question answering, embeddings.

Inputs are left-padded with the pad token (or EOS); the graphs compute position ids from the
mask, and sequence classification pools at the last non-pad token inside the graph.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from tokenizers import Encoding

from gptneo_onnx.runtime.encoding import (
    Prompt,
    as_batch,
    as_texts,
    check_token_ids,
    encode_prompts,
    encode_texts,
    left_pad,
)
from gptneo_onnx.runtime.errors import InputError
from gptneo_onnx.runtime.model import Model
from gptneo_onnx.runtime.postprocess import (
    best_answer_span,
    group_entities,
    label_scores,
    pool_hidden_states,
    tag_tokens,
)


def _is_int(value: object) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


class _SinglePassModel(Model):
    def run_ids(self, rows: list[list[int]]) -> tuple[dict[str, np.ndarray], np.ndarray]:
        """Run left-padded token ids; returns the outputs by name and the attention mask."""
        check_token_ids(rows, self.manifest.vocab_size)
        limit = self.manifest.max_position_embeddings
        longest = max(len(row) for row in rows)
        if longest > limit:
            raise InputError(
                f"an input of {longest} tokens exceeds max_position_embeddings ({limit}); shorten it"
            )
        input_ids, attention_mask = left_pad(rows, self.pad_token_id)
        io = self.manifest.io  # graph names by role, from the sidecar
        feeds = {io["input_ids"]: input_ids, io["attention_mask"]: attention_mask}
        outputs = self.session.run(self.manifest.output_names, feeds)
        return dict(zip(self.manifest.output_names, outputs)), attention_mask

    def _labels(self) -> dict[int, str]:
        return self.manifest.id2label


class SequenceClassifier(_SinglePassModel):
    task = "sequence-classification"

    def classify(self, texts: Prompt | Sequence[Prompt], top_k: int | None = None) -> list[list[dict]]:
        """Per input, [{"label", "score"}] sorted by softmax score (all labels, or the top_k)."""
        if top_k is not None and not (_is_int(top_k) and top_k >= 1):
            raise InputError(f"top_k must be None (all labels) or an integer >= 1, got {top_k!r}")
        outputs, _ = self.run_ids(encode_prompts(as_batch(texts), self.tokenizer))
        return [label_scores(row, self._labels(), top_k) for row in outputs["logits"]]


class TokenClassifier(_SinglePassModel):
    task = "token-classification"

    def tag(self, texts: str | Sequence[str]) -> list[dict]:
        """Per text: {"tokens": per-token labels with offsets, "entities": merged spans}."""
        texts = as_texts(texts)
        encodings = encode_texts(texts, self.tokenizer)
        outputs, _ = self.run_ids([encoding.ids for encoding in encodings])
        results = []
        for text, encoding, logits in zip(texts, encodings, outputs["logits"]):
            count = len(encoding.ids)
            tagged = tag_tokens(logits[-count:], encoding.tokens, encoding.offsets, self._labels())
            results.append(
                {"tokens": [vars(token) for token in tagged], "entities": group_entities(tagged, text)}
            )
        return results


class QuestionAnswerer(_SinglePassModel):
    """Extractive QA. The input is `question` then `context`, tokenized as a pair and concatenated
    with no separator; only the context's tokens (the pair's second sequence) can be the answer."""

    task = "question-answering"

    def encode_pair(self, question: str, context: str) -> Encoding:
        if self.tokenizer is None:
            raise InputError("this export has no tokenizer; question answering needs tokenizer.json")
        if not question or not context:
            raise InputError("question and context must both be non-empty")
        return self.tokenizer.encode(question, context)

    def answer(
        self, question: str | Sequence[str], context: str | Sequence[str], max_answer_length: int = 30
    ) -> list[dict]:
        """Per (question, context): {"answer", "score", "start", "end"}; offsets index the context."""
        if not (_is_int(max_answer_length) and max_answer_length >= 1):
            raise InputError(f"max_answer_length must be an integer >= 1, got {max_answer_length!r}")
        questions, contexts = as_texts(question, "question"), as_texts(context, "context")
        if len(questions) != len(contexts):
            raise InputError(f"got {len(questions)} questions but {len(contexts)} contexts")
        encodings = [self.encode_pair(q, c) for q, c in zip(questions, contexts)]
        outputs, _ = self.run_ids([encoding.ids for encoding in encodings])
        results = []
        for index, (text, encoding) in enumerate(zip(contexts, encodings)):
            count = len(encoding.ids)
            context_mask = np.array([sequence == 1 for sequence in encoding.sequence_ids])
            start, end, score = best_answer_span(
                outputs["start_logits"][index, -count:], outputs["end_logits"][index, -count:],
                context_mask, max_answer_length,
            )  # fmt: skip
            char_start, char_end = encoding.offsets[start][0], encoding.offsets[end][1]
            while char_start < char_end and text[char_start].isspace():
                char_start += 1
            results.append(
                {
                    "answer": text[char_start:char_end],
                    "score": score,
                    "start": char_start,
                    "end": char_end,
                    "start_token": start,
                    "end_token": end,
                }  # fmt: skip
            )
        return results


class Embedder(_SinglePassModel):
    """The base model: one vector per input from the last hidden states."""

    task = "base"

    def embed(
        self, texts: Prompt | Sequence[Prompt], pooling: str = "mean", normalize: bool = False
    ) -> np.ndarray:
        """(B, hidden) float32 embeddings, `mean` or `last`-token pooled over the mask."""
        if pooling not in ("mean", "last"):
            raise InputError(f"unknown pooling {pooling!r}; expected 'mean' or 'last'")
        if not isinstance(normalize, (bool, np.bool_)):
            raise InputError(f"normalize must be True or False, got {normalize!r}")
        outputs, mask = self.run_ids(encode_prompts(as_batch(texts), self.tokenizer))
        vectors = pool_hidden_states(outputs["last_hidden_state"].astype(np.float32), mask, pooling)
        if normalize:
            vectors = vectors / np.maximum(np.linalg.norm(vectors, axis=-1, keepdims=True), 1e-12)
        return vectors
