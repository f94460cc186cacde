"""Property-based tests: whatever a user passes, the runtime gives a correct result or a named error.

The oracle, for every call:
- a clear error is a RuntimeModelError subclass (InputError, GenerationConfigError, ...) with a
  message that names the problem. Any other exception (TypeError, IndexError, numpy's or
  onnxruntime's errors), any warning (this module turns warnings into errors, so a numpy
  overflow or NaN RuntimeWarning fails), and any hang (a faulthandler watchdog) is a failure;
- an accepted call returns real, checked results: token ids inside the vocabulary, at most
  max_new_tokens of them, finish reasons that agree with the tokens, valid text; greedy results
  that equal the same prompt run on its own, and equal a run with the sampling options left out;
  seeded sampling that repeats; logits that are finite and, for left-padded rows, equal the
  unpadded run.

Models: tiny random GPT-Neos (64 positions, window 4) exported once per module with the bundled
model's tokenizer (4096 tokens), portable and optimized. Each named edge case is an @example, so
it runs every time; hypothesis adds random cases on top (profiles in conftest.py).
"""

from __future__ import annotations

import contextlib
import faulthandler
import io
import math
import re

import numpy as np
import pytest
from hypothesis import example, given
from hypothesis import strategies as st
from runtime_helpers import export_tiny

from gptneo_onnx.cli.defaults import BUNDLED_MODEL_DIR
from gptneo_onnx.runtime import (
    CausalLM,
    GenerationConfigError,
    InputError,
    Model,
    RuntimeModelError,
)

pytestmark = pytest.mark.filterwarnings("error")

TOKENIZER = BUNDLED_MODEL_DIR / "tokenizer.json"
VOCAB, POSITIONS, EOS = 4096, 64, 0
MODEL = dict(
    vocab_size=VOCAB, max_position_embeddings=POSITIONS, initializer_range=0.5,
    bos_token_id=EOS, eos_token_id=EOS, pad_token_id=EOS,
)  # fmt: skip
HANG_SECONDS = 300  # one test taking this long is a hang: dump every thread's stack and exit


@pytest.fixture(autouse=True)
def no_hang():
    faulthandler.dump_traceback_later(HANG_SECONDS, exit=True)
    yield
    faulthandler.cancel_dump_traceback_later()


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """{"portable", "optimized"}: causal-lm exports of the same tiny weights, both loaded."""
    root = tmp_path_factory.mktemp("hostile")
    _, portable = export_tiny("causal-lm", root / "portable", tokenizer_file=TOKENIZER, **MODEL)
    _, optimized = export_tiny(
        "causal-lm", root / "optimized", tokenizer_file=TOKENIZER, export_options={"optimize": True}, **MODEL
    )
    return {"portable": CausalLM.load(portable), "optimized": CausalLM.load(optimized)}


@pytest.fixture(scope="module")
def lm(models):
    return models["portable"]


@pytest.fixture(scope="module")
def heads(tmp_path_factory):
    root = tmp_path_factory.mktemp("hostile-heads")
    tasks = ("sequence-classification", "token-classification", "question-answering", "base")
    loaded = {}
    for task in tasks:
        _, folder = export_tiny(task, root / task, tokenizer_file=TOKENIZER, **MODEL)
        loaded[task] = Model.load(folder)
    return loaded


def outcome(call):
    """(result, None) or (None, the named error); any other exception propagates and fails the test."""
    try:
        return call(), None
    except RuntimeModelError as error:
        assert str(error).strip(), f"{type(error).__name__} has no message"
        return None, error


def assert_named(error, kind, *patterns):
    """`error` is a `kind` whose message matches at least one of `patterns`."""
    assert isinstance(error, kind), f"expected {kind.__name__}, got {error!r}"
    assert any(re.search(p, str(error)) for p in patterns), f"{error} matches none of {patterns}"


def check_sequences(model, result, prompts: int, per_prompt: int, max_new_tokens: int, beams: bool):
    """The properties every accepted generation has."""
    assert len(result.sequences) == prompts * per_prompt
    assert result.prompt_index == [i for i in range(prompts) for _ in range(per_prompt)]
    for tokens, reason, text in zip(result.sequences, result.finish_reasons, result.texts):
        assert 1 <= len(tokens) <= max_new_tokens
        assert all(type(token) is int and 0 <= token < VOCAB for token in tokens)
        assert reason in ("eos", "length")
        if reason == "eos":
            assert tokens[-1] == EOS and EOS not in tokens[:-1]
        elif not beams:
            assert len(tokens) == max_new_tokens and EOS not in tokens
        assert isinstance(text, str) and text.encode("utf-8")
        assert text == model.tokenizer.decode(tokens, skip_special_tokens=True)


