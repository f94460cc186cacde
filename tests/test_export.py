"""Exports of tiny random checkpoints, checked against transformers and the ONNX reference evaluator."""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from conftest import tiny_hf_model

from gptneo_onnx.export import ParityError, export
from gptneo_onnx.export import layers as export_layers
from gptneo_onnx.reference import TASKS, from_transformers
from gptneo_onnx.runtime import ExportFolderError, Model


def session(folder):
    graph = json.loads((folder / "gptneo_onnx.json").read_text())["graph"]["file"]
    return ort.InferenceSession(str(folder / graph), providers=["CPUExecutionProvider"])


def empty_past(config, batch, dtype=np.float32):
    shape = (batch, config.num_heads, 0, config.hidden_size // config.num_heads)
    return {
        f"past_key_values.{i}.{kind}": np.zeros(shape, dtype)
        for i in range(config.num_layers)
        for kind in ("key", "value")
    }


def ort_step(sess, ids, mask, past, local_mask=None):
    pos = np.maximum(mask.cumsum(-1) - 1, 0)[:, -ids.shape[1] :]
    names = [o.name for o in sess.get_outputs()]
    feed = {"input_ids": ids, "attention_mask": mask, "position_ids": pos, **past}
    if local_mask is not None:
        feed["local_attention_mask"] = local_mask
    out = dict(zip(names, sess.run(None, feed)))
    present = {
        name.replace("present", "past_key_values"): out[name] for name in names if name.startswith("present")
    }
    return out["logits"], present


def ort_greedy(sess, config, ids, mask, new_tokens):
    past = empty_past(config, ids.shape[0])
    tokens, step = ids, ids
    for _ in range(new_tokens):
        logits, past = ort_step(sess, step, mask, past)
        step = logits[:, -1].argmax(-1)[:, None].astype(np.int64)
        tokens = np.concatenate([tokens, step], axis=1)
        mask = np.concatenate([mask, np.ones_like(step)], axis=1)
    return tokens


@pytest.mark.parametrize("task", TASKS)
def test_every_task_exports_validates_and_matches_transformers(task, tmp_path):
    hf_model = tiny_hf_model(task)
    result = export(from_transformers(hf_model), tmp_path, progress=False)
    assert result.report["passed"] and result.report["max_abs_diff"] < 1e-4
    assert json.loads((tmp_path / "parity_report.json").read_text())["passed"]

    ids = torch.randint(3, 97, (2, 21), generator=torch.Generator().manual_seed(3))
    mask = torch.ones_like(ids)
    ids[0, :6], mask[0, :6] = 0, 0  # left padding
    with torch.no_grad():
        hf_out = hf_model(ids, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0))
    feed = {"input_ids": ids.numpy(), "attention_mask": mask.numpy()}
    if task == "causal-lm":
        feed["position_ids"] = (mask.cumsum(-1) - 1).clamp(min=0).numpy()
        feed.update(empty_past(hf_model.config, 2))
    outputs = dict(zip([o.name for o in session(tmp_path).get_outputs()], session(tmp_path).run(None, feed)))
    expected = {
        "last_hidden_state": getattr(hf_out, "last_hidden_state", None),
        "logits": getattr(hf_out, "logits", None),
        "start_logits": getattr(hf_out, "start_logits", None),
        "end_logits": getattr(hf_out, "end_logits", None),
    }
    keep = mask.numpy().astype(bool)
    for name, value in outputs.items():
        if name.startswith("present"):
            continue
        ref = expected[name].numpy()
        if ref.shape[:2] == keep.shape:
            ref, value = ref[keep], value[keep]
        np.testing.assert_allclose(value, ref, atol=1e-4, rtol=1e-4)


