"""Other clients of our graphs: the ONNX reference evaluator, tract and OpenVINO run the portable
exports with onnxruntime's outputs; transformers.js loads a fresh export as it is (docs/interop.md)."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from runtime_helpers import export_tiny

from gptneo_onnx.cli.defaults import BUNDLED_MODEL_DIR
from gptneo_onnx.reference import TASKS

IDS = np.array([[0, 0, 5, 6, 7, 8, 9, 10], [11, 12, 13, 14, 15, 16, 17, 18]], np.int64)  # row 0 left-padded


def graph_path(folder: Path) -> Path:
    return folder / json.loads((folder / "gptneo_onnx.json").read_text())["graph"]["file"]


def ort_runner(path: Path):
    options = ort.SessionOptions()
    options.intra_op_num_threads = options.inter_op_num_threads = 1
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    names = [output.name for output in session.get_outputs()]
    return lambda feed: dict(zip(names, session.run(None, feed)))


def reference_runner(path: Path):
    from onnx.reference import ReferenceEvaluator

    model = onnx.load(str(path))
    evaluator, names = ReferenceEvaluator(model), [output.name for output in model.graph.output]
    return lambda feed: dict(zip(names, evaluator.run(None, feed)))


def tract_runner(path: Path):
    tract = pytest.importorskip("tract")
    graph = onnx.load(str(path), load_external_data=False).graph  # tract renames outputs: keep ours
    inputs, outputs = [value.name for value in graph.input], [value.name for value in graph.output]
    # An input with a default (num_logits_to_keep) is an initializer too: tract folds it in.
    defaults = {init.name for init in graph.initializer}
    inputs = [name for name in inputs if name not in defaults]
    runnable = tract.onnx().load(str(path)).into_model().into_runnable()
    return lambda feed: {
        name: value.to_numpy() for name, value in zip(outputs, runnable.run([feed[n] for n in inputs]))
    }


def prefill_feed(config, ids: np.ndarray = IDS) -> dict:
    """A causal-lm prefill of (left-padded) `ids` on an empty cache."""
    mask = (ids != 0).astype(np.int64)
    shape = (len(ids), config.num_heads, 0, config.hidden_size // config.num_heads)
    past = {
        f"past_key_values.{i}.{kind}": np.zeros(shape, np.float32)
        for i in range(config.num_layers)
        for kind in ("key", "value")
    }
    return {
        "input_ids": ids,
        "attention_mask": mask,
        "position_ids": np.maximum(mask.cumsum(-1) - 1, 0),
        **past,
    }


def cache_of(outputs: dict) -> dict:
    return {name.replace("present", "past_key_values"): v for name, v in outputs.items() if "present" in name}


def step_feed(previous: dict, outputs: dict) -> dict:
    """The next one-token step: greedy on the last logits, on the cache the previous step left."""
    token = outputs["logits"][:, -1:].argmax(-1)
    mask = np.concatenate([previous["attention_mask"], np.ones((len(token), 1), np.int64)], axis=1)
    position = np.maximum(mask.cumsum(-1) - 1, 0)[:, -1:]
    return {"input_ids": token, "attention_mask": mask, "position_ids": position, **cache_of(outputs)}


@pytest.fixture(scope="module", params=TASKS)
def portable_export(request, tmp_path_factory):
    task = request.param
    hf_model, folder = export_tiny(task, tmp_path_factory.mktemp(task), export_options={"validate": False})
    return task, hf_model.config, folder


@pytest.mark.parametrize("runner", [reference_runner, tract_runner], ids=["reference", "tract"])
def test_portable_graphs_of_every_head_run_in_spec_strict_runtimes(portable_export, runner):
    """Both follow the spec strictly (rank-0 Range inputs and CumSum axis, INT64_MAX slice ends)."""
    task, config, folder = portable_export
    ours, theirs = ort_runner(graph_path(folder)), runner(graph_path(folder))
    if task != "causal-lm":
        feeds = [{"input_ids": IDS, "attention_mask": (IDS != 0).astype(np.int64)}]
    else:
        prefill = prefill_feed(config)
        feeds = [prefill, step_feed(prefill, ours(prefill))]
    for feed in feeds:
        expected, actual = ours(feed), theirs(feed)
        assert sorted(actual) == sorted(expected)
        for name, value in expected.items():
            np.testing.assert_allclose(actual[name], value, atol=2e-5, err_msg=f"{task} {name}")


def greedy(runner, feed: dict, new_tokens: int) -> np.ndarray:
    """Greedy ids from a prefill `feed` through `new_tokens` one-token steps on the cache."""
    generated = []
    for _ in range(new_tokens):
        outputs = runner(feed)
        feed = step_feed(feed, outputs)
        generated.append(feed["input_ids"])
    return np.concatenate(generated, axis=1)


def openvino_runner(path: Path):
    """OpenVINO with the f32 precision hint (by default it computes in bf16 where the CPU has it);
    outputs matched by name through get_names(), not by position."""
    openvino = pytest.importorskip("openvino")
    settings = {"INFERENCE_PRECISION_HINT": "f32", "INFERENCE_NUM_THREADS": 1}
    compiled = openvino.Core().compile_model(str(path), "CPU", settings)
    request = compiled.create_infer_request()

    def run(feed: dict) -> dict:
        results = request.infer(feed)
        return {name: np.array(value) for port, value in results.items() for name in port.get_names()}

    return run


def test_openvino_runs_the_portable_causal_lm_with_onnxruntimes_greedy_ids(tmp_path):
    """A left-padded batch of 2, prefill then 24 cached one-token steps (the window is 4)."""
    hf_model, folder = export_tiny("causal-lm", tmp_path, export_options={"validate": False})
    path = graph_path(folder)
    ours, theirs = ort_runner(path), openvino_runner(path)
    feed = prefill_feed(hf_model.config)
    expected = greedy(ours, feed, 24)
    np.testing.assert_array_equal(greedy(theirs, feed, 24), expected)
    np.testing.assert_allclose(theirs(feed)["logits"], ours(feed)["logits"], atol=1e-4)


def test_openvino_runs_the_optimized_causal_lm_at_batch_1(tmp_path):
    """Batch 1 only: at batch 2, OpenVINO 2026.4's own GroupQueryAttention fails in a Reshape (or,
    with one thread, returns empty outputs); docs/interop.md."""
    options = {"validate": False, "optimize": True}
    hf_model, folder = export_tiny("causal-lm", tmp_path, export_options=options)
    path = graph_path(folder)
    ours, theirs = ort_runner(path), openvino_runner(path)
    feed = prefill_feed(hf_model.config, IDS[1:])

    def full_local_mask(run):  # local layers get the whole mask: nothing trimmed
        return lambda feed: run({**feed, "local_attention_mask": feed["attention_mask"]})

    expected = greedy(full_local_mask(ours), feed, 12)
    np.testing.assert_array_equal(greedy(full_local_mask(theirs), feed, 12), expected)


NODE = shutil.which("node")
INTEROP = Path(__file__).resolve().parent.parent / "clients" / "interop"
INSTALL = "cd clients/interop && ONNXRUNTIME_NODE_INSTALL_CUDA=skip npm ci"
# One prompt longer than the bundled model's window (128 tokens), one short: a left-padded batch.
PROMPTS = [(BUNDLED_MODEL_DIR.parent / "runtime" / "generation.py").read_text()[:700], "class Stack:"]
NEW_TOKENS = 20


def transformers_js(folder: Path) -> dict:
    if NODE is None:
        pytest.skip("node is not installed: the transformers.js tests need Node.js >= 20 on PATH")
    if not (INTEROP / "node_modules" / "@huggingface" / "transformers" / "package.json").is_file():
        pytest.fail(f"node is installed but transformers.js is not: run `{INSTALL}`")
    script = INTEROP / "transformers-js-greedy.js"
    command = [NODE, str(script), str(folder), str(NEW_TOKENS), *PROMPTS]
    result = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


@pytest.fixture(scope="module")
def transformers_greedy():
    """transformers' own generate on the bundled checkpoint: the left-padded batch and its tokens,
    with the checkpoint's generation_config.json (greedy, repetition penalty), as transformers.js reads it."""
    import torch
    import transformers
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(BUNDLED_MODEL_DIR / "tokenizer.json"))
    rows = [encoding.ids for encoding in tokenizer.encode_batch(PROMPTS)]
    width = max(map(len, rows))
    ids = torch.tensor([[0] * (width - len(row)) + row for row in rows])  # pad id 0, on the left
    mask = torch.tensor([[0] * (width - len(row)) + [1] * len(row) for row in rows])
    model = transformers.GPTNeoForCausalLM.from_pretrained(BUNDLED_MODEL_DIR).eval()
    with torch.no_grad():
        sequences = model.generate(
            ids, attention_mask=mask, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS
        )
    return ids.tolist(), sequences.tolist()


def test_transformers_js_loads_a_fresh_export_as_is_with_transformers_greedy_tokens(
    bundled_export, transformers_greedy
):
    """from_pretrained(folder) on an untouched export: tokenizer_config.json (GPT-2 class, pad, left
    padding), onnx/model.onnx and config.json's transformers.js_config are all it needs."""
    ids, sequences = transformers_greedy
    assert len(ids[0]) > 128 and ids[1][0] == 0  # past the window, and padded on the left
    output = transformers_js(bundled_export)
    assert output["input_ids"] == ids
    assert output["sequences"] == sequences


def test_transformers_js_runs_the_optimized_flavor_without_the_windowed_local_cache(
    tmp_path, transformers_greedy
):
    """transformers.js feeds Optimum's inputs only: `--optimize --no-windowed-local-cache` keeps them."""
    from gptneo_onnx.cli.defaults import export_bundled_model

    export_bundled_model(tmp_path, progress=False, optimize=True, windowed_local_cache=False, validate=False)
    assert transformers_js(tmp_path)["sequences"] == transformers_greedy[1]