def has_surrogate(text: str) -> bool:
    return any(0xD800 <= ord(char) <= 0xDFFF for char in text)


# ---- text prompts ------------------------------------------------------------------------
unicode_text = st.text(st.characters(exclude_categories=[]), max_size=30)  # surrogates included
whitespace = st.text(st.sampled_from(" \t\n\r\x0b\x0c\x85\xa0\u2028\u3000"), min_size=1, max_size=10)
controls = st.text(st.characters(categories=["Cc", "Cf"]), min_size=1, max_size=10)
long_text = st.builds(
    lambda piece, count: piece * count, st.text(min_size=1, max_size=4), st.integers(20, 3000)
)


@given(
    text=st.one_of(unicode_text, whitespace, controls, long_text),
    max_new_tokens=st.integers(1, 6),
    truncate=st.booleans(),
)
@example(text="", max_new_tokens=3, truncate=False)
@example(text=" ", max_new_tokens=3, truncate=False)
@example(text="\t\n  \r\n", max_new_tokens=3, truncate=False)
@example(text="\x00\x01\x07\x1b[31mred\x1b[0m\x7f", max_new_tokens=3, truncate=False)
@example(text="\u200b\ufeff\u202e", max_new_tokens=3, truncate=False)
@example(text="a\ud800b", max_new_tokens=3, truncate=False)  # a lone surrogate
@example(text="\udcff\udcfe", max_new_tokens=3, truncate=False)  # invalid UTF-8 via surrogateescape
@example(text="\ufffd", max_new_tokens=3, truncate=False)
@example(text="def f(x):\n    return x  # 🙂", max_new_tokens=3, truncate=False)
@example(text="x" * 100_000, max_new_tokens=3, truncate=False)  # very long: a named error
@example(text="x " * 50_000, max_new_tokens=3, truncate=True)  # very long, truncated: a result
def test_text_prompts(lm, text, max_new_tokens, truncate):
    result, error = outcome(lambda: lm.generate(text, max_new_tokens=max_new_tokens, truncate=truncate))
    if has_surrogate(text):
        return assert_named(error, InputError, "not valid Unicode")
    if text == "":
        return assert_named(error, InputError, "empty")
    ids = lm.tokenizer.encode(text).ids
    if len(ids) + max_new_tokens > POSITIONS and not truncate:
        return assert_named(error, InputError, rf"max_position_embeddings \({POSITIONS}\)")
    assert error is None, error
    check_sequences(lm, result, 1, 1, max_new_tokens, beams=False)
    kept = ids[-(POSITIONS - max_new_tokens) :]
    assert lm.generate([kept], max_new_tokens=max_new_tokens).sequences == result.sequences
    assert "".join(lm.stream(text, max_new_tokens=max_new_tokens, truncate=truncate)) == result.texts[0]


@given(prompt=st.one_of(st.binary(max_size=8), st.none(), st.integers(), st.floats(), st.just(b"\xff\xfe")))
@example(prompt=b"")
@example(prompt=b"\xc3\x28")  # invalid UTF-8
@example(prompt=bytearray(b"abc"))
@example(prompt=None)
def test_prompts_that_are_neither_text_nor_ids(lm, prompt):
    calls = [lambda: lm.generate(prompt), lambda: lm.stream(prompt)]
    if not isinstance(prompt, int):  # [int] is a valid one-token prompt
        calls.append(lambda: lm.generate([prompt]))
    for call in calls:
        _, error = outcome(call)
        assert_named(error, InputError, "bytes are not accepted", "expected a str", "token ids")


# ---- token-id prompts --------------------------------------------------------------------
token_ids = st.one_of(
    st.integers(0, VOCAB - 1),
    st.sampled_from([0, VOCAB - 1, VOCAB, VOCAB + 1, -1, 2**31, -(2**63), 2**63 - 1]),
)
id_rows = st.lists(token_ids, max_size=70)
containers = st.sampled_from(["list", "tuple", "int64", "int32", "uint16"])


def as_container(row: list[int], kind: str):
    if kind == "list":
        return list(row)
    if kind == "tuple":
        return tuple(row)
    info = np.iinfo(kind)
    if all(info.min <= token <= info.max for token in row):
        return np.array(row, dtype=kind)
    return list(row)


