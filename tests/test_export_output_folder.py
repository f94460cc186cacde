"""The exporter's output folder: no overwrite unless asked, nothing written outside it or through
links, and a crash mid-write (simulated) leaves no loadable half-export; a re-export recovers."""

from __future__ import annotations

import hashlib
import json
import os
import socket
import subprocess
import sys
import textwrap

import pytest
from conftest import tiny_hf_model

from gptneo_onnx.cli import main
from gptneo_onnx.errors import ExportOutputError
from gptneo_onnx.export import export, graph_builder
from gptneo_onnx.reference import from_transformers
from gptneo_onnx.runtime import ExportFolderError, Model


def tiny_export(folder, seed=0, **options):
    return export(from_transformers(tiny_hf_model("causal-lm", seed=seed)), folder, progress=False, **options)


def fingerprint(folder):
    files = sorted(path for path in folder.rglob("*") if path.is_file())
    return {
        path.relative_to(folder).as_posix(): hashlib.sha256(path.read_bytes()).hexdigest() for path in files
    }


def leftovers(parent, name):
    return sorted(path.name for path in parent.iterdir() if path.name.startswith(f".{name}."))


def test_a_non_empty_output_folder_is_refused_unless_overwrite(tmp_path, capsys):
    output = tmp_path / "export"
    tiny_export(output, validate=False)
    before = fingerprint(output)
    with pytest.raises(ExportOutputError, match="is not empty; pass overwrite=True"):
        tiny_export(output, seed=1, validate=False)
    assert fingerprint(output) == before
    tiny_export(output, seed=1, validate=False, overwrite=True)
    assert fingerprint(output) != before and Model.load(output)

    checkpoint = tmp_path / "checkpoint"
    tiny_hf_model("causal-lm").save_pretrained(checkpoint)
    arguments = ["export", "--model", str(checkpoint), "--output", str(output), "--no-validate", "--json"]
    assert main(arguments) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert main([*arguments, "--overwrite"]) == 0
    assert leftovers(tmp_path, "export") == []


def test_overwrite_never_deletes_files_an_export_does_not_write(tmp_path):
    output = tmp_path / "precious"
    output.mkdir()
    (output / "config.json").write_text("an export file name")
    (output / "notes.txt").write_text("keep me")
    with pytest.raises(ExportOutputError, match="holds notes.txt, which an export does not write"):
        tiny_export(output, overwrite=True, validate=False)
    assert (output / "notes.txt").read_text() == "keep me"
    (tmp_path / "a-file").write_text("")
    with pytest.raises(ExportOutputError, match="exists and is not a folder"):
        tiny_export(tmp_path / "a-file", overwrite=True, validate=False)


def test_links_in_the_output_are_replaced_never_written_through(tmp_path):
    output = tmp_path / "export"
    tiny_export(output, validate=False)
    victims = {}
    for name in ("onnx/model.onnx", "gptneo_onnx.json", "config.json", "parity_report.json"):
        victims[name] = tmp_path / f"victim-{name.replace('/', '-')}"
        victims[name].write_text("untouched")
        (output / name).unlink(missing_ok=True)
        (output / name).symlink_to(victims[name])
    tiny_export(output, overwrite=True)
    assert all(victim.read_text() == "untouched" for victim in victims.values())
    assert not any(path.is_symlink() for path in output.iterdir())
    assert Model.load(output)


def test_verify_replaces_a_planted_report_link_instead_of_writing_through_it(tmp_path, capsys):
    checkpoint, output = tmp_path / "checkpoint", tmp_path / "export"
    tiny_hf_model("causal-lm").save_pretrained(checkpoint)
    assert main(["export", "--model", str(checkpoint), "--output", str(output), "--json"]) == 0
    victim = tmp_path / "victim"
    victim.write_text("untouched")
    (output / "parity_report.json").unlink()
    (output / "parity_report.json").symlink_to(victim)
    assert main(["verify", str(output), "--reference", str(checkpoint), "--json"]) == 0
    assert victim.read_text() == "untouched" and not (output / "parity_report.json").is_symlink()


class Crash(Exception):
    pass


def crash_after(count, monkeypatch):
    """Make the external-data writer fail after `count` tensors: a crash mid-write."""
    original, written = graph_builder.external_tensor, []

    def write(*args):
        if len(written) == count:
            raise Crash("simulated crash while writing model.onnx.data")
        written.append(args[0])
        return original(*args)

    monkeypatch.setattr(graph_builder, "external_tensor", write)


