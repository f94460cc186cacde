"""Crafted bad exports: the runtime refuses each before onnxruntime opens the graph.

Each test damages a copy of a good export the way an attacker or an accident would, and
"reseals" the sidecar (new sizes and sha256) where an attacker would rewrite it too, so that the
defense under test is the only one left standing.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil

import onnx
import pytest
from onnx import helper
from runtime_helpers import export_tiny, train_tokenizer

from gptneo_onnx.runtime import ExportFolderError, Model
from gptneo_onnx.runtime import model as runtime_model


@pytest.fixture
def copy(external_export, tmp_path):
    target = tmp_path / "export"
    shutil.copytree(external_export, target)
    return target


@pytest.fixture
def no_session(monkeypatch):
    """Fail the test if onnxruntime is ever asked to open the graph."""

    def refuse(*args, **kwargs):
        raise AssertionError("the graph reached onnxruntime")

    monkeypatch.setattr(runtime_model, "create_session", refuse)


def edit_manifest(folder, change):
    path = folder / "gptneo_onnx.json"
    manifest = json.loads(path.read_text())
    change(manifest)
    path.write_text(json.dumps(manifest))


def reseal(folder):
    """Record the files' current sizes and sha256 in the sidecar, as an attacker would."""

    def update(manifest):
        entries = [manifest["graph"], *manifest["graph"]["external_data"], manifest["tokenizer"]]
        for entry in entries:
            data = (folder / entry["file"]).read_bytes()
            entry.update(sha256=hashlib.sha256(data).hexdigest(), bytes=len(data))

    edit_manifest(folder, update)


def rewrite_graph(folder, change):
    graph_path = folder / "onnx" / "model.onnx"
    model = onnx.load(str(graph_path), load_external_data=False)
    change(model)
    graph_path.write_bytes(model.SerializeToString())
    reseal(folder)


def set_locations(location):
    def change(model):
        for tensor in model.graph.initializer:
            for entry in tensor.external_data:
                if entry.key == "location":
                    entry.value = location

    return change


def test_the_untouched_export_loads(copy):
    assert Model.load(copy).generate([5, 6, 7], max_new_tokens=2).sequences[0]


@pytest.mark.parametrize("kind", ["absolute", "dot-dot", "nested-dot-dot", "backslash-dot-dot"])
@pytest.mark.parametrize("verify_hashes", [True, False])
def test_external_data_locations_that_leave_the_folder(copy, tmp_path, no_session, kind, verify_hashes):
    outside = tmp_path / "outside"
    outside.mkdir()
    shutil.copyfile(
        copy / "onnx" / "model.onnx.data", outside / "model.onnx.data"
    )  # what the graph would read
    location = {
        "absolute": str(outside / "model.onnx.data"),
        "dot-dot": "../outside/model.onnx.data",
        "nested-dot-dot": "sub/../../outside/model.onnx.data",
        "backslash-dot-dot": "..\\outside\\model.onnx.data",
    }[kind]
    rewrite_graph(copy, set_locations(location))
    with pytest.raises(ExportFolderError, match="external data names .* outside the export folder"):
        Model.load(copy, verify_hashes=verify_hashes)


def test_external_data_read_through_a_link_leaving_the_folder(copy, tmp_path, no_session):
    outside = tmp_path / "elsewhere.data"
    shutil.move(copy / "onnx" / "model.onnx.data", outside)
    (copy / "onnx" / "model.onnx.data").symlink_to(outside)  # same bytes: size and sha256 still match
    with pytest.raises(ExportFolderError, match="model.onnx.data in .* is a link"):
        Model.load(copy)
    (copy / "onnx" / "model.onnx.data").unlink()
    shutil.copyfile(outside, copy / "onnx" / "model.onnx.data")
    (copy / "onnx" / "linked.data").symlink_to(outside)  # a second, unlisted location that is a link
    rewrite_graph(copy, set_locations("linked.data"))
    with pytest.raises(ExportFolderError, match="linked.data in .* is a link"):
        Model.load(copy, verify_hashes=False)


def test_external_data_file_the_sidecar_does_not_list(copy, no_session):
    shutil.copyfile(copy / "onnx" / "model.onnx.data", copy / "onnx" / "other.data")  # inside, a regular file
    rewrite_graph(copy, set_locations("other.data"))
    with pytest.raises(ExportFolderError, match="reads external data from 'other.data', which the manifest"):
        Model.load(copy)