@given(rows=st.lists(id_rows, min_size=1, max_size=3), kind=containers, max_new_tokens=st.integers(1, 5))
@example(rows=[[]], kind="list", max_new_tokens=2)
@example(rows=[[VOCAB - 1]], kind="list", max_new_tokens=2)  # at the vocabulary's edge
@example(rows=[[VOCAB]], kind="list", max_new_tokens=2)  # just above
@example(rows=[[-1]], kind="int64", max_new_tokens=2)  # below
@example(rows=[[5, 2**63 - 1]], kind="int64", max_new_tokens=2)
@example(rows=[[7, 8], [9]], kind="uint16", max_new_tokens=3)  # left padding
@example(rows=[list(range(1, 63))], kind="list", max_new_tokens=2)  # exactly the position limit
@example(rows=[list(range(1, 64))], kind="list", max_new_tokens=2)  # one past it
def test_token_id_prompts(lm, rows, kind, max_new_tokens):
    prompts = [as_container(row, kind) for row in rows]
    result, error = outcome(lambda: lm.generate(prompts, max_new_tokens=max_new_tokens))
    if any(len(row) == 0 for row in rows):
        return assert_named(error, InputError, "empty")
    bad = [token for row in rows for token in row if not 0 <= token < VOCAB]
    if bad:
        return assert_named(error, InputError, rf"token id -?\d+ outside the vocabulary \[0, {VOCAB}\)")
    if max(map(len, rows)) + max_new_tokens > POSITIONS:
        return assert_named(error, InputError, rf"max_position_embeddings \({POSITIONS}\)")
    assert error is None, error
    check_sequences(lm, result, len(rows), 1, max_new_tokens, beams=False)
    if len(rows) > 1:  # a left-padded batch gives each row what it gets alone
        alone = [lm.generate([row], max_new_tokens=max_new_tokens).sequences[0] for row in rows]
        assert result.sequences == alone


@given(
    prompt=st.lists(
        st.one_of(st.integers(1, 50), st.floats(), st.booleans(), st.text(max_size=2)),
        min_size=1,
        max_size=10,
    )
)
@example(prompt=[3, 4.0])
@example(prompt=[3.5, 4])
@example(prompt=[True, 4])
@example(prompt=["3", "4"])
@example(prompt=[3, [4]])
@example(prompt=np.array([3.0, 4.0]))
@example(prompt=np.array([[[3, 4]]]))
@example(prompt=np.array(3))
def test_token_ids_that_are_not_integers(lm, prompt):
    if isinstance(prompt, np.ndarray):
        integers, texts = prompt.ndim == 1 and prompt.dtype.kind in "iu", False
    else:
        integers = all(type(token) is int for token in prompt)
        texts = all(isinstance(token, str) for token in prompt)
    _, error = outcome(lambda: lm.generate(prompt, max_new_tokens=2))
    if integers:
        assert error is None, error
    elif texts:  # a batch of text prompts
        assert error is None or isinstance(error, InputError)
    else:
        assert_named(error, InputError, "integer", "1-D", "expected a str")


# ---- attention masks, straight into forward ----------------------------------------------
@st.composite
def ids_and_masks(draw):
    batch, length = draw(st.integers(1, 3)), draw(st.integers(1, 10))
    ids = draw(st.lists(st.integers(0, VOCAB - 1), min_size=batch * length, max_size=batch * length))
    ids = np.array(ids, dtype=np.int64).reshape(batch, length)
    kind = draw(st.sampled_from(["left-padded", "any 0/1", "wrong shape", "odd values"]))
    if kind == "left-padded":
        pads = draw(st.lists(st.integers(0, length), min_size=batch, max_size=batch))
        mask = np.array([[0] * pad + [1] * (length - pad) for pad in pads])
    elif kind == "any 0/1":
        mask = np.array(draw(st.lists(st.integers(0, 1), min_size=ids.size, max_size=ids.size)))
        mask = mask.reshape(ids.shape)
    elif kind == "wrong shape":
        shape = draw(st.tuples(st.integers(0, 4), st.integers(0, 12)).filter(lambda s: s != ids.shape))
        mask = np.ones(shape, dtype=np.int64)
    else:
        mask = np.ones(ids.shape, dtype=np.float64)
        mask.flat[draw(st.integers(0, ids.size - 1))] = draw(st.sampled_from([2, -1, 0.5, np.nan, np.inf]))
    dtype = draw(st.sampled_from([np.int64, np.int32, np.float32, bool])) if kind != "odd values" else None
    return ids, (mask.astype(dtype) if dtype is not None else mask)


