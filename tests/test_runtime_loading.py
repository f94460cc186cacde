"""Loading an export: manifest checks, hashes, links, providers, and the thin import."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import onnxruntime as ort
import pytest
from runtime_helpers import export_tiny

from gptneo_onnx.runtime import CausalLM, ExportFolderError, Model, ProviderError, SequenceClassifier
from gptneo_onnx.runtime.providers import ProviderOptions, provider_list, resolve_provider


@pytest.fixture(scope="module")
def export_dir(tmp_path_factory):
    return export_tiny("causal-lm", tmp_path_factory.mktemp("export") / "clm")[1]


@pytest.fixture
def copy(export_dir, tmp_path):
    """A writable copy of the export, to damage."""
    target = tmp_path / "copy"
    shutil.copytree(export_dir, target)
    return target


def edit_manifest(folder, change):
    path = folder / "gptneo_onnx.json"
    manifest = json.loads(path.read_text())
    change(manifest)
    path.write_text(json.dumps(manifest))


def test_thin_import_pulls_no_torch_transformers_or_optimum():
    code = (
        "import sys, gptneo_onnx.runtime, gptneo_onnx.cli\n"
        "gptneo_onnx.cli.build_parser()\n"
        "heavy = [m for m in ('torch', 'transformers', 'optimum', 'onnx') if m in sys.modules]\n"
        "assert not heavy, heavy\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_load_reports_the_provider_and_task(export_dir):
    model = Model.load(export_dir)
    assert isinstance(model, CausalLM)
    assert (
        model.provider == "cpu" == model.session.get_providers()[0].removesuffix("ExecutionProvider").lower()
    )
    assert model.manifest.task == "causal-lm" and model.tokenizer is None


def test_missing_folder_and_manifest(tmp_path):
    with pytest.raises(ExportFolderError, match="does not exist"):
        Model.load(tmp_path / "nowhere")
    with pytest.raises(ExportFolderError, match="gptneo_onnx.json"):
        Model.load(tmp_path)


def test_missing_graph_file(copy):
    (copy / "model.onnx").unlink()
    with pytest.raises(ExportFolderError, match="missing model.onnx"):
        Model.load(copy)


def flip_byte(path, position):
    data = bytearray(path.read_bytes())
    data[position] ^= 0xFF
    path.write_bytes(bytes(data))


def test_tampered_graph_fails_the_hash(copy):
    flip_byte(copy / "model.onnx", (copy / "model.onnx").stat().st_size // 2)  # inside the weights
    with pytest.raises(ExportFolderError, match="model.onnx does not match the sha256"):
        Model.load(copy)


@pytest.mark.parametrize("verify_hashes", [True, False])
def test_a_truncated_or_grown_graph_is_refused_even_without_hashes(copy, verify_hashes):
    graph = copy / "model.onnx"
    size = graph.stat().st_size
    with graph.open("ab") as handle:
        handle.write(b"\0")
    with pytest.raises(ExportFolderError, match=f"has {size + 1} bytes, the manifest records {size}"):
        Model.load(copy, verify_hashes=verify_hashes)
    graph.write_bytes(graph.read_bytes()[:1000])
    with pytest.raises(ExportFolderError, match="incomplete or was changed"):
        Model.load(copy, verify_hashes=verify_hashes)


def test_unknown_format_version(copy):
    edit_manifest(copy, lambda m: m.update(format_version=99))
    with pytest.raises(ExportFolderError, match="format_version 99"):
        Model.load(copy)


def test_format_1_0_manifest_without_io_roles_still_runs(copy, export_dir):
    """1.1 only added fields (`io`, tokenizer flags): a 1.0 reader's view of the folder still runs."""
    expected = CausalLM.load(export_dir).generate([[5, 6, 7]], max_new_tokens=4).sequences
    edit_manifest(copy, lambda m: (m.pop("io"), m.pop("format_minor_version")))
    assert CausalLM.load(copy).generate([[5, 6, 7]], max_new_tokens=4).sequences == expected


