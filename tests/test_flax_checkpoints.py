"""Flax checkpoints (`flax_model.msgpack`) read with msgpack and numpy, checked against transformers'
Flax models (jax and flax come with the dev extra; the reader itself never imports them)."""

from __future__ import annotations

import json

import msgpack
import numpy as np
import onnx
import pytest
import torch
from conftest import tiny_hf_model

from gptneo_onnx.cli import main
from gptneo_onnx.errors import CheckpointError
from gptneo_onnx.reference import from_pretrained
from gptneo_onnx.reference import loading as reference_loading

transformers = pytest.importorskip("transformers")
pytest.importorskip("flax")


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """A PyTorch checkpoint and transformers' own Flax conversions of it (causal LM and base model)."""
    root = tmp_path_factory.mktemp("flax")
    tiny_hf_model("causal-lm").save_pretrained(root / "pytorch")
    flax_models = {}
    for task, cls in (("causal-lm", "FlaxGPTNeoForCausalLM"), ("base", "FlaxGPTNeoModel")):
        flax_models[task] = getattr(transformers, cls).from_pretrained(root / "pytorch", from_pt=True)
        flax_models[task].save_pretrained(root / task)
        assert sorted(
            p.name for p in (root / task).iterdir() if "weights" in p.name or "model" in p.name
        ) == ["flax_model.msgpack"]
    return root, flax_models


def _batch():
    """Two rows of 20 tokens (window 4), the second left-padded by 5."""
    ids = np.random.default_rng(0).integers(3, 97, (2, 20))
    mask = np.ones_like(ids)
    mask[1, :5] = 0
    return ids, mask, np.maximum(mask.cumsum(-1) - 1, 0)


@pytest.mark.parametrize("task", ["causal-lm", "base"])
def test_flax_checkpoint_matches_transformers_flax_model(checkpoints, task):
    root, flax_models = checkpoints
    ids, mask, positions = _batch()
    theirs = flax_models[task](ids, attention_mask=mask, position_ids=positions)
    theirs = np.asarray(theirs.logits if task == "causal-lm" else theirs.last_hidden_state)
    model = from_pretrained(root / task, task=task)
    with torch.no_grad():
        ours = model(torch.from_numpy(ids), torch.from_numpy(mask))
    ours = (ours[0] if isinstance(ours, tuple) else ours).numpy()
    keep = mask.astype(bool)
    np.testing.assert_allclose(ours[keep], theirs[keep], atol=1e-5, rtol=1e-5)


def test_flax_export_has_the_initializers_of_the_pytorch_export(checkpoints, tmp_path, capsys):
    root, _ = checkpoints
    graphs = {}
    for source in ("pytorch", "causal-lm"):
        output = tmp_path / source
        assert main(["export", "--model", str(root / source), "--output", str(output), "--json"]) == 0
        assert json.loads(capsys.readouterr().out)["report"]["passed"]
        graph = onnx.load(output / "model.onnx").graph
        graphs[source] = {init.name: onnx.numpy_helper.to_array(init) for init in graph.initializer}
    assert graphs["pytorch"].keys() == graphs["causal-lm"].keys()
    for name, values in graphs["pytorch"].items():
        np.testing.assert_array_equal(graphs["causal-lm"][name], values, err_msg=name)


def _tree(folder):
    return msgpack.unpackb((folder / "flax_model.msgpack").read_bytes(), raw=False)  # ExtTypes kept as is


def _write(folder, tree):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "flax_model.msgpack").write_bytes(msgpack.packb(tree, use_bin_type=True))


def _array(values: np.ndarray, dtype_name: str | None = None) -> msgpack.ExtType:
    payload = (values.shape, dtype_name or values.dtype.name, values.tobytes("C"))
    return msgpack.ExtType(1, msgpack.packb(payload, use_bin_type=True))


def _copy(checkpoints, tmp_path, edit):
    """The Flax causal-LM checkpoint with its tree edited, in a new folder."""
    root, _ = checkpoints
    tree = _tree(root / "causal-lm")
    edit(tree)
    folder = tmp_path / "edited"
    _write(folder, tree)
    (folder / "config.json").write_text((root / "causal-lm" / "config.json").read_text())
    return folder


def _unpack(ext: msgpack.ExtType) -> np.ndarray:
    shape, dtype, raw = msgpack.unpackb(ext.data, raw=False)
    return np.frombuffer(raw, dtype=dtype).reshape(shape)


def test_half_precision_and_chunked_arrays_load(checkpoints, tmp_path):
    root, _ = checkpoints
    reference = from_pretrained(root / "pytorch")
    wte = reference.transformer.wte.weight.detach()

    def edit(tree):
        h0 = tree["transformer"]["h"]["0"]
        kernel = _unpack(h0["mlp"]["c_fc"]["kernel"])
        bf16 = (torch.from_numpy(kernel.copy()).to(torch.bfloat16).view(torch.int16).numpy()).view(np.uint16)
        h0["mlp"]["c_fc"]["kernel"] = _array(bf16, "bfloat16")
        h0["ln_1"]["scale"] = _array(_unpack(h0["ln_1"]["scale"]).astype(np.float16))
        flat = wte.numpy().reshape(-1)  # as flax chunks arrays over 2^30 bytes: flat C-order pieces
        tree["transformer"]["wte"]["embedding"] = {
            "__msgpack_chunked_array__": True,
            "shape": {str(i): size for i, size in enumerate(wte.shape)},
            "chunks": {str(i): _array(piece) for i, piece in enumerate(np.array_split(flat, 3))},
        }

    model = from_pretrained(_copy(checkpoints, tmp_path, edit))
    block, expected = model.transformer.h[0], reference.transformer.h[0]
    torch.testing.assert_close(block.mlp.c_fc.weight, expected.mlp.c_fc.weight.to(torch.bfloat16).float())
    torch.testing.assert_close(block.ln_1.weight, expected.ln_1.weight.half().float())
    torch.testing.assert_close(model.transformer.wte.weight, wte, rtol=0, atol=0)