@pytest.mark.parametrize("flavor", ["portable", "optimized"])
@given(case=ids_and_masks())
@example(case=(np.array([[5, 6]]), np.array([[0, 0]])))  # an all-zero mask row
@example(case=(np.array([[5, 6], [7, 8]]), np.array([[1, 1], [0, 0]])))
@example(case=(np.array([[5, 6]]), np.array([[1, 1, 1]])))  # a mask longer than the ids
@example(case=(np.array([[5, 6]]), np.array([1, 1])))  # a 1-D mask
@example(case=(np.array([[5, 6]]), np.array([[2, 1]])))
@example(case=(np.zeros((0, 2), dtype=np.int64), np.zeros((0, 2), dtype=np.int64)))  # no rows
@example(case=(np.zeros((1, 0), dtype=np.int64), np.zeros((1, 0), dtype=np.int64)))  # no tokens
@example(case=(np.array([[5, 6, 7]]), np.array([[1, 0, 1]])))  # a hole
@example(case=(np.array([[5, 6, 7]]), np.array([[1, 1, 0]])))  # right padding
def test_attention_masks(models, flavor, case):
    model = models[flavor]
    ids, mask = case
    result, error = outcome(lambda: model.forward(ids, mask))
    if ids.ndim != 2 or 0 in ids.shape:
        return assert_named(error, InputError, "input_ids must be")
    if mask.shape != ids.shape:
        return assert_named(error, InputError, r"attention_mask must be \(batch, past \+ new\)")
    if not np.isin(mask, (0, 1)).all():
        return assert_named(error, InputError, "only 0 .* and 1")
    if not mask.any(axis=1).all():
        return assert_named(error, InputError, "all zeros")
    assert error is None, error
    logits, cache = result
    assert logits.shape == (*ids.shape, VOCAB) and np.isfinite(logits).all()
    assert cache.length == ids.shape[1]
    for row in range(ids.shape[0]):
        ones = mask[row].astype(bool)
        if ones[np.argmax(ones) :].all():  # left-padded: the last logits equal the unpadded run
            alone, _ = model.forward(ids[row : row + 1, ones], np.ones((1, int(ones.sum()))))
            np.testing.assert_allclose(logits[row, -1], alone[0, -1], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("flavor", ["portable", "optimized"])
@given(
    positions=st.lists(st.integers(-3, POSITIONS + 3), min_size=1, max_size=4),
    extra=st.booleans(),
)
@example(positions=[0, POSITIONS - 1], extra=False)
@example(positions=[0, POSITIONS], extra=False)
@example(positions=[-1, 0], extra=False)
@example(positions=[0, 1], extra=True)
def test_explicit_position_ids(models, flavor, positions, extra):
    model = models[flavor]
    ids = np.arange(5, 5 + len(positions))[None]
    given_positions = np.array([positions + [0] * extra])
    result, error = outcome(lambda: model.forward(ids, np.ones_like(ids), position_ids=given_positions))
    if extra:
        return assert_named(error, InputError, "position_ids must have the shape")
    if not all(0 <= p < POSITIONS for p in positions):
        return assert_named(error, InputError, rf"position_ids must be in \[0, {POSITIONS}\)")
    assert error is None, error
    assert np.isfinite(result[0]).all()


# ---- decoding options --------------------------------------------------------------------
def is_int(value) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


def is_real(value) -> bool:
    return is_int(value) or (isinstance(value, (float, np.floating)) and math.isfinite(value))


# The documented rule for each option (README, GenerationConfig.validate); None means "the default".
RULES = {
    "max_new_tokens": lambda v: is_int(v) and v >= 1,
    "min_new_tokens": lambda v: is_int(v) and v >= 0,
    "do_sample": lambda v: isinstance(v, (bool, np.bool_)),
    "temperature": lambda v: is_real(v) and v >= 0,
    "top_k": lambda v: is_int(v) and v >= 0,
    "top_p": lambda v: is_real(v) and 0 < v <= 1,
    "repetition_penalty": lambda v: is_real(v) and v > 0,
    "presence_penalty": is_real,
    "frequency_penalty": is_real,
    "num_beams": lambda v: is_int(v) and v >= 1,
    "length_penalty": is_real,
    "num_return_sequences": lambda v: is_int(v) and v >= 1,
    "seed": lambda v: is_int(v) and v >= 0,
}
odd_numbers = st.sampled_from([math.nan, math.inf, -math.inf, "1", True, 2.5, -0.0])
OPTIONS = {
    "max_new_tokens": st.one_of(
        st.integers(1, 8), st.sampled_from([0, -1, 2.0, 57, 58, 64, 10**9]), odd_numbers
    ),
    "min_new_tokens": st.one_of(st.integers(0, 10), st.sampled_from([-1, 1.0]), odd_numbers),
    "do_sample": st.one_of(st.booleans(), st.sampled_from([np.bool_(True), 1, "no"])),
    "temperature": st.one_of(
        st.floats(-2, 5),
        st.sampled_from([0, 0.0, -0.0, 1e-45, 1e-300, 5e-324, 1e38, 1e300, -1]),
        odd_numbers,
    ),
    "top_k": st.one_of(
        st.integers(-2, 60), st.sampled_from([1, 2.0, 2.5, VOCAB, VOCAB + 1, 10**30]), odd_numbers
    ),
    "top_p": st.one_of(st.floats(-0.5, 1.5), st.sampled_from([0, 1, 1e-12, 1.0000001, -0.0]), odd_numbers),
    "repetition_penalty": st.one_of(
        st.floats(-1, 3), st.sampled_from([0, 1e-40, 1e-50, 1e30, 1e300]), odd_numbers
    ),
    "presence_penalty": st.one_of(
        st.floats(-3, 3), st.sampled_from([1e38, -1e38, 1e300, -1e300]), odd_numbers
    ),
    "frequency_penalty": st.one_of(
        st.floats(-3, 3), st.sampled_from([1e38, -1e38, 1e300, -1e300]), odd_numbers
    ),
    "num_beams": st.sampled_from([1, 2, 3, 0, -1, 2.0, True]),
    "length_penalty": st.one_of(st.floats(-3, 3), odd_numbers),
    "num_return_sequences": st.sampled_from([1, 2, 3, 0, 1.0]),
    "seed": st.one_of(st.integers(0, 2**70), st.sampled_from([-1, 1.5, "7"])),
}
options_strategy = st.fixed_dictionaries(
    {"max_new_tokens": OPTIONS["max_new_tokens"]},  # the sidecar's default (64) would leave no room
    optional={name: st.one_of(st.none(), s) for name, s in OPTIONS.items() if name != "max_new_tokens"},
)


def expected_problem(model, options: dict, prompt_length: int):
    """(error class, message patterns) the options must raise, or None when they are valid."""
    defaults = model.generation_config()
    settings = {name: getattr(defaults, name) for name in RULES}
    settings.update({name: value for name, value in options.items() if value is not None})
    settings["seed"] = options.get("seed")
    invalid = [
        name for name, rule in RULES.items() if settings[name] is not None and not rule(settings[name])
    ]
    if invalid:
        return GenerationConfigError, [re.escape(name) for name in invalid]
    sampling, beams, count = settings["do_sample"], settings["num_beams"], settings["num_return_sequences"]
    if sampling and not settings["temperature"] > 0:
        return GenerationConfigError, ["temperature must be > 0 when sampling"]
    if beams == 1 and not sampling and count > 1:
        return GenerationConfigError, ["greedy decoding returns one sequence"]
    if beams > 1 and count > beams:
        return GenerationConfigError, ["num_return_sequences"]
    if prompt_length + settings["max_new_tokens"] > POSITIONS:
        return InputError, [rf"max_position_embeddings \(?(is )?{POSITIONS}"]
    return None


@given(
    prompt=st.lists(st.integers(1, VOCAB - 1), min_size=1, max_size=6),
    options=options_strategy,
)
@example(prompt=[5, 6], options={"max_new_tokens": 0})
@example(prompt=[5, 6], options={"max_new_tokens": POSITIONS - 2})  # fills every position
@example(prompt=[5, 6], options={"max_new_tokens": POSITIONS - 1})  # past the position limit
@example(prompt=[5, 6], options={"max_new_tokens": 10**9})
@example(prompt=[5, 6], options={"max_new_tokens": 4, "temperature": 0})  # greedy: temperature ignored
@example(prompt=[5, 6], options={"max_new_tokens": 4, "temperature": 0, "do_sample": True})
@example(prompt=[5, 6], options={"max_new_tokens": 4, "temperature": -1})
@example(prompt=[5, 6], options={"max_new_tokens": 4, "temperature": 1e-45, "do_sample": True, "seed": 1})
@example(prompt=[5, 6], options={"max_new_tokens": 4, "temperature": 1e300, "do_sample": True, "seed": 1})
@example(prompt=[5, 6], options={"max_new_tokens": 4, "top_p": 0, "do_sample": True})
@example(prompt=[5, 6], options={"max_new_tokens": 4, "top_p": 1.5, "do_sample": True})
@example(prompt=[5, 6], options={"max_new_tokens": 4, "top_p": 1e-12, "do_sample": True, "seed": 2})
@example(prompt=[5, 6], options={"max_new_tokens": 4, "top_k": 2.0, "do_sample": True})
@example(prompt=[5, 6], options={"max_new_tokens": 4, "top_k": 2.5, "do_sample": True})
@example(prompt=[5, 6], options={"max_new_tokens": 4, "top_k": 1, "do_sample": True, "seed": 3})
@example(prompt=[5, 6], options={"max_new_tokens": 4, "top_k": 10**30, "do_sample": True, "seed": 3})
@example(
    prompt=[5, 6], options={"max_new_tokens": 4, "repetition_penalty": 1e-40, "do_sample": True, "seed": 4}
)
@example(prompt=[5, 6], options={"max_new_tokens": 4, "repetition_penalty": 1e-50})
@example(
    prompt=[5, 6], options={"max_new_tokens": 6, "frequency_penalty": -1e300, "do_sample": True, "seed": 5}
)
@example(
    prompt=[5, 6], options={"max_new_tokens": 6, "presence_penalty": 1e300, "do_sample": True, "seed": 5}
)
@example(prompt=[5, 6], options={"max_new_tokens": 4, "length_penalty": math.nan, "num_beams": 2})
@example(prompt=[5, 6], options={"max_new_tokens": 4, "do_sample": "no"})
@example(prompt=[5, 6], options={"max_new_tokens": 4, "seed": -1, "do_sample": True})
@example(prompt=[5, 6], options={"max_new_tokens": 4, "num_beams": 3, "num_return_sequences": 2})
def test_decoding_options(lm, prompt, options):
    problem = expected_problem(lm, options, len(prompt))
    result, error = outcome(lambda: lm.generate(prompt, **options))
    if problem is not None:
        return assert_named(error, problem[0], *problem[1])
    config = lm.generation_config(**options)
    beams, sampling = config.num_beams > 1, config.do_sample
    if beams and sampling and error is not None:  # as transformers: top-k / top-p left too few tokens
        return assert_named(error, GenerationConfigError, "beam sampling needs")
    assert error is None, error
    per_prompt = config.num_return_sequences if (beams or sampling) else 1
    check_sequences(lm, result, 1, per_prompt, config.max_new_tokens, beams)
    if beams:
        assert all(math.isfinite(score) for score in result.scores)
        return
    plain = dict(
        max_new_tokens=config.max_new_tokens, min_new_tokens=config.min_new_tokens,
        repetition_penalty=config.repetition_penalty, presence_penalty=config.presence_penalty,
        frequency_penalty=config.frequency_penalty, num_beams=1, do_sample=False,
    )  # fmt: skip
    penalty_in_range = 1e-3 <= config.repetition_penalty <= 1e3  # beyond, scores clip to ties
    if not sampling:  # temperature, top-k, top-p and seed do not touch greedy decoding
        assert lm.generate(prompt, **plain).sequences == result.sequences
    elif options.get("seed") is not None:  # a seeded request repeats exactly
        assert lm.generate(prompt, **options).sequences == result.sequences
        if penalty_in_range and (config.top_k == 1 or config.temperature < 1e-20):
            greedy = lm.generate(prompt, **plain).sequences[0]
            assert result.sequences == [greedy] * per_prompt


@given(
    eos=st.lists(st.integers(-2, VOCAB + 2), max_size=3), pad=st.one_of(st.none(), st.integers(-2, VOCAB + 2))
)
@example(eos=[VOCAB], pad=None)
@example(eos=[-1], pad=None)
@example(eos=[3], pad=VOCAB)
def test_special_token_options(lm, eos, pad):
    result, error = outcome(
        lambda: lm.generate([[5, 6, 7], [8]], max_new_tokens=4, eos_token_id=eos, pad_token_id=pad)
    )
    wrong = [name for name, ids in (("eos_token_id", eos), ("pad_token_id", [] if pad is None else [pad]))
             if any(not 0 <= token < VOCAB for token in ids)]  # fmt: skip
    if wrong:
        return assert_named(error, GenerationConfigError, *wrong)
    assert error is None, error
    for tokens, reason in zip(result.sequences, result.finish_reasons):
        assert 1 <= len(tokens) <= 4 and all(0 <= token < VOCAB for token in tokens)
        assert reason == "eos" if tokens[-1] in eos else reason == "length"


def test_every_token_filtered_out_is_a_named_error(lm):
    everything = list(range(VOCAB))
    for options in ({}, {"do_sample": True, "seed": 0}, {"num_beams": 2}):
        _, error = outcome(
            lambda options=options: lm.generate(
                [5, 6], max_new_tokens=3, min_new_tokens=2, eos_token_id=everything, **options
            )
        )
        assert_named(error, GenerationConfigError, "every token was filtered out")


# ---- the single-pass heads ---------------------------------------------------------------
@given(
    text=st.one_of(unicode_text, whitespace, controls, long_text),
    top_k=st.sampled_from([None, 1, 2, 0, -1, 1.5]),
)
@example(text="", top_k=None)
@example(text="  ", top_k=None)
@example(text="\x00\x1b", top_k=1)
@example(text="\ud800", top_k=None)
@example(text="word " * 100, top_k=None)
def test_classify_tag_and_embed(heads, text, top_k):
    tokens = None if has_surrogate(text) else heads["base"].tokenizer.encode(text).ids
    classifier, tagger, embedder = (
        heads["sequence-classification"], heads["token-classification"], heads["base"]
    )  # fmt: skip
    results = {
        "classify": outcome(lambda: classifier.classify(text, top_k=top_k)),
        "tag": outcome(lambda: tagger.tag(text)),
        "embed": outcome(lambda: embedder.embed(text, normalize=True)),
    }
    for name, (_, error) in results.items():
        if name == "classify" and not (top_k is None or (is_int(top_k) and top_k >= 1)):
            assert_named(error, InputError, "top_k")
        elif tokens is None:
            assert_named(error, InputError, "not valid Unicode")
        elif not tokens:
            assert_named(error, InputError, "empty")
        elif len(tokens) > POSITIONS:
            assert_named(error, InputError, rf"max_position_embeddings \({POSITIONS}\)")
        else:
            assert error is None, error
    scores, error = results["classify"]
    if error is None:
        labels = scores[0]
        assert len(labels) == (3 if top_k is None else min(top_k, 3))
        assert all(0 <= item["score"] <= 1 for item in labels)
        assert [item["score"] for item in labels] == sorted((item["score"] for item in labels), reverse=True)
        if top_k is None:
            assert math.isclose(sum(item["score"] for item in labels), 1, rel_tol=1e-6)
    tagged, error = results["tag"]
    if error is None:
        assert len(tagged[0]["tokens"]) == len(tokens)
        for entity in tagged[0]["entities"]:
            assert 0 <= entity["start"] < entity["end"] <= len(text)
            assert entity["text"] == text[entity["start"] : entity["end"]]
    vectors, error = results["embed"]
    if error is None:
        assert vectors.shape == (1, 32) and np.isfinite(vectors).all()
        assert math.isclose(float(np.linalg.norm(vectors[0])), 1, rel_tol=1e-4)


@given(
    question=st.one_of(unicode_text, whitespace, controls),
    context=st.one_of(unicode_text, whitespace, controls, long_text),
    max_answer_length=st.sampled_from([1, 5, 30, 0, -1, 2.5]),
)
@example(question="who?", context="", max_answer_length=30)
@example(question="who?", context="   ", max_answer_length=30)
@example(question="\ud800", context="Alice met Bob.", max_answer_length=30)
@example(question="who?", context="Alice met Bob.", max_answer_length=0)
@example(question="who?", context="Alice met Bob.", max_answer_length=2.5)
def test_question_answering(heads, question, context, max_answer_length):
    model = heads["question-answering"]
    result, error = outcome(lambda: model.answer(question, context, max_answer_length=max_answer_length))
    if not (is_int(max_answer_length) and max_answer_length >= 1):
        return assert_named(error, InputError, "max_answer_length")
    if has_surrogate(question) or has_surrogate(context):
        return assert_named(error, InputError, "not valid Unicode")
    if not question or not context:
        return assert_named(error, InputError, "non-empty")
    if len(model.tokenizer.encode(question, context).ids) > POSITIONS:
        return assert_named(error, InputError, rf"max_position_embeddings \({POSITIONS}\)")
    assert error is None, error
    answer = result[0]
    assert 0 <= answer["start"] <= answer["end"] <= len(context)
    assert answer["answer"] == context[answer["start"] : answer["end"]]
    assert 0 <= answer["score"] <= 1
    assert answer["end_token"] - answer["start_token"] < max_answer_length


# ---- the command line's argument parsing ----------------------------------------------------------
GENERATE_OPTIONS = {
    "--max-new-tokens": st.integers(-3, 10**6).map(str),
    "--top-k": st.integers(-3, 100).map(str),
    "--top-p": st.floats(allow_nan=True).map(str),
    "--num-beams": st.one_of(st.integers(-2, 10**6).map(str), st.text(max_size=4)),
    "--threads": st.integers(-2, 10**6).map(str),
    "--device-id": st.integers(-2, 3).map(str),
    "--seed": st.text(max_size=6),
    "--stop": st.text(max_size=8),
    "--early-stopping": st.sampled_from(["true", "false", "never", "maybe"]),
    "--provider": st.text(max_size=8),
}
FLAGS = ["--json", "--token-ids", "--no-stream", "--truncate", "--do-sample", "--no-verify"]
words = st.one_of(
    st.text(max_size=12).filter(lambda word: not word.startswith("-")),
    st.sampled_from(FLAGS),
    st.sampled_from(sorted(GENERATE_OPTIONS)).flatmap(
        lambda name: GENERATE_OPTIONS[name].map(lambda value: f"{name}={value}")
    ),
)


@given(argv=st.lists(words, max_size=8))
@example(argv=["--stop", "\\n"])
@example(argv=["hi", "--max-new-tokens", "3", "there", "-m", "x", "--json"])
def test_cli_parsing_returns_options_or_a_usage_error(argv):
    """`generate`'s parser gives a namespace, or a UsageError naming the bad word: never an exit,
    a traceback or another exception; a namespace holds only checked values."""
    from gptneo_onnx.cli import build_parser
    from gptneo_onnx.cli.parsing import UsageError, parse

    try:
        args = parse(build_parser(), ["generate", *argv])
    except UsageError as error:
        assert str(error) and error.parser.prog == "gptneo-onnx generate"
        return
    assert args.command == "generate"
    assert all(isinstance(prompt, str) for prompt in args.prompts)
    for name in ("max_new_tokens", "num_beams", "threads"):
        assert getattr(args, name) is None or getattr(args, name) >= 1
    assert args.device_id >= 0
    if argv == ["--stop", "\\n"]:
        assert args.stop_strings == ["\n"]  # the README's example: a newline, not backslash-n


CLI_OPTIONS = [["--max-new-tokens", "5"], ["-m", "folder"], ["--json"], ["--stop", "\\t"]]


@given(
    prompts=st.lists(st.text(alphabet="abc xyz", min_size=1, max_size=5), min_size=1, max_size=3),
    order=st.permutations(range(len(CLI_OPTIONS) + 3)),
)
def test_cli_options_may_come_anywhere(prompts, order):
    """Wherever the options stand among the prompts, the parse is the same."""
    from gptneo_onnx.cli import build_parser
    from gptneo_onnx.cli.parsing import parse

    remaining = iter(prompts)  # the prompts keep their order; the options go anywhere among them
    argv = []
    for index in order:
        if index < len(CLI_OPTIONS):
            argv += CLI_OPTIONS[index]
        elif index < len(CLI_OPTIONS) + len(prompts):
            argv.append(next(remaining))
    args = parse(build_parser(), ["generate", *argv])
    assert args.prompts == prompts and args.model == "folder" and args.json
    assert args.max_new_tokens == 5 and args.stop_strings == ["\t"]


@given(text=st.text(max_size=30))
def test_stop_escapes_read_back_what_python_writes(text):
    from gptneo_onnx.cli.parsing import unescape

    assert unescape(text.encode("unicode_escape").decode("ascii")) == text
    if "\\" not in text:
        assert unescape(text) == text


EXPORT_OPTIONS = st.lists(
    st.one_of(
        st.sampled_from(
            [
                "--quantize=int8",
                "--quantize=int4",
                "--precision=float16",
                "--quality",
                "--optimize",
                "--task=token-classification",
                "--revision=main",
                "--no-validate",
            ]
        ),  # fmt: skip
        st.integers(-40, 300).map(lambda value: f"--block-size={value}"),
        st.integers(-3, 99).map(lambda value: f"--accuracy-level={value}"),
        st.integers(-3, 10**5).map(lambda value: f"--quality-windows={value}"),
    ),
    max_size=5,
)


@given(options=EXPORT_OPTIONS)
def test_export_option_mistakes_are_one_error_line(options, tmp_path_factory):
    """Any mix of export options, on a checkpoint that does not exist: exit 2 with one `error:`
    line (an option mistake or the missing checkpoint), and nothing written."""
    from gptneo_onnx.cli import main

    output = tmp_path_factory.mktemp("cli-export")
    stderr = io.StringIO()
    argv = ["export", "--model", str(output / "missing"), "--output", str(output / "out"), *options]
    with contextlib.redirect_stderr(stderr), contextlib.redirect_stdout(io.StringIO()):
        code = main(argv)
    err = stderr.getvalue()
    assert code == 2 and "Traceback" not in err
    assert len([line for line in err.splitlines() if line.startswith("error:")]) == 1, err
    assert list(output.iterdir()) == []