def test_io_roles_name_the_graph_tensors(copy):
    """The runtime feeds the names the manifest's `io` gives, so a wrong role name is noticed."""
    edit_manifest(copy, lambda m: m["io"].update(input_ids="tokens"))
    with pytest.raises(Exception, match="tokens"):
        CausalLM.load(copy).generate([[5, 6, 7]], max_new_tokens=2)


def test_missing_required_field(copy):
    edit_manifest(copy, lambda m: m.pop("special_tokens"))
    with pytest.raises(ExportFolderError, match="special_tokens"):
        Model.load(copy)


def test_task_mismatch(export_dir):
    with pytest.raises(ExportFolderError, match="'causal-lm' export, not a 'sequence-classification' one"):
        SequenceClassifier.load(export_dir)


def test_graph_that_does_not_match_the_manifest(copy):
    edit_manifest(copy, lambda m: m["outputs"].append({"name": "extra", "dtype": "float32", "shape": []}))
    with pytest.raises(ExportFolderError, match="missing outputs \\['extra'\\]"):
        Model.load(copy)


@pytest.mark.parametrize("name", ["/etc/passwd", "../outside.onnx", "sub/../../x.onnx"])
def test_file_names_that_escape_the_folder(copy, name):
    edit_manifest(copy, lambda m: m["graph"].update(file=name))
    with pytest.raises(ExportFolderError, match="outside the export folder"):
        Model.load(copy)


@pytest.mark.skipif(not hasattr(os, "symlink"), reason="no symlinks here")
def test_linked_files_are_refused(copy, tmp_path):
    outside = tmp_path / "outside.onnx"
    (copy / "model.onnx").rename(outside)
    (copy / "model.onnx").symlink_to(outside)
    with pytest.raises(ExportFolderError, match="is a link"):
        Model.load(copy)


def test_unknown_provider_lists_the_available_ones():
    with pytest.raises(ProviderError, match="unknown provider 'rocm'.*Available here: cpu"):
        resolve_provider("rocm")


@pytest.mark.skipif("CUDAExecutionProvider" in ort.get_available_providers(), reason="CUDA is available")
def test_unavailable_provider_lists_the_available_ones(export_dir):
    with pytest.raises(ProviderError, match="'cuda'.*not available.*available: cpu"):
        Model.load(export_dir, provider="cuda")


def test_auto_prefers_tensorrt_then_cuda_then_cpu(monkeypatch):
    monkeypatch.setattr(ort, "get_available_providers", lambda: ["CPUExecutionProvider"])
    assert resolve_provider("auto") == "cpu"
    offered = ["CUDAExecutionProvider", "CPUExecutionProvider"]
    monkeypatch.setattr(ort, "get_available_providers", lambda: offered)
    assert resolve_provider("auto") == "cuda"
    monkeypatch.setattr(ort, "get_available_providers", lambda: ["TensorrtExecutionProvider", *offered])
    assert resolve_provider("AUTO") == "tensorrt"


def test_provider_options(tmp_path):
    options = ProviderOptions(
        provider="tensorrt", device_id=1, trt_fp16=True, trt_engine_cache_dir=tmp_path / "e"
    )
    trt, cuda, cpu = provider_list("tensorrt", options)
    assert trt == (
        "TensorrtExecutionProvider",
        {
            "device_id": 1,
            "trt_fp16_enable": True,
            "trt_engine_cache_enable": True,
            "trt_engine_cache_path": str(tmp_path / "e"),
        },
    )
    # TF32 stays off unless asked: fp32 exports promise fp32 parity on CUDA too.
    assert cuda == ("CUDAExecutionProvider", {"device_id": 1, "use_tf32": "0"})
    assert cpu[0] == "CPUExecutionProvider"
    assert provider_list("cuda", ProviderOptions(cuda_tf32=True))[0][1]["use_tf32"] == "1"


def test_session_options(export_dir):
    model = Model.load(export_dir, intra_op_threads=1, graph_optimization_level="basic")
    assert model.session.get_session_options().intra_op_num_threads == 1
    with pytest.raises(ProviderError, match="graph_optimization_level"):
        Model.load(export_dir, graph_optimization_level="max")
