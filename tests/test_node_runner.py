"""The Node.js runner (clients/node) against the Python runtime, on the bundled model.

Parity in three steps, as minGPT's import test does: the same prompt ids (tokenizers.js against
Rust `tokenizers`), the same greedy token ids, the same text; on the portable export (concat
cache) and on the optimized one (GroupQueryAttention, shared-buffer cache). Both sides decode
with the sidecar's defaults (greedy, repetition penalty 1.3, EOS from special_tokens). Then
left-padded batches, beam search and seeded sampling (one generator, SplitMix64, in both
languages) token for token, beam sampling included; float16, int8 and int4 exports of a tiny
model; and the runner's errors on bad input.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from onnx import helper
from runtime_helpers import train_tokenizer
from test_safe_exports import add_contrib_node, reseal, rewrite_graph, set_locations

from gptneo_onnx.cli.defaults import BUNDLED_MODEL_DIR
from gptneo_onnx.runtime import Model
from gptneo_onnx.runtime.sampling import SplitMix64, sample

NODE = shutil.which("node")
CLIENT = Path(__file__).resolve().parent.parent / "clients" / "node"
INSTALL = "cd clients/node && ONNXRUNTIME_NODE_INSTALL_CUDA=skip npm ci"
pytestmark = pytest.mark.skipif(
    NODE is None, reason="node is not installed: the Node runner tests need Node.js >= 18 on PATH"
)

LONG_PROMPT = (BUNDLED_MODEL_DIR.parent / "runtime" / "generation.py").read_text()[:900]  # ~316 tokens
PROMPTS = {
    "short": "def fibonacci(n):",
    "longer-than-window": LONG_PROMPT,
    "unicode": "café = '東京'  # naïve Straße 🙂🚀\nclass Ελληνικά:",
    "whitespace": "\tif x:\n\t\t\n    return  None  \r\n\n\n   ",
}


@pytest.fixture(scope="module")
def runner():
    """The command prefix that runs the Node runner; fails (not skips) when its packages are missing."""
    for package in ("onnxruntime-node", "@huggingface/tokenizers"):
        if not (CLIENT / "node_modules" / package / "package.json").is_file():
            pytest.fail(
                f"node is installed but the runner's npm packages are not ({package}): run `{INSTALL}`"
            )
    return [NODE, str(CLIENT / "generate.js")]


def run_node(runner, *args, check=True) -> subprocess.CompletedProcess:
    result = subprocess.run([*runner, *map(str, args)], capture_output=True, text=True, timeout=120)
    if check:
        assert result.returncode == 0, result.stderr
    return result


def node_json(runner, *args) -> dict:
    return json.loads(run_node(runner, *args, "--json").stdout)


@pytest.fixture(scope="module", params=["portable", "optimized"])
def export_dir(request):
    name = "bundled_export" if request.param == "portable" else "bundled_optimized_export"
    return request.getfixturevalue(name)


@pytest.mark.parametrize("prompt_name", list(PROMPTS))
def test_node_generates_the_same_greedy_tokens_as_python(runner, export_dir, prompt_name):
    prompt = PROMPTS[prompt_name]
    model = Model.load(export_dir)
    expected_ids = model.tokenizer.encode(prompt).ids
    expected = model.generate(prompt)  # the sidecar's defaults: greedy, 64 new tokens, penalty 1.3
    if prompt_name == "longer-than-window":
        assert len(expected_ids) > model.manifest.model["window_size"]
    node = node_json(runner, export_dir, prompt)
    assert node["cache_mode"] == model.cache_mode  # concat (portable), shared-buffer (optimized)
    assert node["prompt_token_ids"] == [expected_ids]
    sequence = node["sequences"][0]
    assert sequence["token_ids"] == expected.sequences[0]
    assert len(sequence["token_ids"]) >= 8
    assert sequence["text"] == expected.texts[0]
    assert sequence["finish_reason"] == expected.finish_reasons[0]


def test_node_concat_cache_on_the_optimized_export(runner, bundled_optimized_export):
    expected = Model.load(bundled_optimized_export, cache_mode="concat").generate(
        LONG_PROMPT, max_new_tokens=80
    )
    node = node_json(
        runner, bundled_optimized_export, LONG_PROMPT, "--cache-mode", "concat", "--max-new-tokens", 80
    )
    assert node["cache_mode"] == "concat"
    assert node["sequences"][0]["token_ids"] == expected.sequences[0]


def test_node_streams_the_python_text(runner, bundled_export):
    prompt = PROMPTS["unicode"]
    expected = Model.load(bundled_export).generate(prompt, max_new_tokens=24).texts[0]
    streamed = run_node(runner, bundled_export, prompt, "--max-new-tokens", 24).stdout
    assert streamed == prompt + expected + "\n"


def test_node_takes_token_ids_and_explicit_decoding_options(runner, bundled_export):
    ids = Model.load(bundled_export).tokenizer.encode("import os\n").ids
    expected = Model.load(bundled_export).generate(
        ids, max_new_tokens=16, repetition_penalty=1.0, eos_token_id=[]
    )
    node = node_json(
        runner, bundled_export, ",".join(map(str, ids)), "--token-ids",
        "--max-new-tokens", 16, "--repetition-penalty", 1.0, "--ignore-eos",
    )  # fmt: skip
    assert node["sequences"][0]["token_ids"] == expected.sequences[0]
    assert node["sequences"][0]["finish_reason"] == "length"


def test_node_seeded_sampling_is_reproducible_and_top_k_1_is_greedy(runner, bundled_export):
    sampling = ("--do-sample", "--temperature", 0.8, "--top-k", 40, "--top-p", 0.9, "--max-new-tokens", 24)
    first = node_json(runner, bundled_export, "def main():", *sampling, "--seed", 7)
    again = node_json(runner, bundled_export, "def main():", *sampling, "--seed", 7)
    other = node_json(runner, bundled_export, "def main():", *sampling, "--seed", 8)
    assert first["sequences"] == again["sequences"]
    assert first["sequences"][0]["token_ids"] != other["sequences"][0]["token_ids"]
    top1 = node_json(runner, bundled_export, "def main():", "--do-sample", "--top-k", 1, "--seed", 3)
    greedy = node_json(runner, bundled_export, "def main():")
    assert top1["sequences"] == greedy["sequences"]


SAMPLING = {"do_sample": True, "temperature": 0.8, "top_k": 40, "top_p": 0.9}


def options(**config) -> list[str]:
    """Python generate() options as the runner's flags."""
    flags = []
    for name, value in config.items():
        flag = "--" + name.replace("_", "-")
        flags += [flag] if name == "do_sample" else [flag, str(value).lower() if value is True else value]
    return flags