def _delete(path):
    def edit(tree):
        *parents, leaf = path.split("/")
        node = tree
        for key in parents:
            node = node[key]
        del node[leaf]

    return edit


def _add(path, values=None):
    values = np.ones(32, np.float32) if values is None else values

    def edit(tree):
        *parents, leaf = path.split("/")
        node = tree
        for key in parents:
            node = node.setdefault(key, {})
        node[leaf] = _array(values)

    return edit


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (_delete("transformer/h/1/mlp/c_fc/bias"), r"lacks 1 tensor.*transformer\.h\.1\.mlp\.c_fc\.bias"),
        (_add("transformer/h/1/mlp/extra/bias"), r"unexpected tensor 'transformer\.h\.1\.mlp\.extra\.bias'"),
        (_add("transformer/ln_f/running_mean"), r"parameter 'transformer/ln_f/running_mean'.*GPT-Neo"),
        (_add("transformer/ln_f/bias", np.ones(31, np.float32)), r"shape \(31,\)"),
        (_add("transformer/h/0/ln_1/scale", np.full(32, np.nan, np.float32)), r"ln_1\.weight' holds NaN"),
    ],
    ids=["missing", "extra", "unknown-leaf", "wrong-shape", "nan"],
)
def test_parameters_map_strictly(checkpoints, tmp_path, edit, message):
    with pytest.raises(CheckpointError, match=message):
        from_pretrained(_copy(checkpoints, tmp_path, edit))


def test_malformed_files_are_named_checkpoint_errors(checkpoints, tmp_path):
    root, _ = checkpoints
    data = (root / "causal-lm" / "flax_model.msgpack").read_bytes()
    config = (root / "causal-lm" / "config.json").read_text()
    cases = {
        "truncated": (data[: len(data) // 2], "truncated or corrupt"),
        "garbage": (b"\xc1" + data[1:], "truncated or corrupt"),
        "unknown-ext": (msgpack.packb({"transformer": msgpack.ExtType(7, b"x")}), "extension of type 7"),
        "short-array": (
            msgpack.packb(
                {"wte": {"embedding": msgpack.ExtType(1, msgpack.packb(((97, 32), "float32", b"x")))}}
            ),
            "truncated or corrupt",
        ),
        "string-dtype": (
            msgpack.packb({"wte": {"embedding": _array(np.array(["a"]))}}),
            "dtype '<U1'|dtype 'str",
        ),
        "not-a-map": (msgpack.packb([1, 2, 3]), "parameter tree"),
    }
    for name, (content, message) in cases.items():
        folder = tmp_path / name
        folder.mkdir()
        (folder / "config.json").write_text(config)
        (folder / "flax_model.msgpack").write_bytes(content)
        with pytest.raises(CheckpointError, match=message) as caught:
            from_pretrained(folder)
        assert "flax_model.msgpack" in str(caught.value), name


def test_hub_download_fetches_flax_weights_only_when_alone(monkeypatch, tmp_path):
    import huggingface_hub

    fetched = {}

    def snapshot_download(repo_id, revision=None, allow_patterns=None):
        fetched[repo_id] = allow_patterns
        return str(tmp_path)

    listings = {
        "org/flax-only": ["config.json", "flax_model.msgpack"],
        "org/with-bin": ["config.json", "flax_model.msgpack", "pytorch_model.bin"],
        "org/with-safetensors": ["config.json", "flax_model.msgpack", "model.safetensors"],
    }
    monkeypatch.setattr(huggingface_hub, "list_repo_files", lambda repo_id, revision=None: listings[repo_id])
    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    for repo_id in listings:
        reference_loading.resolve_checkpoint(repo_id)
    assert "*.msgpack" in fetched["org/flax-only"] and "*.bin" not in fetched["org/flax-only"]
    assert "*.bin" in fetched["org/with-bin"] and "*.msgpack" not in fetched["org/with-bin"]
    assert not {"*.bin", "*.msgpack"} & set(fetched["org/with-safetensors"])


def test_the_reader_needs_no_jax(checkpoints):
    """Loaded in a process where importing jax or flax fails."""
    import subprocess
    import sys

    root, _ = checkpoints
    code = (
        "import sys; sys.modules.update(jax=None, flax=None, jaxlib=None); "
        "from gptneo_onnx.reference import from_pretrained; "
        f"print(from_pretrained({str(root / 'causal-lm')!r}).transformer.ln_f.weight.sum().item())"
    )
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout
    expected = from_pretrained(root / "pytorch").transformer.ln_f.weight.sum().item()
    assert float(out) == pytest.approx(expected)
