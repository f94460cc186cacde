"""The export plan: options resolved once, read back from the graph and the sidecar it produced;
refused combinations fail before anything is written; one validate-and-record step."""

from __future__ import annotations

import json

import onnx
import pytest
from conftest import tiny_hf_model
from onnx import helper

from gptneo_onnx.contract import LOCAL_ATTENTION_MASK, cache_names
from gptneo_onnx.errors import ParityError, QuantizationError
from gptneo_onnx.export import export
from gptneo_onnx.export.plan import EXTERNAL_DATA_THRESHOLD, FUSED_ATTENTION, PORTABLE_ATTENTION, plan_export
from gptneo_onnx.export.validate import validate_and_record
from gptneo_onnx.reference import from_transformers
from gptneo_onnx.runtime import Model

# global, local, local: two local layers of window 4 share the windowed cache
MIXED = dict(num_layers=3, attention_types=[[["global", "local", "local"], 1]])


def _graph(folder, manifest) -> onnx.ModelProto:
    return onnx.load(str(folder / manifest["graph"]["file"]), load_external_data=False)


def _past_length_dim(graph: onnx.ModelProto, name: str) -> str:
    tensor = next(item for item in graph.graph.input if item.name == name)
    return tensor.type.tensor_type.shape.dim[2].dim_param


def _gqa_windows(graph: onnx.ModelProto) -> list[int]:
    """local_window_size of each GroupQueryAttention node, in graph (= layer) order."""
    nodes = [node for node in graph.graph.node if node.op_type == "GroupQueryAttention"]
    return [
        next(helper.get_attribute_value(a) for a in node.attribute if a.name == "local_window_size")
        for node in nodes
    ]


CASES = {  # options -> (windowed local cache, attention kernel of every layer)
    "portable": (dict(), False, PORTABLE_ATTENTION),
    "portable-windowed": (dict(windowed_local_cache=True), True, PORTABLE_ATTENTION),
    "optimized": (dict(optimize=True), True, FUSED_ATTENTION),
    "optimized-plain": (dict(optimize=True, windowed_local_cache=False), False, FUSED_ATTENTION),
    # head_dim 4: GroupQueryAttention can't serve on CPU, so the optimized graph falls back
    "optimized-head-dim-4": (dict(optimize=True, num_heads=8), True, PORTABLE_ATTENTION),
}


@pytest.mark.parametrize("case", CASES)
def test_the_graph_and_the_sidecar_are_what_the_plan_says(tmp_path, case):
    options, windowed, kernel = CASES[case]
    options = dict(options)
    heads = options.pop("num_heads", 4)
    model = from_transformers(tiny_hf_model("causal-lm", num_heads=heads, **MIXED))
    result = export(model, tmp_path, progress=False, validate=False, **options)
    plan, manifest = result.plan, result.manifest
    # the plan resolved the options as expected ...
    assert plan.windowed_local_cache is windowed and plan.local_window == (4 if windowed else None)
    assert [layer.attention for layer in plan.layers] == [kernel] * 3
    assert [layer.windowed_cache for layer in plan.layers] == [False, windowed, windowed]
    assert (plan.attention_fallback_reason is not None) == (case == "optimized-head-dim-4")
    # ... and the graph has it so
    graph = _graph(tmp_path, manifest)
    inputs = [item.name for item in graph.graph.input]
    assert (LOCAL_ATTENTION_MASK in inputs) is windowed
    for layer in plan.layers:
        expected = "local_past_sequence_length" if layer.windowed_cache else "past_sequence_length"
        assert _past_length_dim(graph, cache_names(layer.layer)["past_key"]) == expected
    if kernel == FUSED_ATTENTION:
        assert _gqa_windows(graph) == [-1, 4, 4]
    else:
        assert _gqa_windows(graph) == []
    # ... and so does the sidecar the runtime reads
    assert manifest["format_version"] == (2 if windowed else 1)
    assert manifest["io"]["local_attention_mask"] == (LOCAL_ATTENTION_MASK if windowed else None)
    assert ("local_window" in manifest["cache"]) is windowed
    if plan.flavor == "optimized":
        assert manifest["optimization"]["attention"] == kernel
        assert manifest["optimization"]["attention_fallback_reason"] == plan.attention_fallback_reason
    else:
        assert "optimization" not in manifest