def test_node_left_padded_batch_matches_python(runner, export_dir):
    prompts = [PROMPTS["short"], PROMPTS["longer-than-window"], PROMPTS["unicode"]]
    expected = Model.load(export_dir).generate(prompts, max_new_tokens=24)
    node = node_json(runner, export_dir, *prompts, "--max-new-tokens", 24)
    assert [s["token_ids"] for s in node["sequences"]] == expected.sequences
    assert [s["text"] for s in node["sequences"]] == expected.texts
    assert [s["finish_reason"] for s in node["sequences"]] == expected.finish_reasons
    assert len({tuple(ids) for ids in expected.sequences}) == 3  # the rows differ: padding is not shared


@pytest.mark.parametrize(
    ("config", "long"),
    [
        ({"num_beams": 3, "num_return_sequences": 2}, True),
        ({"num_beams": 4, "length_penalty": 0.6, "early_stopping": True, "repetition_penalty": 1.0}, False),
        ({"num_beams": 2, "early_stopping": "never", "min_new_tokens": 4}, False),
        ({"num_beams": 3, "seed": 5, "do_sample": True, "temperature": 0.9, "top_k": 40}, True),
    ],
    ids=["beams-3-return-2", "length-penalty-early", "never-min-new", "beam-sampling"],
)
def test_node_beam_search_matches_python(runner, export_dir, config, long):
    prompts = [PROMPTS["short"], PROMPTS["longer-than-window" if long else "unicode"]]
    expected = Model.load(export_dir).generate(prompts, max_new_tokens=12, **config)
    node = node_json(runner, export_dir, *prompts, "--max-new-tokens", 12, *options(**config))
    assert [s["token_ids"] for s in node["sequences"]] == expected.sequences
    assert [s["prompt_index"] for s in node["sequences"]] == expected.prompt_index
    assert [s["score"] for s in node["sequences"]] == pytest.approx(expected.scores, rel=1e-6)


