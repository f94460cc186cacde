"""The optimized flavor: GroupQueryAttention semantics, fused ops, parity, fallback, cache modes."""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import tiny_hf_model

ort = pytest.importorskip("onnxruntime")
from onnx import TensorProto, helper  # noqa: E402

from gptneo_onnx.bench.ort_loop import ExportDecoder  # noqa: E402
from gptneo_onnx.export import export  # noqa: E402
from gptneo_onnx.reference import from_transformers  # noqa: E402
from gptneo_onnx.runtime.causal_lm import gpu_attention_advice  # noqa: E402

HEADS, HEAD_DIM = 2, 8


def _gqa_session(window: int) -> ort.InferenceSession:
    """One GroupQueryAttention node wired as the optimized graph wires it."""
    hidden = HEADS * HEAD_DIM
    specs = [("qkv", TensorProto.FLOAT, ["B", "S", 3 * hidden])]
    specs += [(name, TensorProto.FLOAT, ["B", HEADS, "P", HEAD_DIM]) for name in ("past_key", "past_value")]
    specs += [("seqlens_k", TensorProto.INT32, ["B"]), ("total", TensorProto.INT32, [])]
    specs += [("bias", TensorProto.FLOAT, ["B", 1, "S", "T"])]
    inputs = [helper.make_tensor_value_info(*spec) for spec in specs]
    node = helper.make_node(
        "GroupQueryAttention",
        ["qkv", "", "", "past_key", "past_value", "seqlens_k", "total", "", "", "", "bias"],
        ["out", "present_key", "present_value"],
        domain="com.microsoft",
        num_heads=HEADS,
        kv_num_heads=HEADS,
        scale=1.0,
        local_window_size=window,
    )
    outputs = [helper.make_tensor_value_info(name, TensorProto.FLOAT, None) for name in node.output]
    model = helper.make_model(
        helper.make_graph([node], "gqa", inputs, outputs),
        opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)],
    )
    model.ir_version = 8
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])


