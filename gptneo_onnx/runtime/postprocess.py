"""Post-processing for the single-pass heads: raw logits in, what a user wants out.

Pure numpy; the head classes in `head_models.py` feed these with the graph's outputs.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from gptneo_onnx.runtime.errors import InputError
from gptneo_onnx.runtime.sampling import softmax

OUTSIDE_LABEL = "O"
QA_MASK_VALUE = -10000.0  # what transformers' QA pipeline puts on tokens outside the context


def label_scores(logits: np.ndarray, id2label: dict[int, str], top_k: int | None = None) -> list[dict]:
    """Sequence classification, one row: [{"label", "score"}] by softmax score, best first."""
    probs = softmax(logits.astype(np.float64))
    order = np.argsort(-probs, kind="stable")[: top_k or len(probs)]
    return [{"label": id2label.get(int(i), f"LABEL_{int(i)}"), "score": float(probs[i])} for i in order]


@dataclass
class TaggedToken:
    index: int  # position in the encoding
    token: str
    label: str
    score: float
    start: int  # character offsets into the text
    end: int


def tag_tokens(
    logits: np.ndarray, tokens: list[str], offsets: list[tuple[int, int]], id2label: dict[int, str]
) -> list[TaggedToken]:
    """Token classification, one text: the argmax label and its softmax score per token. (S, L) logits."""
    probs = softmax(logits.astype(np.float64))
    best = probs.argmax(axis=-1)
    return [
        TaggedToken(
            index=i,
            token=tokens[i],
            label=id2label.get(int(best[i]), f"LABEL_{int(best[i])}"),
            score=float(probs[i, best[i]]),
            start=int(offsets[i][0]),
            end=int(offsets[i][1]),
        )
        for i in range(len(tokens))
    ]


def _split_label(label: str) -> tuple[str | None, str]:
    """'B-PER' -> ('B', 'PER'), 'I-PER' -> ('I', 'PER'), 'PER' -> (None, 'PER')."""
    if len(label) > 2 and label[1] in "-_" and label[0] in "BIES":
        return label[0], label[2:]
    return None, label


def group_entities(tagged: list[TaggedToken], text: str) -> list[dict]:
    """Merge tagged tokens into entity spans.

    Rules: `O` is outside. `B-X` (or `S-X`) starts an entity of type X. `I-X` / `E-X` continue
    the current entity when it is of type X, else start one. A plain label `X` continues an
    entity of type X started by the previous token, else starts one. The span's score is the
    mean of its tokens' scores; its offsets drop surrounding whitespace, and whitespace-only
    spans are dropped. Byte-level BPE may split one character (an emoji) into several tokens
    with the same offsets: a token that shares a character with the previous one goes where the
    previous one went (into its entity, or outside), so a character is never in two spans.
    """
    entities: list[dict] = []
    current: dict | None = None
    previous_end, previous_entity = -1, None
    for token in tagged:
        if token.start < previous_end:  # the rest of a character the previous token began
            if previous_entity is not None:
                previous_entity["end"] = max(previous_entity["end"], token.end)
                previous_entity["scores"].append(token.score)
                previous_entity["tokens"].append(token.index)
            previous_end = max(previous_end, token.end)
            continue
        previous_end = token.end
        prefix, kind = _split_label(token.label)
        if token.label == OUTSIDE_LABEL:
            current = previous_entity = None
            continue
        continues = current is not None and current["label"] == kind and prefix not in ("B", "S")
        if continues:
            current["end"] = max(current["end"], token.end)
            current["scores"].append(token.score)
            current["tokens"].append(token.index)
        else:
            current = {"label": kind, "start": token.start, "end": token.end, "scores": [token.score],
                       "tokens": [token.index]}  # fmt: skip
            entities.append(current)
        previous_entity = current
        if prefix in ("E", "S"):
            current = None
    spans = []
    for entity in entities:
        start, end = _strip_span(text, entity["start"], entity["end"])
        if start == end:  # only whitespace (byte-level BPE has tokens that are just a space)
            continue
        spans.append(
            {
                "label": entity["label"],
                "score": float(np.mean(entity["scores"])),
                "start": start,
                "end": end,
                "text": text[start:end],
                "tokens": entity["tokens"],
            }
        )
    return spans


def _strip_span(text: str, start: int, end: int) -> tuple[int, int]:
    while start < end and text[start].isspace():
        start += 1
    while end > start and text[end - 1].isspace():
        end -= 1
    return start, end


def best_answer_span(
    start_logits: np.ndarray, end_logits: np.ndarray, context_mask: np.ndarray, max_answer_length: int
) -> tuple[int, int, float]:
    """The (start, end, score) token span with start <= end, both in the context, at most
    `max_answer_length` tokens long, maximizing p_start * p_end, as transformers' QA pipeline.

    Tokens outside the context get QA_MASK_VALUE before the softmax over the sequence.
    """
    if max_answer_length < 1:
        raise InputError(f"max_answer_length must be >= 1, got {max_answer_length}")
    if not context_mask.any():
        raise InputError("the context has no tokens; pass a non-empty context")
    outside = ~context_mask.astype(bool)
    start = np.where(outside, QA_MASK_VALUE, start_logits.astype(np.float64))
    end = np.where(outside, QA_MASK_VALUE, end_logits.astype(np.float64))
    start_probs, end_probs = softmax(start), softmax(end)
    candidates = np.tril(np.triu(np.outer(start_probs, end_probs)), max_answer_length - 1)
    candidates[outside, :] = 0.0  # the pipeline discards spans that start or end outside the context
    candidates[:, outside] = 0.0
    best = int(np.argmax(candidates))
    start_index, end_index = np.unravel_index(best, candidates.shape)
    return int(start_index), int(end_index), float(candidates[start_index, end_index])


def pool_hidden_states(hidden: np.ndarray, attention_mask: np.ndarray, pooling: str) -> np.ndarray:
    """(B, S, H) -> (B, H): `mean` over the mask, or `last` (the last token with mask 1)."""
    mask = attention_mask.astype(hidden.dtype)
    if pooling == "mean":
        return (hidden * mask[..., None]).sum(axis=1) / np.maximum(mask.sum(axis=1, keepdims=True), 1)
    if pooling == "last":
        last = hidden.shape[1] - 1 - np.argmax(attention_mask[:, ::-1], axis=1)
        return hidden[np.arange(hidden.shape[0]), last]
    raise InputError(f"unknown pooling {pooling!r}; expected 'mean' or 'last'")