@pytest.mark.parametrize(("flavor", "seed"), [("portable", 0), ("portable", 2**40 + 3), ("optimized", 7)])
def test_node_seeded_sampling_draws_pythons_tokens(runner, request, flavor, seed):
    export_dir = request.getfixturevalue(
        "bundled_export" if flavor == "portable" else "bundled_optimized_export"
    )
    prompts = [PROMPTS["short"], PROMPTS["longer-than-window"]]
    expected = Model.load(export_dir).generate(prompts, max_new_tokens=32, seed=seed, **SAMPLING)
    node = node_json(
        runner, export_dir, *prompts, "--max-new-tokens", 32, "--seed", seed, *options(**SAMPLING)
    )
    assert [s["token_ids"] for s in node["sequences"]] == expected.sequences
    assert [s["text"] for s in node["sequences"]] == expected.texts


def test_splitmix64_and_the_draw_rule_agree_across_languages(tmp_path):
    """2,000 uniforms for three seeds, then 3,000 draws from filtered score rows, in both languages."""
    rng = np.random.default_rng(5)
    scores = rng.normal(0, 3, (3000, 97)).astype(np.float32)
    scores[rng.random(scores.shape) < 0.3] = -np.inf  # filtered tokens, as top-k / top-p leave them
    scores[:, 0] = 0.0  # every row keeps a token
    seeds = [0, 1, 2**64 - 1]
    rows = [[v if np.isfinite(v) else None for v in row.tolist()] for row in scores]
    (tmp_path / "rows.json").write_text(json.dumps(rows))
    script = f"""
        import {{ SplitMix64, sample }} from "{(CLIENT / "lib" / "sampling.js").as_uri()}";
        import fs from "node:fs";
        const rows = JSON.parse(fs.readFileSync("{tmp_path / "rows.json"}", "utf8"));
        const uniforms = {json.dumps([str(seed) for seed in seeds])}.map((seed) => {{
          const g = new SplitMix64(BigInt(seed));
          return Array.from({{ length: 2000 }}, () => g.random());
        }});
        const g = new SplitMix64(11n);
        const draw = (row) => sample(Float32Array.from(row, (v) => v ?? -Infinity), () => g.random());
        const draws = rows.map(draw);
        process.stdout.write(JSON.stringify({{ uniforms, draws }}));
    """
    result = subprocess.run(
        [NODE, "--input-type=module", "-e", script], capture_output=True, text=True, timeout=60, cwd=CLIENT
    )
    assert result.returncode == 0, result.stderr
    node = json.loads(result.stdout)
    for seed, uniforms in zip(seeds, node["uniforms"]):
        assert uniforms == SplitMix64(seed).random(2000).tolist()  # exact doubles
    assert node["draws"] == sample(scores, SplitMix64(11)).tolist()
    assert len(set(node["draws"])) > 40


@pytest.fixture(scope="module", params=["float16", "int8", "int4"])
def precision_export(request, tmp_path_factory):
    """A tiny model (window 4) exported in float16, int8 (dynamic) or int4 (optimized, MatMulNBits)."""
    from runtime_helpers import export_tiny

    choice = {"float16": {"precision": "float16"}, "int8": {"quantize": "int8"}}
    export_options = {"validate": False, **choice.get(request.param, {"optimize": True, "quantize": "int4"})}
    return export_tiny(
        "causal-lm", tmp_path_factory.mktemp(request.param) / "export", export_options=export_options
    )[1]


