"""Safe loading of checkpoints: safetensors first, weights-only pickles, no checkpoint code,
gpt_neo configs only, pinned hub revisions, and damaged files named in the error."""

from __future__ import annotations

import fnmatch
import json
import re
from pathlib import Path

import huggingface_hub
import pytest
import torch
from conftest import tiny_hf_model
from safetensors.torch import load_file, save_file

from gptneo_onnx.cli import main
from gptneo_onnx.config import ConfigError
from gptneo_onnx.reference import CheckpointError, from_pretrained

PACKAGE = Path(__file__).resolve().parent.parent / "gptneo_onnx"


class CodeInPickle:
    """Unpickling this runs code: it writes `marker`."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (exec, (f"open({str(self.marker)!r}, 'w').write('ran')",))


@pytest.fixture
def checkpoint(tmp_path):
    folder = tmp_path / "checkpoint"
    tiny_hf_model("causal-lm").save_pretrained(folder)
    return folder


def save_poisoned_pickle(folder: Path, marker: Path, name="pytorch_model.bin"):
    state = load_file(folder / "model.safetensors") if (folder / "model.safetensors").is_file() else {}
    torch.save({**state, "payload": CodeInPickle(marker)}, folder / name)


def test_safetensors_are_preferred_over_pickles(checkpoint, tmp_path):
    marker = tmp_path / "ran"
    save_poisoned_pickle(checkpoint, marker)
    model = from_pretrained(checkpoint)  # reads model.safetensors; the pickle is never opened
    assert not marker.exists()
    expected = load_file(checkpoint / "model.safetensors")["transformer.wte.weight"]
    assert torch.equal(model.transformer.wte.weight, expected)


def test_pickled_code_is_refused_and_never_runs(checkpoint, tmp_path):
    marker = tmp_path / "ran"
    save_poisoned_pickle(checkpoint, marker)
    (checkpoint / "model.safetensors").unlink()
    with pytest.raises(
        CheckpointError, match=r"pytorch_model\.bin was refused: it holds pickled objects.*weights_only=True"
    ):
        from_pretrained(checkpoint)
    assert not marker.exists()


def test_weights_only_pickles_still_load(tmp_path):
    hf_model = tiny_hf_model("causal-lm")
    hf_model.save_pretrained(tmp_path, safe_serialization=False)
    model = from_pretrained(tmp_path)
    assert torch.equal(model.transformer.wte.weight, hf_model.transformer.wte.weight)


def test_checkpoint_code_never_runs(checkpoint, tmp_path):
    """A config that points at remote code (auto_map) loads as plain GPT-Neo; its code is not run."""
    marker = tmp_path / "ran"
    code = f"open({str(marker)!r}, 'w').write('ran')\n"
    for name in ("configuration_evil.py", "modeling_evil.py", "__init__.py"):
        (checkpoint / name).write_text(code)
    config = json.loads((checkpoint / "config.json").read_text())
    config["auto_map"] = {
        "AutoConfig": "configuration_evil.EvilConfig",
        "AutoModelForCausalLM": "modeling_evil.EvilModel",
    }
    (checkpoint / "config.json").write_text(json.dumps(config))
    from_pretrained(checkpoint)
    assert main(["export", "--model", str(checkpoint), "--output", str(tmp_path / "out"), "--json"]) == 0
    assert not marker.exists()


def test_no_source_file_asks_for_remote_code():
    sources = [*PACKAGE.rglob("*.py"), *(PACKAGE.parent / "scripts").rglob("*.py")]
    assert len(sources) > 30
    passing = re.compile(r"""trust_remote_code\s*=|["']trust_remote_code["']""")  # passed, not mentioned
    offenders = [str(path) for path in sources if passing.search(path.read_text(encoding="utf-8"))]
    assert offenders == []


@pytest.mark.parametrize("model_type", ["gpt2", "llama", None])
def test_a_config_of_another_model_type_is_refused(checkpoint, model_type, capsys):
    config = json.loads((checkpoint / "config.json").read_text())
    if model_type is None:
        del config["model_type"]
    else:
        config["model_type"] = model_type
    (checkpoint / "config.json").write_text(json.dumps(config))
    with pytest.raises(ConfigError, match=rf"config\.json has model_type {model_type!r}; only GPT-Neo"):
        from_pretrained(checkpoint)
    assert main(["export", "--model", str(checkpoint), "--output", str(checkpoint.parent / "out")]) == 2
    assert "only GPT-Neo checkpoints" in capsys.readouterr().err


class FakeHub:
    """Stands in for the hub: records what was asked, serves a local folder."""

    def __init__(self, folder: Path, files: list[str]):
        self.folder, self.files, self.calls = folder, files, []

    def list_repo_files(self, repo_id, revision=None, **kwargs):
        self.calls.append(("list", repo_id, revision, kwargs))
        return self.files

    def snapshot_download(self, repo_id, revision=None, allow_patterns=None, **kwargs):
        self.calls.append(("download", repo_id, revision, {"allow_patterns": allow_patterns, **kwargs}))
        return str(self.folder)


@pytest.fixture
def fake_hub(checkpoint, monkeypatch):
    hub = FakeHub(checkpoint, ["config.json", "model.safetensors", "modeling_evil.py"])
    monkeypatch.setattr(huggingface_hub, "list_repo_files", hub.list_repo_files)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", hub.snapshot_download)
    return hub


def test_a_hub_revision_is_pinned(fake_hub):
    commit = "0123456789abcdef0123456789abcdef01234567"
    from_pretrained("someone/tiny-neo", revision=commit)
    (_, repo, listed_at, _), (_, _, downloaded_at, options) = fake_hub.calls
    assert repo == "someone/tiny-neo" and listed_at == downloaded_at == commit
    patterns = options["allow_patterns"]
    fetched = [
        name
        for name in ("modeling_evil.py", "pytorch_model.bin")
        if any(fnmatch.fnmatch(name, p) for p in patterns)
    ]
    assert "*.safetensors" in patterns and fetched == []
    assert "trust_remote_code" not in options


def test_the_cli_pins_the_hub_revision(fake_hub, tmp_path, capsys):
    output = tmp_path / "export"
    arguments = ["export", "--model", "someone/tiny-neo", "--revision", "v1.0", "--output", str(output)]
    assert main([*arguments, "--no-validate", "--json"]) == 0
    assert [call[2] for call in fake_hub.calls] == ["v1.0", "v1.0"]
    fake_hub.calls.clear()
    assert (
        main(["verify", str(output), "--reference", "someone/tiny-neo", "--revision", "v1.0", "--json"]) == 0
    )
    assert [call[2] for call in fake_hub.calls] == ["v1.0", "v1.0"]


def test_pickles_are_fetched_only_when_there_are_no_safetensors(fake_hub):
    fake_hub.files = ["config.json", "pytorch_model.bin"]
    from_pretrained("someone/tiny-neo")
    assert "*.bin" in fake_hub.calls[-1][3]["allow_patterns"]


def damage(kind: str, folder: Path) -> str:
    """Damage the checkpoint in `folder` one way; returns the file name the error must give."""
    safetensors = folder / "model.safetensors"
    if kind.startswith("bin-"):
        state = load_file(safetensors)
        safetensors.unlink()
        torch.save(state, folder / "pytorch_model.bin")
        weights = folder / "pytorch_model.bin"
    else:
        weights = safetensors
    data = weights.read_bytes()
    if kind.endswith("truncated"):
        weights.write_bytes(data[: len(data) // 2])
    elif kind.endswith("garbage"):
        weights.write_bytes(b"\x93not weights at all" * 50)
    elif kind.endswith("empty"):
        weights.write_bytes(b"")
    elif kind == "index-invalid-json":
        (folder / "model.safetensors.index.json").write_text("{not json")
        return "model.safetensors.index.json"
    elif kind == "index-missing-shard":
        index = {"weight_map": {"transformer.wte.weight": "model-00002-of-00002.safetensors"}}
        (folder / "model.safetensors.index.json").write_text(json.dumps(index))
        return "model-00002-of-00002.safetensors"
    return weights.name


@pytest.mark.parametrize(
    "kind",
    [
        "safetensors-truncated",
        "safetensors-garbage",
        "safetensors-empty",
        "bin-truncated",
        "bin-garbage",
        "bin-empty",
        "index-invalid-json",
        "index-missing-shard",
    ],
)
def test_truncated_or_corrupt_weights_are_named(checkpoint, kind, capsys):
    name = damage(kind, checkpoint)
    with pytest.raises(
        CheckpointError, match=rf"{name.replace('.', '[.]')}.*(truncated|corrupt|missing|valid)"
    ):
        from_pretrained(checkpoint)
    assert main(["export", "--model", str(checkpoint), "--output", str(checkpoint.parent / "out")]) == 2
    error = capsys.readouterr().err
    assert error.startswith("error: ") and name in error and "Traceback" not in error


@pytest.mark.parametrize(
    "shard",
    ["../outside.safetensors", "/tmp/outside.safetensors", "sub/model.safetensors", "model.bin", ".."],
)
def test_shard_names_that_leave_the_folder_or_change_format_are_refused(checkpoint, tmp_path, shard):
    tensors = load_file(checkpoint / "model.safetensors")
    save_file(tensors, tmp_path / "outside.safetensors")  # a loadable file where `..` points
    (checkpoint / "model.safetensors").rename(checkpoint / "model-00001-of-00001.safetensors")
    weight_map = {name: "model-00001-of-00001.safetensors" for name in tensors}
    weight_map["transformer.wte.weight"] = shard
    index = checkpoint / "model.safetensors.index.json"
    index.write_text(json.dumps({"weight_map": weight_map}))
    with pytest.raises(CheckpointError, match=r"lists the shard .*plain \.safetensors file names"):
        from_pretrained(checkpoint)
