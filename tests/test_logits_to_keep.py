"""`num_logits_to_keep`: the lm_head on the last positions only, checked against the full graph
and transformers, in both flavors, with a windowed local cache and a left-padded batch."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import tiny_hf_model

from gptneo_onnx.export import export
from gptneo_onnx.reference import from_transformers

ort = pytest.importorskip("onnxruntime")

FLAVORS = {
    "portable": {},
    "portable-windowed": {"windowed_local_cache": True},
    "optimized": {"optimize": True},
}


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    hf_model = tiny_hf_model("causal-lm")
    folder = tmp_path_factory.mktemp("keep")
    for name, options in FLAVORS.items():
        export(from_transformers(hf_model), folder / name, progress=False, validate=False, **options)
    return hf_model, folder


def batch() -> tuple[np.ndarray, np.ndarray]:
    ids = np.random.default_rng(11).integers(3, 97, size=(2, 12))
    mask = np.ones_like(ids)
    ids[1, :4], mask[1, :4] = 0, 0  # left padding
    return ids, mask


def hf_logits(hf_model, ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
    positions = torch.from_numpy(np.maximum(mask.cumsum(1) - 1, 0))  # left padding: from the mask
    with torch.no_grad():
        return hf_model(
            torch.from_numpy(ids), attention_mask=torch.from_numpy(mask), position_ids=positions
        ).logits.numpy()


@pytest.mark.parametrize("flavor", FLAVORS)
def test_last_positions_equal_the_full_graph_and_transformers(exports, flavor):
    from gptneo_onnx.runtime import CausalLM

    hf_model, folder = exports
    ids, mask = batch()
    expected = hf_logits(hf_model, ids, mask)
    modes = ["concat", "shared-buffer"] if flavor == "optimized" else ["concat"]
    for mode in modes:
        model = CausalLM.load(folder / flavor, provider="cpu", cache_mode=mode)
        # prefill of 7 tokens (batch 2), then a 1-token step and, row by row, a 4-token step on a past
        full, past_full = model.forward(ids[:, :7], mask[:, :7])
        last, past_last = model.forward(ids[:, :7], mask[:, :7], num_logits_to_keep=1)
        assert full.shape == (2, 7, 97) and last.shape == (2, 1, 97)
        np.testing.assert_allclose(last, full[:, -1:], atol=1e-5)
        np.testing.assert_allclose(last[:, 0], expected[:, 6], atol=1e-4)
        step, past_last = model.forward(ids[:, 7:8], mask[:, :8], past=past_last, num_logits_to_keep=1)
        np.testing.assert_allclose(step[:, 0], expected[:, 7], atol=1e-4)
        if mode == "shared-buffer":
            continue  # a multi-token step on a past runs row by row: concat only
        several, _ = model.forward(ids[:, 8:], mask, past=past_last, num_logits_to_keep=3)
        assert several.shape == (2, 3, 97)
        np.testing.assert_allclose(several, expected[:, -3:], atol=1e-4)


def test_the_input_has_a_default_so_other_clients_see_optimums_io(exports):
    """An initializer-backed input: onnxruntime lists it as overridable, not as a required
    input, and without it every position comes back (what Optimum and transformers.js get)."""
    _, folder = exports
    manifest = json.loads((folder / "portable" / "gptneo_onnx.json").read_text())
    assert manifest["io"]["num_logits_to_keep"] == "num_logits_to_keep"
    assert manifest["optional_inputs"] == [
        {"name": "num_logits_to_keep", "dtype": "int64", "shape": [], "default": 0}
    ]
    assert manifest["format_minor_version"] == 2
    session = ort.InferenceSession(
        str(folder / "portable" / "onnx" / "model.onnx"), providers=["CPUExecutionProvider"]
    )
    assert "num_logits_to_keep" not in [item.name for item in session.get_inputs()]
    assert [item.name for item in session.get_overridable_initializers()] == ["num_logits_to_keep"]
    ids, mask = batch()
    feed = {"input_ids": ids, "attention_mask": mask, "position_ids": np.maximum(mask.cumsum(1) - 1, 0)}
    empty = np.zeros((2, 4, 0, 8), np.float32)
    feed.update({f"past_key_values.{i}.{kind}": empty for i in range(2) for kind in ("key", "value")})
    everything = session.run(["logits"], feed)[0]
    for keep, positions in ((0, 12), (5, 5), (40, 12)):
        kept = session.run(["logits"], {**feed, "num_logits_to_keep": np.array(keep, np.int64)})[0]
        assert kept.shape == (2, positions, 97)
        np.testing.assert_allclose(kept, everything[:, -positions:], atol=1e-5)


def test_exports_without_the_input_still_return_the_asked_positions(exports, tmp_path):
    """A 1.1 manifest (no `io.num_logits_to_keep`): the runtime slices the full logits itself."""
    import shutil

    from gptneo_onnx.runtime import CausalLM

    _, folder = exports
    shutil.copytree(folder / "portable", tmp_path / "old")
    path = tmp_path / "old" / "gptneo_onnx.json"
    manifest = json.loads(path.read_text())
    del manifest["io"]["num_logits_to_keep"], manifest["optional_inputs"]
    manifest["format_minor_version"] = 1
    path.write_text(json.dumps(manifest))
    ids, mask = batch()
    old, new = (CausalLM.load(p, provider="cpu") for p in (tmp_path / "old", folder / "portable"))
    np.testing.assert_allclose(
        old.forward(ids, mask, num_logits_to_keep=2)[0],
        new.forward(ids, mask, num_logits_to_keep=2)[0],
        atol=1e-6,
    )
    with pytest.raises(Exception, match="num_logits_to_keep must be an integer >= 0"):
        new.forward(ids, mask, num_logits_to_keep=-1)
