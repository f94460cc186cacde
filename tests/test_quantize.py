"""Quantized exports: int8 dynamic and int4 MatMulNBits, embedding quantization, quality report."""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import tiny_hf_model

ort = pytest.importorskip("onnxruntime")
import onnx  # noqa: E402
from onnx import TensorProto, helper, numpy_helper  # noqa: E402

from gptneo_onnx.export import export  # noqa: E402
from gptneo_onnx.export.quality import quality_report  # noqa: E402
from gptneo_onnx.export.quantize import QuantizationError, block_quantize_rows  # noqa: E402
from gptneo_onnx.reference import from_transformers  # noqa: E402


@pytest.mark.parametrize("bits", [4, 8])
def test_block_quantized_rows_read_back_by_gather_block_quantized(bits):
    rng = np.random.default_rng(0)
    table = rng.standard_normal((10, 64)).astype(np.float32)
    data, scales = block_quantize_rows(table, bits, 16)
    node = helper.make_node(
        "GatherBlockQuantized",
        ["data", "ids", "scales"],
        ["out"],
        domain="com.microsoft",
        bits=bits,
        block_size=16,
        gather_axis=0,
        quantize_axis=1,
    )
    graph = helper.make_graph(
        [node],
        "gbq",
        [helper.make_tensor_value_info("ids", TensorProto.INT64, [None])],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, None)],
        [numpy_helper.from_array(data, "data"), numpy_helper.from_array(scales, "scales")],
    )
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)]
    )
    model.ir_version = 8
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    ids = np.array([3, 0, 9, 3])
    (rows,) = session.run(None, {"ids": ids})
    step = np.repeat(scales, 16, axis=1)[ids]  # one quantization step per element
    assert np.all(np.abs(rows - table[ids]) <= step / 2 + 1e-6)


@pytest.fixture(scope="module")
def reference():
    return from_transformers(tiny_hf_model("causal-lm", hidden_size=64, num_heads=4))


@pytest.mark.parametrize("method, node", [("int8", "MatMulInteger"), ("int4", "MatMulNBits")])
@pytest.mark.parametrize("optimize", [False, True])
def test_quantized_export_validates_and_writes_quality_report(tmp_path, reference, method, node, optimize):
    windows = np.random.default_rng(1).integers(3, 97, size=(3, 16))
    result = export(
        reference,
        tmp_path,
        progress=False,
        optimize=optimize,
        quantize=method,
        block_size=16,
        quality_windows=windows,
    )
    assert result.report["passed"]
    record = result.manifest["quantization"]
    assert record["method"] == {"int8": "int8-dynamic", "int4": "int4-weight-only"}[method]
    assert record["lm_head"] == "untied MatMul" and record["embedding"].startswith("GatherBlockQuantized")
    if method == "int4":
        assert record["block_size"] == 16 and record["accuracy_level"] == 4
    graph = onnx.load(str(tmp_path / result.manifest["graph"]["file"]))
    ops = [n.op_type for n in graph.graph.node]
    assert node in ops and "GatherBlockQuantized" in ops and "Gemm" not in ops
    assert all("transformer.wte.weight" not in n.input for n in graph.graph.node)
    quality = json.loads((tmp_path / "quality_report.json").read_text())
    assert quality["predicted_tokens"] == 3 * 15
    assert 0.5 < quality["perplexity_ratio"] < 2.0 and quality["top1_agreement"] > 0.5
    assert result.manifest["quality"]["report"] == "quality_report.json"


def test_quality_report_of_fp32_export_against_itself_is_exact(tmp_path, reference):
    export(reference, tmp_path, progress=False, validate=False)
    windows = np.random.default_rng(2).integers(3, 97, size=(2, 12))
    report = quality_report(tmp_path, windows, reference)
    assert report["top1_agreement"] == 1.0
    assert report["perplexity"] == pytest.approx(report["reference_perplexity"], rel=1e-4)


def test_bad_quantization_options_are_refused(tmp_path, reference):
    with pytest.raises(QuantizationError, match="int8, int4"):
        export(reference, tmp_path / "a", progress=False, quantize="int3")
    with pytest.raises(QuantizationError, match="power of two"):
        export(reference, tmp_path / "b", progress=False, quantize="int4", block_size=24)
    with pytest.raises(ValueError, match="float32"):
        export(reference, tmp_path / "c", progress=False, quantize="int8", precision="float16")