@pytest.mark.parametrize(
    "config",
    [
        {"repetition_penalty": 2.0},
        {"seed": 3, "do_sample": True, "temperature": 1.0, "top_k": 0},
        {"num_beams": 3, "repetition_penalty": 1.5},
    ],
    ids=["greedy", "sampling", "beams"],
)
def test_node_matches_python_on_quantized_and_float16_exports(runner, precision_export, config):
    prompts = [[5, 6, 7, 8, 9, 10, 11, 12], [3, 4]]  # past the window of 4, and left-padded
    expected = Model.load(precision_export).generate(prompts, max_new_tokens=20, eos_token_id=[], **config)
    args = [",".join(map(str, p)) for p in prompts]
    node = node_json(
        runner,
        precision_export,
        *args,
        "--token-ids",
        "--max-new-tokens",
        20,
        "--ignore-eos",
        *options(**config),
    )
    got = [s["token_ids"] for s in node["sequences"]]
    if expected.scores is None:
        assert got == expected.sequences
    else:
        # Beams: onnxruntime-node 1.30 and onnxruntime 1.32 round int8 matmuls apart on some CPUs
        # (~1e-5 per log-probability), which can flip a near-tie between two beams. Node's beams
        # must score what Python's do; their tokens may differ only where the scores tie.
        scores = [s["score"] for s in node["sequences"]]
        np.testing.assert_allclose(scores, expected.scores, atol=2e-3)
        assert [len(tokens) for tokens in got] == [len(tokens) for tokens in expected.sequences]
    assert len(set(expected.sequences[0])) > 3  # the tokens vary, so the comparison can fail


# ---- bad input: exit code 2 and one clear line on stderr, before onnxruntime runs ----------------


def expect_error(runner, *args, match: str) -> None:
    result = run_node(runner, *args, check=False)
    assert result.returncode == 2, (result.returncode, result.stdout, result.stderr)
    assert result.stderr.startswith("error: ") and match in result.stderr, result.stderr


@pytest.mark.parametrize(
    ("args", "match"),
    [
        (("5,4096", "--token-ids"), "token id 4096 outside the vocabulary [0, 4096)"),
        (("7," * 500, "--token-ids"), "a prompt of 500 tokens plus max_new_tokens=64 exceeds"),
        (("",), "prompt 0 is empty"),
        (("x", "--max-new-tokens", 512), "max_new_tokens (512) leaves no room for a prompt"),
        (("x", "--do-sample", "--temperature", 0), "temperature must be > 0 when sampling"),
        (("x", "--top-p", 1.5), "top_p must be in (0, 1]"),
        (("x", "--top-k", -1), "top_k must be an integer >= 0"),
        (("x", "--max-new-tokens", 0), "max_new_tokens must be an integer >= 1"),
        (("x", "--repetition-penalty", 0), "repetition_penalty must be > 0"),
        (("x", "--temperature", "hot"), '--temperature must be a number, got "hot"'),
        (
            ("x", "--early-stopping", "sometimes"),
            '--early-stopping must be true, false or never, got "sometimes"',
        ),
        (
            ("x", "--num-beams", 2, "--num-return-sequences", 3),
            "num_return_sequences (3) must be <= num_beams (2)",
        ),
        (("x", "--cache-mode", "paged"), 'unknown cache mode "paged"'),
        (("x", "--bogus"), "Unknown option '--bogus'"),
    ],
)
def test_node_refuses_bad_input(runner, bundled_export, args, match):
    expect_error(runner, bundled_export, *args, match=match)


def test_node_refuses_missing_folders(runner, tmp_path):
    expect_error(runner, tmp_path / "nowhere", "x", match="does not exist or is not a folder")
    expect_error(runner, tmp_path, "x", match="has no gptneo_onnx.json")