def test_a_task_without_a_cache_plans_no_window_and_qa_falls_back(tmp_path):
    model = from_transformers(tiny_hf_model("question-answering", **MIXED))
    result = export(model, tmp_path, progress=False, validate=False, optimize=True)
    assert result.plan.local_window is None and not result.plan.cached
    assert "padded positions" in result.plan.attention_fallback_reason
    graph = _graph(tmp_path, result.manifest)
    assert LOCAL_ATTENTION_MASK not in [item.name for item in graph.graph.input]
    assert _gqa_windows(graph) == [] and "SkipLayerNormalization" in {n.op_type for n in graph.graph.node}


def test_external_data_is_decided_by_size_once():
    config = from_transformers(tiny_hf_model("causal-lm")).config
    small = plan_export(config, "causal-lm", 1000)
    large = plan_export(config, "causal-lm", EXTERNAL_DATA_THRESHOLD // 4 + 1)
    assert not small.external_data and small.external_data_file is None
    assert large.external_data and large.external_data_file == "onnx/model.onnx.data"
    # fp16 weights are half the bytes: the same count stays inline
    assert not plan_export(
        config, "causal-lm", EXTERNAL_DATA_THRESHOLD // 4 + 1, precision="float16"
    ).external_data
    quantized = plan_export(config, "causal-lm", 1000, external_data=True, quantize="int4")
    assert quantized.graph_file == "onnx/model_q4.onnx" and not quantized.lm_head_row_views


REFUSED = {
    "windowed cache without a cache": (dict(task="token-classification", windowed_local_cache=True),
                                       ValueError, "causal-lm exports only"),
    "unknown precision": (dict(precision="bfloat16"), ValueError, "float32, float16"),
    "quantize from float16": (dict(quantize="int8", precision="float16"), ValueError, "float32"),
    "unknown method": (dict(quantize="int3"), QuantizationError, "int8, int4"),
    "block size": (dict(quantize="int4", block_size=24), QuantizationError, "power of two"),
    "accuracy level": (dict(quantize="int4", accuracy_level=9), QuantizationError, "0 to 4"),
}  # fmt: skip


@pytest.mark.parametrize("case", REFUSED)
def test_refused_options_fail_at_plan_time_before_anything_is_written(tmp_path, case):
    options, error, message = REFUSED[case]
    options = dict(options)
    task = options.pop("task", "causal-lm")
    model = from_transformers(tiny_hf_model(task))
    with pytest.raises(error, match=message):
        export(model, tmp_path / "out", progress=False, **options)
    assert list(tmp_path.iterdir()) == []  # not even a staging folder


def test_export_and_verify_share_one_validate_and_record_step(tmp_path):
    """The report it returns, the report ParityError carries, parity_report.json and the sidecar's
    validation record agree, and the record decides whether the export loads."""
    right = from_transformers(tiny_hf_model("causal-lm", seed=0))
    result = export(right, tmp_path, progress=False, validate=False)
    manifest = result.manifest
    assert manifest["validation"] == {"status": "skipped"}

    wrong = from_transformers(tiny_hf_model("causal-lm", seed=1))
    with pytest.raises(ParityError, match="does not match the reference") as caught:
        validate_and_record(wrong, tmp_path, manifest)
    on_disk = json.loads((tmp_path / "parity_report.json").read_text())
    assert caught.value.parity_report == on_disk and on_disk["passed"] is False
    sidecar = json.loads((tmp_path / "gptneo_onnx.json").read_text())
    assert sidecar["validation"]["status"] == "failed"
    assert sidecar["validation"]["max_abs_diff"] == on_disk["max_abs_diff"]
    with pytest.raises(Exception, match="failed its parity validation"):
        Model.load(tmp_path)

    report = validate_and_record(right, tmp_path, manifest)
    assert report == json.loads((tmp_path / "parity_report.json").read_text()) and report["passed"]
    sidecar = json.loads((tmp_path / "gptneo_onnx.json").read_text())
    assert sidecar["validation"]["status"] == "passed"
    assert sidecar["validation"]["max_abs_diff"] == report["max_abs_diff"]
    assert Model.load(tmp_path).generate([[3, 4, 5]], max_new_tokens=2).sequences[0]