def test_sidecar_listing_a_file_outside_the_folder(copy, tmp_path, no_session):
    shutil.copyfile(copy / "onnx" / "model.onnx.data", tmp_path / "model.onnx.data")
    edit_manifest(copy, lambda m: m["graph"]["external_data"][0].update(file="../model.onnx.data"))
    with pytest.raises(
        ExportFolderError, match="the manifest names '../model.onnx.data', which points outside"
    ):
        Model.load(copy)


def test_tampered_external_data(copy):
    data = bytearray((copy / "onnx" / "model.onnx.data").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (copy / "onnx" / "model.onnx.data").write_bytes(bytes(data))
    with pytest.raises(ExportFolderError, match="model.onnx.data does not match the sha256"):
        Model.load(copy)


def test_truncated_external_data_is_refused_without_hashes(copy, no_session):
    data = (copy / "onnx" / "model.onnx.data").read_bytes()
    (copy / "onnx" / "model.onnx.data").write_bytes(data[: len(data) // 2])  # an interrupted copy
    with pytest.raises(ExportFolderError, match="model.onnx.data in .* has .* bytes, the manifest records"):
        Model.load(copy, verify_hashes=False)


def add_contrib_node(op_type="Gelu", **attributes):
    def change(model):
        model.opset_import.append(helper.make_opsetid("com.microsoft", 1))
        model.graph.node.append(
            helper.make_node(op_type, ["logits"], ["extra"], domain="com.microsoft", **attributes)
        )
        model.graph.output.append(helper.make_tensor_value_info("extra", onnx.TensorProto.FLOAT, None))

    return change


def test_operator_domain_the_sidecar_does_not_declare(copy, no_session):
    assert json.loads((copy / "gptneo_onnx.json").read_text())["graph"]["op_domains"] == ["ai.onnx"]
    rewrite_graph(copy, add_contrib_node())  # onnxruntime would run it: com.microsoft Gelu exists
    with pytest.raises(ExportFolderError, match="uses operator domain.*com.microsoft, which the manifest"):
        Model.load(copy, verify_hashes=False)


def test_operator_domain_this_runtime_does_not_run(copy, no_session):
    def change(model):
        model.opset_import.append(helper.make_opsetid("ai.onnx.ml", 3))

    rewrite_graph(copy, change)
    edit_manifest(copy, lambda m: m["graph"].update(op_domains=["ai.onnx", "ai.onnx.ml"]))
    with pytest.raises(
        ExportFolderError, match="declares operator domain.*ai.onnx.ml; this runtime runs only"
    ):
        Model.load(copy)


def test_nodes_that_load_files_named_in_the_graph_are_refused(copy, no_session):
    rewrite_graph(copy, add_contrib_node("EPContext", embed_mode=0, ep_cache_context="../../engine"))
    edit_manifest(copy, lambda m: m["graph"].update(op_domains=["ai.onnx", "com.microsoft"]))
    with pytest.raises(ExportFolderError, match="EPContext node"):
        Model.load(copy)


def test_a_graph_that_is_not_an_onnx_file(copy, no_session):
    (copy / "onnx" / "model.onnx").write_bytes(b"\x0a\xff\xff\xff\xff\x0f not protobuf")
    reseal(copy)
    with pytest.raises(ExportFolderError, match="model.onnx is not a valid ONNX file"):
        Model.load(copy)


def test_a_tokenizer_that_does_not_fit_the_model(copy, tmp_path):
    train_tokenizer(tmp_path / "bigger.json", vocab_size=400)
    shutil.copyfile(tmp_path / "bigger.json", copy / "tokenizer.json")
    reseal(copy)
    with pytest.raises(
        ExportFolderError, match="does not fit the model: token .* has id 3\\d\\d, .*vocab_size is 320"
    ):
        Model.load(copy)


def test_the_exporter_refuses_a_tokenizer_that_does_not_fit(tmp_path):
    from gptneo_onnx.errors import CheckpointError

    train_tokenizer(tmp_path / "tokenizer.json")  # 320 tokens, the model below has 97
    with pytest.raises(CheckpointError, match="has token id 3\\d\\d, but the model's vocab_size is 97"):
        export_tiny("causal-lm", tmp_path / "export", tmp_path / "tokenizer.json")
    assert not (tmp_path / "export").exists()


def test_special_tokens_outside_the_vocabulary(copy, no_session):
    edit_manifest(copy, lambda m: m["special_tokens"].update(eos_token_id=[2, 320]))
    with pytest.raises(ExportFolderError, match="special_tokens.eos_token_id 320 is not a token id"):
        Model.load(copy)


def test_a_vocab_size_that_is_not_the_graphs(copy):
    edit_manifest(copy, lambda m: m["model"].update(vocab_size=400))
    with pytest.raises(ExportFolderError, match="320 logits per token but the manifest's vocab_size is 400"):
        Model.load(copy)


def dotted(path):
    """("cache", "layers", 1, "past_key") -> "cache.layers[1].past_key", as the errors name fields."""
    return "".join(f"[{key}]" if isinstance(key, int) else f".{key}" for key in path).lstrip(".")


@pytest.mark.parametrize(
    "path",
    [
        ("format_version",),
        ("special_tokens",),
        ("graph", "sha256"),
        ("graph", "bytes"),
        ("graph", "external_data"),
        ("graph", "op_domains"),
        ("graph", "external_data", 0, "sha256"),
        ("inputs", 1, "name"),
        ("model", "vocab_size"),
        ("tokenizer", "bytes"),
        ("cache", "layers", 1, "present_value"),
    ],
    ids=dotted,
)
def test_a_missing_field_is_named(copy, no_session, path):
    def remove(manifest):
        item = manifest
        for key in path[:-1]:
            item = item[key]
        del item[path[-1]]

    edit_manifest(copy, remove)
    with pytest.raises(ExportFolderError, match=re.escape(f"lacks the required field `{dotted(path)}`")):
        Model.load(copy)


@pytest.mark.parametrize(
    ("path", "value", "message"),
    [
        (("format_version",), 3, "format_version 3; this runtime reads versions 1, 2"),
        (("format_version",), "1", "`format_version` must be a JSON integer"),
        (("graph", "bytes"), True, "`graph.bytes` must be a JSON integer"),
        (("graph", "op_domains"), "ai.onnx", "`graph.op_domains` must be a JSON array"),
        (("model", "num_heads"), 0, "model.num_heads must be >= 1"),
        (("format",), "other", "format 'other'"),
    ],
)
def test_unknown_versions_and_wrong_types_are_refused(copy, no_session, path, value, message):
    def change(manifest):
        item = manifest
        for key in path[:-1]:
            item = item[key]
        item[path[-1]] = value

    edit_manifest(copy, change)
    with pytest.raises(ExportFolderError, match=message):
        Model.load(copy)


@pytest.mark.skipif(not hasattr(os, "symlink"), reason="no symlinks here")
def test_a_linked_sidecar_is_refused(copy, tmp_path, no_session):
    shutil.move(copy / "gptneo_onnx.json", tmp_path / "sidecar.json")
    (copy / "gptneo_onnx.json").symlink_to(tmp_path / "sidecar.json")
    with pytest.raises(ExportFolderError, match="gptneo_onnx.json is a link"):
        Model.load(copy)


@pytest.fixture(scope="module")
def windowed_export(tmp_path_factory):
    """An optimized export: its local layers take their own mask (format 2, `cache.local_window`)."""
    folder = tmp_path_factory.mktemp("windowed") / "export"
    export_tiny("causal-lm", folder, export_options={"optimize": True, "validate": False}, vocab_size=320)
    return folder


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda local: local.pop("min_rows"), "lacks the required field `cache.local_window.min_rows`"),
        (lambda local: local.update(input="mask2"), "'mask2' is not a graph input"),
        (lambda local: local.update(min_rows=2), "min_rows >= window - 1"),
        (lambda local: local.update(window=0), "window >= 1"),
    ],
)
def test_a_bad_local_window_is_refused(windowed_export, tmp_path, no_session, change, message):
    target = tmp_path / "export"
    shutil.copytree(windowed_export, target)
    manifest = json.loads((target / "gptneo_onnx.json").read_text())
    assert manifest["format_version"] == 2 and manifest["cache"]["local_window"]["window"] == 4
    edit_manifest(target, lambda m: change(m["cache"]["local_window"]))
    with pytest.raises(ExportFolderError, match=re.escape(message)):
        Model.load(target)
