"""Head post-processing: the runtime's answers against transformers' model outputs run through
the same rules, plus the rules themselves on hand-made logits."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from runtime_helpers import export_tiny, train_tokenizer

from gptneo_onnx.runtime import (
    Embedder,
    InputError,
    Model,
    QuestionAnswerer,
    SequenceClassifier,
    TokenClassifier,
)
from gptneo_onnx.runtime.postprocess import (
    TaggedToken,
    best_answer_span,
    group_entities,
    label_scores,
    pool_hidden_states,
    tag_tokens,
)

TEXTS = ["Alice met Bob in Paris.", "Zoë", "Le café est très chaud, n'est-ce pas?"]
LABELS = {0: "O", 1: "B-PER", 2: "I-PER"}


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("heads")
    train_tokenizer(folder / "tokenizer.json")
    return folder


def load(folder, task, **overrides):
    hf_model, export_dir = export_tiny(
        task, folder / task, tokenizer_file=folder / "tokenizer.json", vocab_size=320, **overrides
    )
    return hf_model, Model.load(export_dir)


def hf_run(hf_model, ids: list[int]):
    with torch.no_grad():
        return hf_model(torch.tensor([ids]))


def test_sequence_classification_matches_transformers(folder):
    hf_model, model = load(folder, "sequence-classification", id2label={0: "neg", 1: "neu", 2: "pos"})
    assert isinstance(model, SequenceClassifier)
    results = model.classify(TEXTS)  # one left-padded batch
    for text, result in zip(TEXTS, results):
        logits = hf_run(hf_model, model.tokenizer.encode(text).ids).logits[0].numpy()
        expected = label_scores(logits, {0: "neg", 1: "neu", 2: "pos"})
        assert [r["label"] for r in result] == [e["label"] for e in expected]
        np.testing.assert_allclose([r["score"] for r in result], [e["score"] for e in expected], atol=1e-5)
        assert abs(sum(r["score"] for r in result) - 1) < 1e-6
    assert len(model.classify("Zoë", top_k=1)[0]) == 1


def test_token_classification_matches_transformers(folder):
    hf_model, model = load(folder, "token-classification", id2label=LABELS, initializer_range=0.5)
    assert isinstance(model, TokenClassifier)
    results = model.tag(TEXTS)
    for text, result in zip(TEXTS, results):
        encoding = model.tokenizer.encode(text)
        logits = hf_run(hf_model, encoding.ids).logits[0].numpy()
        tagged = tag_tokens(logits, encoding.tokens, encoding.offsets, LABELS)
        assert [t["label"] for t in result["tokens"]] == [t.label for t in tagged]
        np.testing.assert_allclose(
            [t["score"] for t in result["tokens"]], [t.score for t in tagged], atol=1e-5
        )
        expected = group_entities(tagged, text)
        assert [{**e, "score": None} for e in result["entities"]] == [{**e, "score": None} for e in expected]
        np.testing.assert_allclose(
            [e["score"] for e in result["entities"]], [e["score"] for e in expected], atol=1e-5
        )
        for entity in result["entities"]:
            assert entity["text"] == text[entity["start"] : entity["end"]] and entity["text"].strip()


def test_question_answering_matches_transformers(folder):
    hf_model, model = load(folder, "question-answering", initializer_range=0.5)
    assert isinstance(model, QuestionAnswerer)
    questions = ["Who met Bob?", "Where?"]
    contexts = ["Alice met Bob in Paris.", "Le café est très chaud à Paris."]
    results = model.answer(questions, contexts, max_answer_length=4)
    for question, context, result in zip(questions, contexts, results):
        encoding = model.tokenizer.encode(question, context)
        out = hf_run(hf_model, encoding.ids)
        in_context = np.array([s == 1 for s in encoding.sequence_ids])
        start, end, score = best_answer_span(
            out.start_logits[0].numpy(), out.end_logits[0].numpy(), in_context, 4
        )
        assert (result["start_token"], result["end_token"]) == (start, end)
        assert result["score"] == pytest.approx(score, rel=1e-4)
        assert in_context[start] and in_context[end] and 0 <= end - start < 4
        assert result["answer"] == context[result["start"] : result["end"]]


def test_embeddings_match_transformers(folder):
    hf_model, model = load(folder, "base")
    assert isinstance(model, Embedder)
    for pooling in ("mean", "last"):
        vectors = model.embed(TEXTS, pooling=pooling)
        for text, vector in zip(TEXTS, vectors):
            hidden = hf_run(hf_model, model.tokenizer.encode(text).ids).last_hidden_state[0].numpy()
            expected = hidden.mean(axis=0) if pooling == "mean" else hidden[-1]
            np.testing.assert_allclose(vector, expected, atol=1e-4)
    normalized = model.embed(TEXTS, normalize=True)
    np.testing.assert_allclose(np.linalg.norm(normalized, axis=-1), 1.0, atol=1e-5)
    with pytest.raises(InputError, match="pooling"):
        model.embed("Zoë", pooling="max")


# ---- the rules on hand-made inputs ----------------------------------------------------------
def tagged(labels: list[str], text: str, spans: list[tuple[int, int]]) -> list[TaggedToken]:
    return [
        TaggedToken(i, text[s:e], label, 0.5 + 0.1 * i, s, e)
        for i, (label, (s, e)) in enumerate(zip(labels, spans))
    ]


def test_entity_grouping_rules():
    text = "Alice Smith met Bob Jones"
    spans = [(0, 5), (5, 11), (11, 15), (15, 19), (19, 25)]
    entities = group_entities(tagged(["B-PER", "I-PER", "O", "B-PER", "B-PER"], text, spans), text)
    assert [(e["label"], e["text"]) for e in entities] == [
        ("PER", "Alice Smith"),
        ("PER", "Bob"),
        ("PER", "Jones"),
    ]
    assert entities[0]["score"] == pytest.approx(0.55) and entities[0]["start"] == 0
    plain = group_entities(tagged(["PER", "PER", "O", "LOC", "PER"], text, spans), text)
    assert [(e["label"], e["text"]) for e in plain] == [
        ("PER", "Alice Smith"),
        ("LOC", "Bob"),
        ("PER", "Jones"),
    ]
    orphan = group_entities(tagged(["O", "I-LOC", "I-LOC", "I-PER", "O"], text, spans), text)
    assert [(e["label"], e["text"]) for e in orphan] == [("LOC", "Smith met"), ("PER", "Bob")]


def test_best_answer_span_rules():
    rng = np.random.default_rng(0)
    for _ in range(20):
        start_logits, end_logits = rng.normal(0, 3, 12), rng.normal(0, 3, 12)
        context = np.arange(12) >= 4
        start, end, score = best_answer_span(start_logits, end_logits, context, max_answer_length=3)
        masked_start = np.where(context, start_logits, -10000.0)
        masked_end = np.where(context, end_logits, -10000.0)
        p_start = np.exp(masked_start - masked_start.max())
        p_start /= p_start.sum()
        p_end = np.exp(masked_end - masked_end.max())
        p_end /= p_end.sum()
        brute = max((p_start[s] * p_end[e], s, e) for s in range(4, 12) for e in range(s, min(12, s + 3)))
        assert (start, end) == brute[1:] and score == pytest.approx(brute[0])
    with pytest.raises(InputError, match="max_answer_length"):
        best_answer_span(start_logits, end_logits, context, 0)


def test_pooling_rules():
    hidden = np.arange(2 * 3 * 2, dtype=np.float32).reshape(2, 3, 2)
    mask = np.array([[0, 1, 1], [1, 1, 1]])
    np.testing.assert_allclose(pool_hidden_states(hidden, mask, "mean"), [[3, 4], [8, 9]])
    np.testing.assert_allclose(pool_hidden_states(hidden, mask, "last"), [[4, 5], [10, 11]])


def test_text_heads_refuse_empty_input(folder):
    _, model = load(folder, "token-classification", id2label=LABELS)
    with pytest.raises(InputError, match="empty"):
        model.tag(["fine", ""])
    with pytest.raises(InputError, match="token id 999"):
        model.run_ids([[999]])
