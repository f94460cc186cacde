"""Streaming text: UTF-8 safe across byte-level BPE token boundaries, stop strings cut cleanly."""

from __future__ import annotations

import pytest
from runtime_helpers import CORPUS, train_tokenizer
from tokenizers import Tokenizer

from gptneo_onnx.runtime.streaming import IncrementalDecoder, StopStringFilter, stream_text


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory) -> Tokenizer:
    return Tokenizer.from_file(str(train_tokenizer(tmp_path_factory.mktemp("tok") / "tokenizer.json")))


@pytest.mark.parametrize("text", [*CORPUS, "🙂🚀🎉 東京日本 Zoë", "a\n\nb  c"])
def test_pieces_never_split_a_character(tokenizer, text):
    ids = tokenizer.encode(text).ids
    single = [tokenizer.decode([i]) for i in ids]
    assert any("\ufffd" in piece for piece in single) or text.isascii()  # the test is not vacuous
    decoder = IncrementalDecoder(tokenizer)
    pieces = [decoder.push(i) for i in ids] + [decoder.flush()]
    assert "".join(pieces) == text
    assert not any("\ufffd" in piece for piece in pieces)


def test_incomplete_character_is_flushed_at_the_end(tokenizer):
    ids = tokenizer.encode("ok 🙂").ids[:-1]  # cut inside the emoji's bytes
    decoder = IncrementalDecoder(tokenizer)
    pieces = [decoder.push(i) for i in ids]
    assert "".join(pieces) == "ok"
    assert decoder.flush().endswith("\ufffd")


def test_special_tokens_are_skipped(tokenizer):
    ids = tokenizer.encode("Zoë").ids + [tokenizer.token_to_id("</s>")]
    assert "".join(stream_text(ids, tokenizer)) == "Zoë"


@pytest.mark.parametrize(
    "pieces, stops, expected",
    [
        (["Hello", " wor", "ld.\nNext"], ["\n"], "Hello world."),
        (["abc", "EN", "D tail"], ["END"], "abc"),
        (["abc", "EN", "x"], ["END"], "abcENx"),  # a false start is released
        (["no stop here"], ["###"], "no stop here"),
        (["a#", "#", "#b"], ["###", "#!"], "a"),
    ],
)
def test_stop_string_filter(pieces, stops, expected):
    stop_filter = StopStringFilter(stops)
    out = [stop_filter.push(piece) for piece in pieces] + [stop_filter.flush()]
    assert "".join(out) == expected


def test_stop_filter_holds_back_a_possible_stop(tokenizer):
    stop_filter = StopStringFilter(["END"])
    assert stop_filter.push("abcE") == "abc"
    assert stop_filter.push("N") == ""
    assert stop_filter.push("D!") == "" and stop_filter.stopped


def test_stream_text_stops_at_a_stop_string(tokenizer):
    ids = tokenizer.encode("Le café est très chaud. Ça va").ids
    assert "".join(stream_text(ids, tokenizer, ["chaud"])) == "Le café est très "