def test_causal_lm_is_correct_at_every_length_up_to_max_positions(tmp_path):
    hf_model = tiny_hf_model("causal-lm", max_position_embeddings=48)
    export(from_transformers(hf_model), tmp_path, progress=False)
    sess = session(tmp_path)
    ids = torch.randint(3, 97, (1, 48), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        full = hf_model(ids).logits.numpy()
    for prompt in (1, 30):  # a one-token prefill, and a prompt of 7.5 windows; then decode to the end
        past = empty_past(hf_model.config, 1)
        logits, past = ort_step(sess, ids[:, :prompt].numpy(), np.ones((1, prompt), np.int64), past)
        np.testing.assert_allclose(logits, full[:, :prompt], atol=1e-4)
        for length in range(prompt + 1, 49):
            logits, past = ort_step(
                sess, ids[:, length - 1 : length].numpy(), np.ones((1, length), np.int64), past
            )
            np.testing.assert_allclose(logits[:, 0], full[:, length - 1], atol=1e-4)


def test_greedy_decoding_is_token_identical_to_transformers(tmp_path):
    hf_model = tiny_hf_model("causal-lm", max_position_embeddings=128)
    export(from_transformers(hf_model), tmp_path, progress=False)
    ids = torch.randint(3, 97, (2, 14), generator=torch.Generator().manual_seed(7))
    mask = torch.ones_like(ids)
    ids[1, :5], mask[1, :5] = 0, 0
    expected = hf_model.generate(
        ids, attention_mask=mask, max_new_tokens=50, do_sample=False, eos_token_id=None, pad_token_id=0
    )
    actual = ort_greedy(session(tmp_path), hf_model.config, ids.numpy(), mask.numpy(), 50)
    assert actual.tolist() == expected.tolist()


def test_portable_graph_uses_standard_ops_and_runs_in_reference_evaluator(tmp_path):
    from onnx.reference import ReferenceEvaluator

    hf_model = tiny_hf_model("causal-lm", hidden_size=16, num_heads=2)
    export(from_transformers(hf_model), tmp_path, progress=False)
    model = onnx.load(tmp_path / "onnx" / "model.onnx")
    onnx.checker.check_model(model, full_check=True)
    assert {node.domain for node in model.graph.node} == {""}
    assert [(o.domain, o.version) for o in model.opset_import] == [("", 17)]

    ids = np.array([[0, 0, 5, 6, 7, 8, 9, 10], [11, 12, 13, 14, 15, 16, 17, 18]], np.int64)
    mask = (ids != 0).astype(np.int64)
    sess, evaluator = session(tmp_path), ReferenceEvaluator(model)
    past = empty_past(hf_model.config, 2)
    for step_ids, step_mask in (
        (ids, mask),
        (ids[:, :1] + 20, np.concatenate([mask, np.ones((2, 1), np.int64)], 1)),
    ):
        pos = np.maximum(step_mask.cumsum(-1) - 1, 0)[:, -step_ids.shape[1] :]
        feed = {"input_ids": step_ids, "attention_mask": step_mask, "position_ids": pos, **past}
        ours = sess.run(None, feed)
        theirs = evaluator.run(None, feed)
        for a, b in zip(ours, theirs):
            np.testing.assert_allclose(a, b, atol=1e-5)
        names = [o.name for o in sess.get_outputs()]
        past = {
            n.replace("present", "past_key_values"): v for n, v in zip(names, ours) if n.startswith("present")
        }


def test_tied_embedding_is_stored_once(tmp_path):
    hf_model = tiny_hf_model("causal-lm", vocab_size=1000, hidden_size=64)
    export(from_transformers(hf_model), tmp_path, progress=False)
    model = onnx.load(tmp_path / "onnx" / "model.onnx")
    tables = [t.name for t in model.graph.initializer if sorted(t.dims) == [64, 1000]]
    assert tables == ["transformer.wte.weight"]
    weights = sum(p.numel() for p in hf_model.parameters()) * 4  # parameters() yields the tied table once
    assert (tmp_path / "onnx" / "model.onnx").stat().st_size < weights * 1.05


@pytest.mark.parametrize("optimize", [False, True])
def test_external_data_lm_head_reads_the_table_through_aliased_row_slices(tmp_path, monkeypatch, optimize):
    """The tied lm_head reads the embedding table through row slices that point at the table's own
    bytes: nothing is written twice, and the slices are exactly the table's rows."""
    from onnx.external_data_helper import load_external_data_for_model

    from gptneo_onnx.export import graphs

    monkeypatch.setattr(graphs, "LM_HEAD_SLICE_BYTES", 8192)  # 64 floats a row: 32-row slices
    hf_model = tiny_hf_model("causal-lm", vocab_size=300, hidden_size=64, num_heads=4)
    result = export(
        from_transformers(hf_model), tmp_path, external_data=True, optimize=optimize, progress=False
    )
    assert result.report["passed"]  # parity through the slices
    model = onnx.load(tmp_path / "onnx" / "model.onnx", load_external_data=False)
    slices = [t for t in model.graph.initializer if t.name.startswith("transformer.wte.weight.rows_")]
    assert len(slices) == 10 and [t.dims[0] for t in slices] == [32] * 9 + [12]
    stored = sum(p.numel() for p in hf_model.parameters()) * 4
    assert (tmp_path / "onnx" / "model.onnx.data").stat().st_size < stored + 4096 * len(
        model.graph.initializer
    )
    load_external_data_for_model(model, str(tmp_path / "onnx"))
    arrays = {t.name: onnx.numpy_helper.to_array(t) for t in model.graph.initializer}
    table = hf_model.transformer.wte.weight.detach().numpy()
    np.testing.assert_array_equal(np.concatenate([arrays[t.name] for t in slices]), table)
    assert {n.op_type for n in model.graph.node if set(n.input) & {t.name for t in slices}} == {"Gemm"}


def test_lm_head_is_one_gemm_without_external_data(tmp_path):
    export(from_transformers(tiny_hf_model("causal-lm")), tmp_path, validate=False, progress=False)
    gemms = [n for n in onnx.load(tmp_path / "onnx" / "model.onnx").graph.node if n.op_type == "Gemm"]
    assert [n.input[1] for n in gemms] == ["transformer.wte.weight"]


def test_external_data_export_loads_after_move_and_chdir(tmp_path, monkeypatch):
    hf_model = tiny_hf_model("causal-lm")
    result = export(from_transformers(hf_model), tmp_path / "first", external_data=True, progress=False)
    assert result.manifest["graph"]["external_data"][0]["file"] == "onnx/model.onnx.data"
    assert (tmp_path / "first" / "onnx" / "model.onnx.data").stat().st_size > (
        tmp_path / "first" / "onnx" / "model.onnx"
    ).stat().st_size
    moved = tmp_path / "elsewhere" / "moved"
    shutil.move(tmp_path / "first", moved)
    monkeypatch.chdir(tmp_path)
    os.makedirs("unrelated", exist_ok=True)
    monkeypatch.chdir("unrelated")
    ids = np.arange(3, 13, dtype=np.int64)[None]
    logits, _ = ort_step(session(moved), ids, np.ones_like(ids), empty_past(hf_model.config, 1))
    with torch.no_grad():
        expected = hf_model(torch.from_numpy(ids)).logits.numpy()
    np.testing.assert_allclose(logits, expected, atol=1e-4)


def test_float16_keeps_attention_in_float32_and_stays_finite_at_long_lengths(tmp_path):
    hf_model = tiny_hf_model("causal-lm", max_position_embeddings=512, window_size=256)
    with torch.no_grad():  # large query/key weights: unscaled fp16 scores would overflow 65504
        for block in hf_model.transformer.h:
            block.attn.attention.q_proj.weight.mul_(40)
            block.attn.attention.k_proj.weight.mul_(40)
    result = export(from_transformers(hf_model), tmp_path, precision="float16", progress=False)
    assert result.report["passed"] and result.report["top1_agreement"] >= 0.98
    model = onnx.load(tmp_path / "onnx" / "model_fp16.onnx")  # transformers.js's name (export/layout.py)
    assert all(o.type.tensor_type.elem_type == onnx.TensorProto.FLOAT for o in model.graph.output[:1])
    ids = torch.randint(3, 97, (1, 512), generator=torch.Generator().manual_seed(0))
    logits, _ = ort_step(
        session(tmp_path),
        ids.numpy(),
        np.ones((1, 512), np.int64),
        empty_past(hf_model.config, 1, np.float16),
    )
    assert np.isfinite(logits).all()
    with torch.no_grad():
        expected = hf_model(ids).logits.numpy()
    assert (logits.argmax(-1) == expected.argmax(-1)).mean() >= 0.98


def test_validation_catches_a_wrong_window(tmp_path, monkeypatch):
    original = export_layers.attention_bias
    monkeypatch.setattr(
        export_layers, "attention_bias", lambda g, mask, length, window: original(g, mask, length, None)
    )
    with pytest.raises(ParityError, match="does not match the reference"):
        export(from_transformers(tiny_hf_model("causal-lm")), tmp_path, progress=False)
    assert json.loads((tmp_path / "parity_report.json").read_text())["passed"] is False
    # kept for inspection, but the runtime won't run a model that failed validation
    assert json.loads((tmp_path / "gptneo_onnx.json").read_text())["validation"]["passed"] is False
    with pytest.raises(ExportFolderError, match="failed its parity validation"):
        Model.load(tmp_path)


def test_sidecar_describes_the_graph(tmp_path):
    hf_model = tiny_hf_model("causal-lm", num_layers=3, attention_types=[[["global", "local", "local"], 1]])
    result = export(from_transformers(hf_model), tmp_path, progress=False)
    manifest = json.loads((tmp_path / "gptneo_onnx.json").read_text())
    assert manifest == result.manifest
    graph = onnx.load(tmp_path / "onnx" / "model.onnx")
    listed = manifest["inputs"] + manifest["optional_inputs"]  # 1.2: inputs with a default value
    assert [i["name"] for i in listed] == [i.name for i in graph.graph.input]
    assert [o["name"] for o in manifest["outputs"]] == [o.name for o in graph.graph.output]
    assert [layer["window"] for layer in manifest["cache"]["layers"]] == [None, 4, 4]
    assert manifest["model"]["head_dim"] == 8 and manifest["special_tokens"]["eos_token_id"] == [2]
    assert manifest["validation"]["passed"] is True
    # format 1.1: graph names by role and the input rules, so no runtime has to assume them
    assert (manifest["format_version"], manifest["format_minor_version"]) == (1, 2)
    io = manifest["io"]
    names = {item["name"]: item for item in manifest["inputs"] + manifest["outputs"]}
    assert all(io[role] in names for role in ("input_ids", "attention_mask", "position_ids", "logits"))
    assert names[io["attention_mask"]]["shape"] == ["batch_size", "total_sequence_length"]
    assert (io["padding_side"], io["attention_mask_columns"], io["position_ids_rule"]) == (
        "left", "past_and_new", "cumsum_minus_one",
    )  # fmt: skip
    from gptneo_onnx.contract import sha256_of

    assert manifest["graph"]["sha256"] == sha256_of(tmp_path / "onnx" / "model.onnx")


def test_export_loads_in_optimum_and_generates_the_same_tokens(tmp_path):
    optimum_ort = pytest.importorskip("optimum.onnxruntime")
    hf_model = tiny_hf_model("causal-lm", max_position_embeddings=128)
    export(from_transformers(hf_model), tmp_path, progress=False)
    optimum_model = optimum_ort.ORTModelForCausalLM.from_pretrained(tmp_path)
    ids = torch.randint(3, 97, (2, 14), generator=torch.Generator().manual_seed(7))
    mask = torch.ones_like(ids)
    ids[1, :5], mask[1, :5] = 0, 0
    settings = dict(
        attention_mask=mask, max_new_tokens=40, do_sample=False, eos_token_id=None, pad_token_id=0
    )
    assert optimum_model.generate(ids, **settings).tolist() == hf_model.generate(ids, **settings).tolist()


def test_the_float64_truth_leaves_the_model_unchanged(tmp_path):
    """Validation runs the reference in float64 one layer at a time, without a copy, whatever the
    model's size: the model's weights and dtypes are exactly as before."""
    model = from_transformers(tiny_hf_model("causal-lm"))
    before = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    result = export(model, tmp_path, progress=False)
    assert result.report["reference_precision"] == "float64"
    assert result.report["rounding_precision"] == "float32"
    for name, tensor in model.state_dict().items():
        assert tensor.dtype == torch.float32 and torch.equal(tensor, before[name]), name
    assert model.lm_head.weight is model.transformer.wte.weight


def test_portable_windowed_local_cache_validates_and_runs_in_reference_evaluator(tmp_path):
    """`windowed_local_cache=True` on a portable export: standard ops only, parity (validation cuts
    local caches to window - 1 rows), and the ONNX reference evaluator agrees on a step whose local
    layers hold only the newest rows."""
    from onnx.reference import ReferenceEvaluator

    hf_model = tiny_hf_model("causal-lm", hidden_size=16, num_heads=2)  # window 4
    result = export(from_transformers(hf_model), tmp_path, progress=False, windowed_local_cache=True)
    assert result.report["passed"] and result.manifest["format_version"] == 2
    assert result.manifest["cache"]["local_window"] == {
        "input": "local_attention_mask",
        "window": 4,
        "min_rows": 3,
    }
    model = onnx.load(tmp_path / "onnx" / "model.onnx")
    assert {node.domain for node in model.graph.node} == {""}
    ids = np.array([[0, 0, 5, 6, 7, 8, 9, 10], [11, 12, 13, 14, 15, 16, 17, 18]], np.int64)
    mask = (ids != 0).astype(np.int64)
    _, past = ort_step(session(tmp_path), ids, mask, empty_past(hf_model.config, 2), mask)
    local = {name for name in past if int(name.split(".")[1]) % 2 == 1}  # layers alternate global, local
    past = {name: value[:, :, -3:] if name in local else value for name, value in past.items()}
    step_mask = np.concatenate([mask, np.ones((2, 1), np.int64)], 1)
    feed = {
        "input_ids": np.array([[20], [21]]),
        "attention_mask": step_mask,
        "local_attention_mask": step_mask[:, -4:],  # the 3 kept rows + the new token
        "position_ids": np.maximum(step_mask.cumsum(-1) - 1, 0)[:, -1:],
        **past,
    }
    ours, theirs = session(tmp_path).run(None, feed), ReferenceEvaluator(model).run(None, feed)
    for a, b in zip(ours, theirs, strict=True):
        np.testing.assert_allclose(a, b, atol=1e-5)
    with torch.no_grad():  # and both give transformers' logits for the new token
        full = torch.from_numpy(np.concatenate([ids, feed["input_ids"]], 1))
        positions = torch.from_numpy(np.maximum(step_mask.cumsum(-1) - 1, 0))
        expected = hf_model(full, attention_mask=torch.from_numpy(step_mask), position_ids=positions).logits
    np.testing.assert_allclose(ours[0][:, -1], expected[:, -1].numpy(), atol=1e-4)