def _portable_attention(qkv: np.ndarray, mask: np.ndarray, window: int | None) -> np.ndarray:
    """GPT-Neo's attention: unscaled, key j visible to query i iff not padding and 0 <= i-j < window."""
    batch, length, _ = qkv.shape
    q, k, v = (
        t.reshape(batch, length, HEADS, HEAD_DIM).transpose(0, 2, 1, 3) for t in np.split(qkv, 3, axis=-1)
    )
    distance = np.arange(length)[:, None] - np.arange(length)[None]
    visible = distance >= 0
    if window is not None:
        visible &= distance < window
    visible = visible[None, None] & mask[:, None, None, :].astype(bool)
    scores = np.where(visible, q @ k.transpose(0, 1, 3, 2), np.finfo(np.float32).min)
    probs = np.exp(scores - scores.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    return (probs @ v).transpose(0, 2, 1, 3).reshape(batch, length, -1)


@pytest.mark.parametrize("window", [1, 3, 5, None])
def test_gqa_local_window_matches_gpt_neo_mask(window):
    """Checks the installed onnxruntime: local_window_size=W means 0 <= i-j < W (old builds used W+1)."""
    rng = np.random.default_rng(0)
    batch, length, split = 2, 11, 8
    qkv = rng.standard_normal((batch, length, 3 * HEADS * HEAD_DIM)).astype(np.float32) * 2
    mask = np.ones((batch, length), np.int64)
    mask[1, :3] = 0  # left padding, as a 2-D mask through attention_bias
    bias = np.where(mask[:, None, None, :] > 0, 0.0, np.finfo(np.float32).min).astype(np.float32)
    expected = _portable_attention(qkv, mask, window)
    session = _gqa_session(window or -1)
    empty = np.zeros((batch, HEADS, 0, HEAD_DIM), np.float32)
    past, outputs = (empty, empty), []
    for start, stop in ((0, split), (split, split + 1), (split + 1, length)):  # prefill, step, chunk
        feed = {
            "qkv": qkv[:, start:stop],
            "past_key": past[0],
            "past_value": past[1],
            "seqlens_k": np.full(batch, stop - 1, np.int32),
            "total": np.array(stop, np.int32),
            "bias": np.ascontiguousarray(np.broadcast_to(bias[..., :stop], (batch, 1, stop - start, stop))),
        }
        # A chunk on top of a past takes one row at a time (the graph's multi_token_step_max_batch).
        rows = [slice(None)] if start == 0 or stop - start == 1 else [slice(i, i + 1) for i in range(batch)]
        results = [session.run(None, {k: v[r] if v.ndim else v for k, v in feed.items()}) for r in rows]
        out, key, value = (np.concatenate(parts, axis=0) for parts in zip(*results))
        outputs.append(out)
        past = (key, value)
    actual = np.concatenate(outputs, axis=1)
    keep = mask.astype(bool)
    np.testing.assert_allclose(actual[keep], expected[keep], atol=1e-5)


def _ops(folder) -> set[str]:
    import onnx

    return {node.op_type for node in onnx.load(str(folder / "onnx" / "model.onnx")).graph.node}


@pytest.mark.parametrize("task", ["causal-lm", "sequence-classification", "question-answering"])
def test_optimized_export_passes_parity(tmp_path, task):
    reference = from_transformers(tiny_hf_model(task, num_heads=2))  # head_dim 16
    result = export(reference, tmp_path, progress=False, optimize=True)
    assert result.report["passed"]
    assert result.manifest["flavor"] == "optimized"
    fused = task != "question-answering"  # QA compares padded rows: portable attention there
    assert (result.manifest["optimization"]["attention"] == "GroupQueryAttention") == fused
    assert ("GroupQueryAttention" in _ops(tmp_path)) == fused
    assert {"SkipLayerNormalization", "FastGelu"} <= _ops(tmp_path)
    assert "LayerNormalization" not in _ops(tmp_path)


def test_optimized_float16_passes_parity(tmp_path):
    reference = from_transformers(tiny_hf_model("causal-lm", num_heads=2))
    assert export(reference, tmp_path, progress=False, optimize=True, precision="float16").report["passed"]


def test_head_dim_not_multiple_of_8_falls_back_to_portable_attention(tmp_path):
    reference = from_transformers(tiny_hf_model("causal-lm", num_heads=8))  # head_dim 4
    result = export(reference, tmp_path, progress=False, optimize=True)
    assert result.report["passed"]
    summary = result.manifest["optimization"]
    assert summary["attention"] == "portable" and "multiple of 8" in summary["attention_fallback_reason"]
    assert result.manifest["cache"]["modes"] == ["concat"]
    assert "GroupQueryAttention" not in _ops(tmp_path) and "SkipLayerNormalization" in _ops(tmp_path)


def test_shared_buffer_cache_matches_concat_and_portable(tmp_path):
    reference = from_transformers(tiny_hf_model("causal-lm", num_heads=2, window_size=3))
    export(reference, tmp_path / "portable", progress=False, validate=False)
    export(reference, tmp_path / "optimized", progress=False, validate=False, optimize=True)
    manifest = json.loads((tmp_path / "optimized" / "gptneo_onnx.json").read_text())
    assert manifest["cache"]["mode"] == "concat" and "shared-buffer" in manifest["cache"]["modes"]
    # fp32 GQA has no CUDA kernel (onnxruntime runs it on the CPU): loading it on a GPU warns.
    portable = json.loads((tmp_path / "portable" / "gptneo_onnx.json").read_text())
    assert "float16" in gpu_attention_advice(manifest, "cuda") and gpu_attention_advice(manifest, "tensorrt")
    assert gpu_attention_advice(manifest, "cpu") is None and gpu_attention_advice(portable, "cuda") is None
    assert gpu_attention_advice({**manifest, "precision": "float16"}, "cuda") is None
    rng = np.random.default_rng(3)
    ids = rng.integers(3, 97, size=(2, 6))
    mask = np.ones_like(ids)
    mask[1, :2] = 0
    ids[1, :2] = 0
    runs = {}
    for name, folder, mode in (
        ("portable", "portable", "concat"),
        ("concat", "optimized", "concat"),
        ("shared", "optimized", "shared-buffer"),
    ):
        logits: list = []
        runs[name] = ExportDecoder(tmp_path / folder, mode).generate(ids, mask, 8, logits), np.stack(logits)
    for name in ("concat", "shared"):
        np.testing.assert_array_equal(runs[name][0], runs["portable"][0])
        np.testing.assert_allclose(runs[name][1], runs["portable"][1], atol=1e-4)


def test_runtime_batched_multi_token_step_with_past_runs_row_by_row(tmp_path):
    """Fused attention takes a multi-token step on top of a past one row at a time (so the graph
    also loads on onnxruntime 1.31): the runtime splits the batch and matches the portable graph."""
    from gptneo_onnx.runtime import InputError, Model

    reference = from_transformers(tiny_hf_model("causal-lm", num_heads=2, window_size=3))
    export(reference, tmp_path / "portable", progress=False, validate=False)
    export(reference, tmp_path / "optimized", progress=False, validate=False, optimize=True)
    manifest = json.loads((tmp_path / "optimized" / "gptneo_onnx.json").read_text())
    assert manifest["optimization"]["multi_token_step_max_batch"] == 1
    ids = np.random.default_rng(5).integers(3, 97, size=(2, 9))
    mask = np.ones_like(ids)
    mask[0, :3] = 0
    results = {}
    for name in ("portable", "optimized"):
        model = Model.load(tmp_path / name, provider="cpu", cache_mode="concat")
        _, past = model.forward(ids[:, :5], mask[:, :5])
        logits, past = model.forward(ids[:, 5:], mask, past=past)  # 4 tokens on top of 5, batch 2
        results[name] = logits, past.values
    keep = mask[:, 5:].astype(bool)
    np.testing.assert_allclose(results["optimized"][0][keep], results["portable"][0][keep], atol=1e-4)
    # Local layers keep only their newest window - 1 rows (windowed local cache), global ones all.
    local = {
        layer[k]
        for layer in manifest["cache"]["layers"]
        if layer["window"]
        for k in ("past_key", "past_value")
    }
    assert local and manifest["cache"]["local_window"]["min_rows"] == 2
    for name, value in results["portable"][1].items():
        rows = 2 if name in local else ids.shape[1]
        assert results["optimized"][1][name].shape[2] == rows
        real = mask[:, -rows:].astype(bool)  # cache rows of real tokens: (B, H, T, D) -> (B, T, H, D)[real]
        optimized = results["optimized"][1][name].transpose(0, 2, 1, 3)[real]
        np.testing.assert_allclose(optimized, value[:, :, -rows:].transpose(0, 2, 1, 3)[real], atol=1e-4)
    shared = Model.load(tmp_path / "optimized", provider="cpu", cache_mode="shared-buffer")
    _, past = shared.forward(ids[:, :5], mask[:, :5], capacity=9)
    with pytest.raises(InputError, match="cache_mode='concat'"):
        shared.forward(ids[:, 5:], mask, past=past)
