"""Turn a stream of token ids into a stream of text pieces.

Byte-level BPE splits multi-byte UTF-8 characters across tokens; decoding such a token alone
gives U+FFFD. The decoder holds text back until it no longer ends with U+FFFD, so every
piece it emits is final. Stop strings are cut, and text that may be the start of one is held.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator

from tokenizers import Tokenizer

REPLACEMENT_CHARACTER = "\ufffd"


class IncrementalDecoder:
    """Decode token ids one at a time into text pieces that never split a character."""

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = True):
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.token_ids: list[int] = []
        self._prefix_offset = 0  # start of the window decoded for context
        self._read_offset = 0  # tokens before this have been emitted

    def _decode(self, token_ids: list[int]) -> str:
        return self.tokenizer.decode(token_ids, skip_special_tokens=self.skip_special_tokens)

    def push(self, token_id: int) -> str:
        """Add one token; return the new text it completes ("" while a character is incomplete)."""
        self.token_ids.append(int(token_id))
        emitted = self._decode(self.token_ids[self._prefix_offset : self._read_offset])
        current = self._decode(self.token_ids[self._prefix_offset :])
        if len(current) > len(emitted) and not current.endswith(REPLACEMENT_CHARACTER):
            self._prefix_offset, self._read_offset = self._read_offset, len(self.token_ids)
            return current[len(emitted) :]
        return ""

    def flush(self) -> str:
        """The text still held back (an incomplete character decodes to U+FFFD here)."""
        emitted = self._decode(self.token_ids[self._prefix_offset : self._read_offset])
        current = self._decode(self.token_ids[self._prefix_offset :])
        self._prefix_offset = self._read_offset = len(self.token_ids)
        return current[len(emitted) :]


class StopStringFilter:
    """Pass text through until a stop string appears; the stop string and what follows are dropped."""

    def __init__(self, stop_strings: Iterable[str] = ()):
        self.stop_strings = [stop for stop in stop_strings if stop]
        self.text = ""
        self._emitted = 0
        self.stopped = False

    def push(self, piece: str) -> str:
        if self.stopped:
            return ""
        self.text += piece
        cut = first_stop_index(self.text, self.stop_strings)
        if cut is not None:
            self.stopped = True
            return self._emit(cut)
        return self._emit(len(self.text) - self._held_back())

    def flush(self) -> str:
        return "" if self.stopped else self._emit(len(self.text))

    def _emit(self, end: int) -> str:
        piece = self.text[self._emitted : end]
        self._emitted = max(self._emitted, end)
        return piece

    def _held_back(self) -> int:
        """Length of the longest tail of the text that begins some stop string."""
        longest = 0
        for stop in self.stop_strings:
            for size in range(min(len(stop) - 1, len(self.text)), longest, -1):
                if self.text.endswith(stop[:size]):
                    longest = size
                    break
        return longest


def first_stop_index(text: str, stop_strings: Iterable[str]) -> int | None:
    """Index where the earliest stop string starts in `text`, or None."""
    found = [index for stop in stop_strings if stop and (index := text.find(stop)) >= 0]
    return min(found) if found else None


def stop_checker(tokenizer: Tokenizer, stop_strings: list[str]) -> Callable[[list[int]], bool]:
    """new tokens -> whether their text holds a stop string (decoding only the tail that can)."""
    # A token decodes to at least one byte, so the last 4 * len + 2 tokens cover any stop string.
    window = 4 * max(len(stop) for stop in stop_strings) + 2

    def check(tokens: list[int]) -> bool:
        tail = tokenizer.decode(tokens[-window:], skip_special_tokens=True)
        return first_stop_index(tail, stop_strings) is not None

    return check


def final_text(tokenizer: Tokenizer, tokens: list[int], stop_strings: Iterable[str]) -> str:
    """The text of generated tokens, cut before the first stop string."""
    text = tokenizer.decode(tokens, skip_special_tokens=True)
    cut = first_stop_index(text, stop_strings)
    return text if cut is None else text[:cut]


def stream_text(
    token_ids: Iterable[int], tokenizer: Tokenizer, stop_strings: Iterable[str] = ()
) -> Iterator[str]:
    """Yield non-empty text pieces for a stream of token ids, UTF-8 safe and cut at stop strings."""
    decoder = IncrementalDecoder(tokenizer)
    stops = StopStringFilter(stop_strings)
    for token_id in token_ids:
        piece = stops.push(decoder.push(token_id))
        if piece:
            yield piece
        if stops.stopped:
            return
    tail = stops.push(decoder.flush()) + stops.flush()
    if tail:
        yield tail