@pytest.fixture
def copy(bundled_export, tmp_path):
    return Path(shutil.copytree(bundled_export, tmp_path / "export"))


def edit_sidecar(folder: Path, change) -> None:
    path = folder / "gptneo_onnx.json"
    manifest = json.loads(path.read_text())
    change(manifest)
    path.write_text(json.dumps(manifest))


@pytest.mark.parametrize("name", ["onnx/model.onnx", "tokenizer.json"])
def test_node_refuses_tampered_files(runner, copy, name):
    data = bytearray((copy / name).read_bytes())
    data[len(data) // 2] ^= 0xFF
    (copy / name).write_bytes(bytes(data))
    expect_error(
        runner, copy, "x", match=f"{Path(name).name} does not match the sha256 recorded in gptneo_onnx.json"
    )
    unchecked = run_node(runner, copy, "x", "--no-verify", "--max-new-tokens", 1, check=False)
    assert "sha256" not in unchecked.stderr


@pytest.mark.parametrize("name", ["../model.onnx", "/etc/passwd", "sub/../../model.onnx", "C:model.onnx"])
def test_node_refuses_file_names_that_leave_the_folder(runner, copy, name):
    edit_sidecar(copy, lambda m: m["graph"].update(file=name))
    expect_error(runner, copy, "x", match="points outside the export folder")


def test_node_refuses_links_and_missing_files(runner, copy, tmp_path):
    outside = tmp_path / "tokenizer.json"
    shutil.move(copy / "tokenizer.json", outside)
    expect_error(runner, copy, "x", match="is missing tokenizer.json")
    (copy / "tokenizer.json").symlink_to(outside)
    expect_error(runner, copy, "x", match="tokenizer.json in")


@pytest.mark.parametrize(
    ("change", "match"),
    [
        (lambda m: m.update(format_version=3), "format_version 3"),
        (lambda m: (m.pop("io"), m.pop("format_minor_version")), "without the `io` roles"),
        (lambda m: m.update(task="base"), 'holds a "base" export'),
        (lambda m: m["io"].update(position_ids_rule="arange"), 'io.position_ids_rule is "arange"'),
        (lambda m: m["io"].update(logits="scores"), "names scores"),
    ],
)
def test_node_refuses_sidecars_it_cannot_follow(runner, copy, change, match):
    edit_sidecar(copy, change)
    expect_error(runner, copy, "x", match=match)


# ---- crafted exports (as tests/test_safe_exports.py makes them): refused before onnxruntime -------


@pytest.fixture
def crafted(external_export, tmp_path):
    return Path(shutil.copytree(external_export, tmp_path / "export"))


def test_node_runs_an_external_data_export_as_python_does(runner, external_export):
    expected = Model.load(external_export).generate([5, 6, 7], max_new_tokens=6).sequences[0]
    node = node_json(runner, external_export, "5,6,7", "--token-ids", "--max-new-tokens", 6)
    assert node["sequences"][0]["token_ids"] == expected


def _truncate_data(folder, tmp_path):
    data = (folder / "onnx" / "model.onnx.data").read_bytes()
    (folder / "onnx" / "model.onnx.data").write_bytes(data[: len(data) // 2])


def _outside_location(folder, tmp_path):
    shutil.copyfile(folder / "onnx" / "model.onnx.data", tmp_path / "model.onnx.data")
    rewrite_graph(folder, set_locations("../model.onnx.data"))


def _absolute_location(folder, tmp_path):
    shutil.copyfile(folder / "onnx" / "model.onnx.data", tmp_path / "model.onnx.data")
    rewrite_graph(folder, set_locations(str(tmp_path / "model.onnx.data")))


def _unlisted_location(folder, tmp_path):
    shutil.copyfile(folder / "onnx" / "model.onnx.data", folder / "onnx" / "other.data")
    rewrite_graph(folder, set_locations("other.data"))


def _unknown_domain(folder, tmp_path):
    rewrite_graph(folder, lambda model: model.opset_import.append(helper.make_opsetid("ai.onnx.ml", 3)))
    edit_sidecar(folder, lambda m: m["graph"].update(op_domains=["ai.onnx", "ai.onnx.ml"]))


def _ep_context(folder, tmp_path):
    rewrite_graph(folder, add_contrib_node("EPContext", embed_mode=0, ep_cache_context="../../engine"))
    edit_sidecar(folder, lambda m: m["graph"].update(op_domains=["ai.onnx", "com.microsoft"]))


def _not_onnx(folder, tmp_path):
    (folder / "onnx" / "model.onnx").write_bytes(b"\x0a\xff\xff\xff\xff\x0f not protobuf")
    reseal(folder)


def _bigger_tokenizer(folder, tmp_path):
    train_tokenizer(folder / "tokenizer.json", vocab_size=400)
    reseal(folder)


def _sidecar_link(folder, tmp_path):
    shutil.move(folder / "gptneo_onnx.json", tmp_path / "gptneo_onnx.json")
    (folder / "gptneo_onnx.json").symlink_to(tmp_path / "gptneo_onnx.json")


@pytest.mark.parametrize(
    ("damage", "match"),
    [
        (_truncate_data, "model.onnx.data in"),  # with --no-verify: the size check still runs
        (_outside_location, "external data names \"../model.onnx.data\", which points outside"),
        (_absolute_location, "which points outside the export folder"),
        (_unlisted_location, 'reads external data from "other.data", which gptneo_onnx.json does not list'),
        (lambda f, t: rewrite_graph(f, add_contrib_node()), "uses operator domain(s) com.microsoft, which"),
        (_unknown_domain, "declares operator domain(s) ai.onnx.ml; this runner runs only"),
        (_ep_context, "has a com.microsoft.EPContext node"),
        (_not_onnx, "model.onnx is not a valid ONNX file"),
        (_bigger_tokenizer, "does not fit the model: token"),
        (_sidecar_link, "gptneo_onnx.json is a link"),
        (lambda f, t: edit_sidecar(f, lambda m: m.update(validation={"report": "r.json", "passed": False})),
         "failed its parity validation"),
        (lambda f, t: edit_sidecar(f, lambda m: m["special_tokens"].update(eos_token_id=[2, 320])),
         "special_tokens.eos_token_id 320 is not a token id"),
        (lambda f, t: edit_sidecar(f, lambda m: m["model"].update(vocab_size=400)),
         "320 logits per token but the sidecar's vocab_size is 400"),
        (lambda f, t: edit_sidecar(f, lambda m: m["graph"].pop("op_domains")),
         "lacks the required field `graph.op_domains`"),
    ],
    ids=[
        "truncated", "dot-dot-location", "absolute-location", "unlisted-location", "undeclared-domain",
        "unknown-domain", "ep-context", "not-onnx", "tokenizer-too-big", "sidecar-link", "failed-validation",
        "special-token", "vocab-size", "missing-field",
    ],
)  # fmt: skip
def test_node_refuses_crafted_exports(runner, crafted, tmp_path, damage, match):
    damage(crafted, tmp_path)
    expect_error(runner, crafted, "5,6,7", "--token-ids", "--no-verify", match=match)


@pytest.mark.parametrize(
    ("change", "match"),
    [
        (lambda local: local.update(min_rows=local["window"] - 2), "min_rows >= window - 1"),
        (lambda local: local.update(input="mask2"), '"mask2" is not a graph input'),
        (lambda local: local.pop("window"), "lacks the required field `cache.local_window.window`"),
    ],
)
def test_node_refuses_a_bad_local_window(runner, bundled_optimized_export, tmp_path, change, match):
    copy = Path(shutil.copytree(bundled_optimized_export, tmp_path / "export"))
    assert json.loads((copy / "gptneo_onnx.json").read_text())["format_version"] == 2
    edit_sidecar(copy, lambda m: change(m["cache"]["local_window"]))
    expect_error(runner, copy, "x", match=match)
