"""Other clients of our graphs: the ONNX reference evaluator, tract and OpenVINO run the portable
exports with onnxruntime's outputs; transformers.js loads a fresh export as it is (docs/interop.md)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from runtime_helpers import export_tiny

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


@pytest.fixture(scope="module")
def causal_lm_export(tmp_path_factory):
    """A portable causal-lm export whose 24 new tokens cross the window (4) and the 8-token prompt."""
    hf_model, folder = export_tiny("causal-lm", tmp_path_factory.mktemp("causal-lm"))
    return hf_model, folder


def test_openvino_runs_the_portable_causal_lm_with_onnxruntimes_greedy_ids(causal_lm_export):
    hf_model, folder = causal_lm_export
    path = graph_path(folder)
    ours, theirs = ort_runner(path), openvino_runner(path)
    feed = prefill_feed(hf_model.config)
    expected = greedy(ours, feed, 24)
    np.testing.assert_array_equal(greedy(theirs, feed, 24), expected)
    np.testing.assert_allclose(theirs(feed)["logits"], ours(feed)["logits"], atol=1e-4)