def test_a_crash_mid_write_leaves_nothing_loadable_and_a_re_export_recovers(tmp_path, monkeypatch):
    output = tmp_path / "export"
    crash_after(3, monkeypatch)
    with pytest.raises(Crash):
        tiny_export(output, external_data=True)
    with pytest.raises(ExportFolderError, match="does not exist"):
        Model.load(output)
    assert leftovers(tmp_path, "export") == []  # the staging folder was removed
    monkeypatch.undo()
    tiny_export(output, external_data=True)
    assert Model.load(output).generate([5, 6, 7], max_new_tokens=3).sequences[0]


KILLED_EXPORT = """
import os, signal, sys
from gptneo_onnx.export import export, graph_builder
from gptneo_onnx.reference import from_pretrained

original, written = graph_builder.external_tensor, []

def write(*args):
    if len(written) == 3:
        os.kill(os.getpid(), signal.SIGKILL)  # no cleanup runs: as if the machine lost power
    written.append(args[0])
    return original(*args)

graph_builder.external_tensor = write
export(from_pretrained(sys.argv[1]), sys.argv[2], external_data=True, overwrite=True, progress=False)
"""


def test_a_killed_export_leaves_the_previous_export_intact_and_a_re_export_recovers(tmp_path):
    output, checkpoint = tmp_path / "export", tmp_path / "checkpoint"
    tiny_export(output, external_data=True)
    before = fingerprint(output)
    tiny_hf_model("causal-lm", seed=1).save_pretrained(checkpoint)
    script = textwrap.dedent(KILLED_EXPORT)
    process = subprocess.run([sys.executable, "-c", script, str(checkpoint), str(output)], timeout=300)
    assert process.returncode == -9
    assert fingerprint(output) == before  # the previous export, whole
    Model.load(output)
    (partial,) = leftovers(tmp_path, "export")  # what the killed export left beside it
    assert (tmp_path / partial / "onnx" / "model.onnx.data").is_file()
    with pytest.raises(ExportFolderError, match="staging folder of an export that did not finish"):
        Model.load(tmp_path / partial)

    owner = json.loads((tmp_path / partial / ".owner").read_text())  # the killed writer's
    assert owner["host"] == socket.gethostname() and owner["pid"] != os.getpid()
    with pytest.raises(ProcessLookupError):  # that writer is gone
        os.kill(owner["pid"], 0)
    live = tmp_path / ".export.partial-live"  # a staging folder of a process that still runs
    live.mkdir()
    (live / ".owner").write_text(json.dumps({"host": socket.gethostname(), "pid": os.getpid()}))
    legacy = tmp_path / ".export.partial-legacy"  # made before writers were recorded
    legacy.mkdir()

    arguments = ["export", "--model", str(checkpoint), "--output", str(output), "--external-data", "--json"]
    assert main([*arguments, "--overwrite"]) == 0
    assert fingerprint(output) != before
    manifest = json.loads((output / "gptneo_onnx.json").read_text())
    assert manifest["validation"]["passed"] and Model.load(output).generate([5, 6], max_new_tokens=2)
    assert not (output / ".owner").exists()
    # The re-export removed what the killed one left, and kept the others.
    assert leftovers(tmp_path, "export") == [".export.partial-legacy", ".export.partial-live"]


def test_a_half_copied_export_fails_clearly(tmp_path):
    output = tmp_path / "export"
    tiny_export(output, external_data=True, validate=False)
    (output / "gptneo_onnx.json").unlink()  # a copy or writer that stopped before the sidecar
    with pytest.raises(ExportFolderError, match="has no gptneo_onnx.json"):
        Model.load(output)


def test_the_cached_default_export_is_made_once_and_remade_when_it_no_longer_loads(tmp_path, monkeypatch):
    from gptneo_onnx.cli import defaults

    monkeypatch.setenv("GPTNEO_ONNX_CACHE", str(tmp_path))
    folder = defaults.default_export_dir(progress=False)
    sidecar = folder / "gptneo_onnx.json"
    written = sidecar.stat().st_mtime_ns
    assert defaults.default_export_dir(progress=False) == folder and sidecar.stat().st_mtime_ns == written
    manifest = json.loads(sidecar.read_text())
    del manifest["graph"]["op_domains"]  # a cache written by an older gptneo-onnx
    sidecar.write_text(json.dumps(manifest))
    assert defaults.default_export_dir(progress=False) == folder
    assert Model.load(folder).generate("def f(x):", max_new_tokens=2).sequences[0]
    assert leftovers(tmp_path, folder.name) == []
