"""The CLI as a user meets it (issue 14): every failure is one `error:` line with the right exit code,
no traceback, and nothing left behind. Each case runs `python -m gptneo_onnx` as a subprocess,
bounded in time (and, for the memory cases, in address space)."""

from __future__ import annotations

import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest
from conftest import tiny_hf_model
from runtime_helpers import export_tiny, train_tokenizer

from gptneo_onnx.cli.defaults import BUNDLED_MODEL_DIR

REPO = Path(__file__).resolve().parent.parent
NODE = shutil.which("node")
NODE_RUNNER = REPO / "clients" / "node" / "generate.js"
NODE_READY = NODE is not None and (REPO / "clients" / "node" / "node_modules" / "onnxruntime-node").is_dir()
STEP_TIMEOUT = 120  # seconds a single CLI run may take on a loaded 2-core machine


def cli(*args: str, timeout: float = STEP_TIMEOUT, memory_bytes: int | None = None, env: dict | None = None):
    """Run `python -m gptneo_onnx ARGS`; RLIMIT_AS caps its address space when `memory_bytes` is given."""

    def limit() -> None:
        if memory_bytes is not None:
            resource.setrlimit(resource.RLIMIT_AS, (memory_bytes, memory_bytes))

    return subprocess.run(
        [sys.executable, "-m", "gptneo_onnx", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        preexec_fn=limit,
        env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})},
        cwd=REPO,
    )


@pytest.fixture
def run(capsys):
    """`main(argv)` in this process (fast: for cases that need no process of their own), as a
    CompletedProcess."""
    from gptneo_onnx.cli import main

    def run_main(*argv: str) -> subprocess.CompletedProcess:
        capsys.readouterr()
        code = main(list(argv))
        out, err = capsys.readouterr()
        return subprocess.CompletedProcess(list(argv), code, out, err)

    return run_main


def assert_one_error(result, code: int = 2, says: str = "") -> str:
    """Exit `code`, no traceback, exactly one `error:` line on stderr (which contains `says`)."""
    assert "Traceback" not in result.stderr, result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, result.stderr
    assert result.returncode == code, (result.returncode, result.stderr)
    assert says in errors[0], errors[0]
    return errors[0]


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    root = tmp_path_factory.mktemp("robust")
    tokenizer = train_tokenizer(root / "tokenizer.json")
    lm = export_tiny("causal-lm", root / "lm", tokenizer, vocab_size=320, max_position_embeddings=1024)[1]
    ner = export_tiny(
        "token-classification",
        root / "ner",
        tokenizer,
        vocab_size=320,
        id2label={0: "O", 1: "B-PER", 2: "I-PER"},
    )[1]
    base = export_tiny("base", root / "base", tokenizer, vocab_size=320)[1]
    return {"root": root, "lm": lm, "ner": ner, "base": base, "tokenizer": tokenizer}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    folder = tmp_path_factory.mktemp("checkpoint")
    tiny_hf_model("causal-lm").save_pretrained(folder)
    return folder


def copy_export(source: Path, target: Path) -> Path:
    shutil.copytree(source, target)
    return target


def edit_sidecar(folder: Path, **changes) -> None:
    path = folder / "gptneo_onnx.json"
    raw = json.loads(path.read_text())
    raw.update(changes)
    path.write_text(json.dumps(raw))


# ---- 1. silent wrong results --------------------------------------------------------------------
@pytest.mark.parametrize(
    "argument, says",
    [
        ("exports/defualt", "looks like a path, but nothing exists there"),
        (str(BUNDLED_MODEL_DIR), "is a checkpoint, not an export"),
        ("tests", "a folder that holds no export"),
        ("README.md", "is a file, not a prompt"),
    ],
)
def test_a_path_is_never_guessed_into_a_prompt(argument, says, run):
    assert_one_error(run("generate", argument, "--max-new-tokens", "2"), 2, says)


def test_an_export_given_as_a_positional_is_refused_with_the_fix(exports, run):
    assert_one_error(run("generate", str(exports["lm"]), "hi"), 2, f"-m {exports['lm']}")
    result = run("generate", "-m", str(exports["lm"]), "--prompt", "a/b", "--max-new-tokens", "2", "--json")
    assert result.returncode == 0, result.stderr
    assert len(json.loads(result.stdout)["sequences"]) == 1


def test_unfinished_and_failed_exports_load_in_neither_runtime(exports, tmp_path, run):
    staging = copy_export(exports["lm"], tmp_path / ".lm.partial-0123abcd")
    pending = copy_export(exports["lm"], tmp_path / "pending")
    edit_sidecar(pending, validation={"status": "pending", "passed": False})
    failed = copy_export(exports["lm"], tmp_path / "failed")
    edit_sidecar(failed, validation={"status": "failed", "passed": False, "report": "parity_report.json"})
    cases = [(staging, "staging folder of an export that did not finish"), (pending, "'pending'"),
             (failed, "failed its parity validation")]  # fmt: skip
    for folder, says in cases:
        assert_one_error(run("generate", "-m", str(folder), "hi"), 2, says)
        if NODE_READY:
            node = subprocess.run([NODE, str(NODE_RUNNER), str(folder), "hi"], capture_output=True, text=True,
                                  timeout=STEP_TIMEOUT)  # fmt: skip
            assert_one_error(node, 2, says)


def test_an_unvalidated_export_loads_with_one_warning(exports, tmp_path):
    skipped = copy_export(exports["lm"], tmp_path / "skipped")
    edit_sidecar(skipped, validation={"status": "skipped"})
    result = cli("generate", "-m", str(skipped), "hi", "--max-new-tokens", "2", "--json")
    assert result.returncode == 0, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.startswith("warning:")]
    assert len(lines) == 1 and "without validation" in lines[0], result.stderr
    if NODE_READY:
        node = subprocess.run([NODE, str(NODE_RUNNER), str(skipped), "hi", "--max-new-tokens", "2", "--json"],
                              capture_output=True, text=True, timeout=STEP_TIMEOUT)  # fmt: skip
        assert node.returncode == 0 and node.stderr.count("warning:") == 1, node.stderr


def test_an_export_killed_during_validation_loads_nowhere(checkpoint, tmp_path, run):
    """kill -9 once the sidecar is in the staging folder (validation running or about to): the
    staging folder is refused by both runtimes, and no output appears."""
    output = tmp_path / "out"
    process = subprocess.Popen(
        [sys.executable, "-m", "gptneo_onnx", "export", "--model", str(checkpoint), "--output", str(output)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=REPO,
    )  # fmt: skip
    deadline = time.monotonic() + STEP_TIMEOUT
    staged = []
    while time.monotonic() < deadline and process.poll() is None:
        staged = list(tmp_path.glob(".out.partial-*/gptneo_onnx.json"))
        if staged:
            break
        time.sleep(0.02)
    process.kill()
    process.wait(timeout=30)
    assert staged, "the export finished before its sidecar was seen; nothing was tested"
    staging = staged[0].parent
    assert not output.exists()
    status = json.loads(staged[0].read_text())["validation"]["status"]
    assert status == "pending"  # written before validation ran; `passed` only comes after it
    assert_one_error(run("generate", "-m", str(staging), "hi"), 2, "staging folder")
    if NODE_READY:
        node = subprocess.run([NODE, str(NODE_RUNNER), str(staging), "hi"], capture_output=True, text=True,
                              timeout=STEP_TIMEOUT)  # fmt: skip
        assert_one_error(node, 2, "staging folder")


# ---- 2. processes killed or hung ------------------------------------------------------------
def test_huge_num_beams_is_refused_before_allocating(bundled_export):
    """With a 3 GiB address space, 100000 beams of the bundled model (logits alone need ~10 GiB)
    must be refused by the estimate, not found out by the allocator or the OOM killer."""
    result = cli(
        "generate", "-m", str(bundled_export), "x", "--num-beams", "100000", "--max-new-tokens", "3",
        memory_bytes=3 * 2**30, timeout=60,
    )  # fmt: skip
    assert_one_error(result, 2, "GiB")


def test_thread_counts_are_bounded(exports, run):
    assert_one_error(run("generate", "-m", str(exports["lm"]), "hi", "--threads", "100000"), 2,
                     "intra_op_threads must be")  # fmt: skip
    assert_one_error(run("generate", "-m", str(exports["lm"]), "hi", "--threads", "0"), 2, "--threads")


# ---- 3. ordinary mistakes: one line each ------------------------------------------------------
SHIM = """
import sys
for name in {modules!r}:
    sys.modules[name] = None  # `import name` now fails as if the package were not installed
"""


@pytest.mark.parametrize(
    "argv, extra",
    [
        (["generate"], "`export` extra"),
        (["export", "--model", str(BUNDLED_MODEL_DIR), "--output", "{tmp}/out"], "`export` extra"),
        (["bench", "--quick"], "extra"),
    ],
)
def test_a_runtime_only_install_names_the_extra_to_install(argv, extra, tmp_path):
    """torch, onnx and transformers made unimportable (a sitecustomize shim), as in `pip install .[cpu]`."""
    (tmp_path / "sitecustomize.py").write_text(
        SHIM.format(modules=["torch", "onnx", "transformers", "optimum"])
    )
    env = {"PYTHONPATH": f"{tmp_path}{os.pathsep}{REPO}", "GPTNEO_ONNX_CACHE": str(tmp_path / "cache")}
    result = cli(*[word.format(tmp=tmp_path) for word in argv], env=env)
    line = assert_one_error(result, 2, extra)
    assert "pip install" in line
    assert not (tmp_path / "out").exists() and not (tmp_path / "cache").exists()


@pytest.mark.parametrize(
    "options, says",
    [
        (["--quantize", "int8", "--precision", "float16"], "--quantize starts from float32"),
        (["--quantize", "int4", "--block-size", "0"], "power of two"),
        (["--quantize", "int4", "--block-size", "7"], "power of two"),
        (["--quantize", "int4", "--block-size", "-32"], "power of two"),
        (["--block-size", "32"], "--block-size applies to --quantize"),
        (["--quality", "--quality-windows", "0"], "--quality-windows"),
        (["--quality", "--quality-windows", "-3"], "--quality-windows"),
        (["--quality-windows", "4"], "--quality-windows applies to --quality only"),
        (["--quantize", "int4", "--accuracy-level", "99"], "--accuracy-level must be 0 to 4"),
        (["--quantize", "int8", "--accuracy-level", "2"], "--accuracy-level applies to --quantize int4"),
        (["--task", "token-classification", "--quality"], "causal-lm exports only"),
        (["--revision", "main"], "--revision pins a hub checkpoint"),
    ],
)
def test_export_options_are_checked_before_any_work(options, says, tmp_path, run):
    result = run("export", "--model", str(BUNDLED_MODEL_DIR), "--output", str(tmp_path / "out"), *options)
    assert_one_error(result, 2, says)
    assert "usage: gptneo-onnx export" in result.stderr  # the subcommand's usage, not the top level's
    assert list(tmp_path.iterdir()) == []


def test_too_many_quality_windows_is_an_error_not_a_silent_cap(tmp_path, run):
    result = run("export", "--model", str(BUNDLED_MODEL_DIR), "--output", str(tmp_path / "out"), "--quality",
                 "--quality-windows", "100000", "--no-validate")  # fmt: skip
    assert_one_error(result, 2, "ask for at most")
    assert list(tmp_path.iterdir()) == []


def test_verify_on_damaged_exports(exports, checkpoint, tmp_path, run):
    no_task = copy_export(exports["lm"], tmp_path / "no-task")
    raw = json.loads((no_task / "gptneo_onnx.json").read_text())
    del raw["task"]
    (no_task / "gptneo_onnx.json").write_text(json.dumps(raw))
    bad_json = copy_export(exports["lm"], tmp_path / "bad-json")
    (bad_json / "gptneo_onnx.json").write_text("{not json")
    truncated = copy_export(exports["lm"], tmp_path / "truncated")
    graph = truncated / json.loads((truncated / "gptneo_onnx.json").read_text())["graph"]["file"]
    graph.write_bytes(graph.read_bytes()[:1000])
    for folder, says in ((no_task, "`task`"), (bad_json, "not valid JSON"), (truncated, "bytes")):
        assert_one_error(run("verify", str(folder), "--reference", str(checkpoint)), 2, says)


def test_verify_keeps_the_report_and_the_sidecar_consistent(exports, tmp_path, run):
    """A verify against another checkpoint fails: the report says so, the sidecar says so, and the
    export stops loading. A verify against the right one makes it loadable again."""
    folder = copy_export(exports["lm"], tmp_path / "lm")
    other = tmp_path / "other"
    tiny_hf_model("causal-lm", seed=5, vocab_size=320, max_position_embeddings=1024).save_pretrained(other)
    result = run("verify", str(folder), "--reference", str(other))
    assert result.returncode == 1 and "FAILED" in result.stdout, result.stderr
    report = json.loads((folder / "parity_report.json").read_text())
    validation = json.loads((folder / "gptneo_onnx.json").read_text())["validation"]
    assert report["passed"] is False and validation["status"] == "failed" and validation["passed"] is False
    assert validation["max_abs_diff"] == report["max_abs_diff"]
    assert_one_error(run("generate", "-m", str(folder), "hi"), 2, "failed its parity validation")


@pytest.mark.parametrize("output", ["/proc/gptneo-onnx-test", "/sys/gptneo-onnx-test"])
def test_unwritable_outputs_fail_before_the_export(output, run):
    result = run("export", "--model", str(BUNDLED_MODEL_DIR), "--output", output)
    assert_one_error(result, 2, "cannot use")
    assert "export:" not in result.stderr  # refused before the first step, not after the whole export


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_a_read_only_output_folder_fails_before_the_export(tmp_path, run):
    parent = tmp_path / "locked"
    parent.mkdir(mode=0o555)
    result = run("export", "--model", str(BUNDLED_MODEL_DIR), "--output", str(parent / "out"))
    assert_one_error(result, 2, "cannot use")


def test_an_empty_existing_output_is_written_into_and_keeps_its_mode(checkpoint, tmp_path, run):
    output = tmp_path / "volume"
    output.mkdir()
    output.chmod(0o751)
    inode = output.stat().st_ino
    result = run("export", "--model", str(checkpoint), "--output", str(output), "--json", "--no-validate")
    assert result.returncode == 0, result.stderr
    payload = json.loads(result.stdout)
    assert output.stat().st_ino == inode and output.stat().st_mode & 0o777 == 0o751
    written = sorted(path.relative_to(output).as_posix() for path in output.rglob("*") if path.is_file())
    assert sorted(payload["files"]) == written  # no .owner
    assert sorted(path.name for path in tmp_path.iterdir()) == ["volume"]  # no .old-* or .partial-*


# ---- 4. Ctrl-C and closed pipes ---------------------------------------------------------------
def interrupt_after(argv: list[str], ready) -> subprocess.CompletedProcess:
    """Start the CLI, wait until `ready(process)` says it is at work (it reads what it needs from
    the pipes and returns it), send SIGINT, and collect the result."""
    process = subprocess.Popen([sys.executable, "-m", "gptneo_onnx", *argv], stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True, cwd=REPO)  # fmt: skip
    try:
        seen_out, seen_err = ready(process)
        assert process.poll() is None, "the command ended before it was interrupted"
        time.sleep(0.05)
        process.send_signal(signal.SIGINT)
        out, err = process.communicate(timeout=STEP_TIMEOUT)
    finally:
        process.kill()
    return subprocess.CompletedProcess(argv, process.returncode, seen_out + out, seen_err + err)


def first_output(process) -> tuple[str, str]:
    return process.stdout.read(1), ""


def first_warning(process) -> tuple[str, str]:
    return "", process.stderr.readline()


def staging_folder_in(parent: Path):
    def ready(process) -> tuple[str, str]:
        deadline = time.monotonic() + STEP_TIMEOUT
        while (
            time.monotonic() < deadline and process.poll() is None and not list(parent.glob(".*.partial-*"))
        ):
            time.sleep(0.02)
        return "", ""

    return ready


def test_ctrl_c_while_streaming_exits_130_in_one_line(exports):
    argv = [
        "generate",
        "-m",
        str(exports["lm"]),
        "hi",
        "--max-new-tokens",
        "1000",
        "--min-new-tokens",
        "1000",
    ]
    assert_one_error(interrupt_after(argv, first_output), 130, "interrupted")


def test_ctrl_c_during_beam_search_exits_130_in_one_line(exports, tmp_path):
    skipped = copy_export(exports["lm"], tmp_path / "skipped")  # its load warning says: generation starts
    edit_sidecar(skipped, validation={"status": "skipped"})
    argv = ["generate", "-m", str(skipped), "hi", "--num-beams", "16", "--max-new-tokens", "1000",
            "--min-new-tokens", "1000"]  # fmt: skip
    assert_one_error(interrupt_after(argv, first_warning), 130, "interrupted")


def test_ctrl_c_during_export_exits_130_and_leaves_nothing(tmp_path):
    # The bundled checkpoint, not the tiny one: its export lasts long enough to be interrupted.
    output = tmp_path / "out"
    argv = ["export", "--model", str(REPO / "gptneo_onnx" / "default_model"), "--output", str(output)]
    result = interrupt_after(argv, staging_folder_in(tmp_path))  # the export has started writing
    assert_one_error(result, 130, "interrupted")
    assert list(tmp_path.iterdir()) == []


def test_a_closed_pipe_ends_quietly(bundled_export):
    """`| head -c 10` while text still streams (the bundled model writes real text as it goes)."""
    for command in (
        [sys.executable, "-m", "gptneo_onnx", "generate", "-m", str(bundled_export), "def"],
        [NODE, str(NODE_RUNNER), str(bundled_export), "def"] if NODE_READY else None,
    ):
        if command is None:
            continue
        process = subprocess.Popen([*command, "--max-new-tokens", "500", "--min-new-tokens", "500"],
                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=REPO)  # fmt: skip
        assert len(process.stdout.read(10)) == 10
        process.stdout.close()  # `| head -c 10`
        err = process.stderr.read().decode()
        assert process.wait(timeout=STEP_TIMEOUT) == 141, err
        assert err == "", err


# ---- 5. messages and ignored options ------------------------------------------------------------
def test_messages_speak_to_cli_users(exports, run):
    line = assert_one_error(
        run("generate", "-m", str(exports["lm"]), "", "--token-ids"), 2, "holds no token id"
    )
    assert "generate()" not in line
    line = assert_one_error(
        run("generate", "-m", str(exports["ner"]), "hi"), 2, "'token-classification' export"
    )
    assert "Model.load" not in line and "gptneo-onnx info" in line
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # numpy's overflow warning would end the run
        result = run("generate", "-m", str(exports["lm"]), "hi", "--repetition-penalty", "1e308",
                     "--max-new-tokens", "3")  # fmt: skip
    assert result.returncode == 0 and result.stderr == "", result.stderr  # bounded in float32, silently
    assert_one_error(run("generate", "-m", str(exports["lm"]), "hi", "--device-id", "-1"), 2, "--device-id")


def test_json_mode_reports_errors_as_json(exports, run):
    result = run("generate", "-m", str(exports["ner"]), "hi", "--json")
    assert_one_error(result, 2)
    assert json.loads(result.stdout) == {
        "error": {"type": "ExportFolderError", "message": result.stderr.strip().removeprefix("error: ")}
    }
    usage = run("export", "--output", "x", "--json")
    assert json.loads(usage.stdout)["error"]["type"] == "UsageError" and usage.returncode == 2


def test_info_describes_an_export_and_why_it_would_not_load(exports, tmp_path, run):
    result = run("info", str(exports["lm"]), "--json")
    facts = json.loads(result.stdout)
    sidecar = json.loads((exports["lm"] / "gptneo_onnx.json").read_text())
    assert facts["task"] == "causal-lm" and facts["validation"]["status"] == "passed" and facts["loads"]
    assert facts["files"] == {
        sidecar["graph"]["file"]: sidecar["graph"]["bytes"],
        "tokenizer.json": sidecar["tokenizer"]["bytes"],
    }
    assert [item["window"] for item in facts["cache_layers"]] == [None, 4]
    failed = copy_export(exports["lm"], tmp_path / "failed")
    edit_sidecar(failed, validation={"status": "failed", "passed": False})
    text = run("info", str(failed))
    assert text.returncode == 0 and "loads       no: " in text.stdout and "failed" in text.stdout


def test_every_command_has_help_with_a_description_and_an_example():
    from gptneo_onnx.cli import build_parser
    from gptneo_onnx.cli.parsing import subcommands

    for name, parser in subcommands(build_parser()).items():
        if name.startswith("bench"):  # their options are the bench runner's own parser
            continue
        text = parser.format_help()
        assert parser.description and "examples:" in text and f"gptneo-onnx {name}" in text, name
    result = cli("info", "--help")
    assert result.returncode == 0 and "examples:" in result.stdout


def test_a_quantized_export_says_what_was_checked(checkpoint, tmp_path, run):
    result = run(
        "export", "--model", str(checkpoint), "--output", str(tmp_path / "int8"), "--quantize", "int8"
    )
    assert result.returncode == 0, result.stderr
    assert "(int8-dynamic, from float32)" in result.stdout and "not held to parity" in result.stdout
    assert "parity passed" not in result.stdout and ".owner" not in result.stdout
    validation = json.loads((tmp_path / "int8" / "gptneo_onnx.json").read_text())["validation"]
    assert validation["status"] == "passed" and validation["checked"] == "runs"


def test_api_options_that_would_be_ignored_are_refused(exports):
    from gptneo_onnx.runtime import CausalLM, InputError, Model

    with pytest.raises(InputError, match="max_cache_bytes"):
        CausalLM.load(exports["lm"], max_cache_bytes=-1)
    with pytest.raises(InputError, match="normalize must be True or False"):
        Model.load(exports["base"]).embed("hi", normalize="yes")


def test_tokens_that_split_one_character_make_one_span(exports):
    """Byte-level BPE splits an emoji into several tokens with the same character offsets: they
    join one entity (or stay outside together), so no two spans share a character."""
    from gptneo_onnx.runtime import Model
    from gptneo_onnx.runtime.postprocess import TaggedToken, group_entities

    text = "🐍🐍 Paris"
    pieces = [
        ("B-PER", 0, 1),
        ("I-PER", 0, 1),
        ("B-PER", 0, 1),
        ("B-PER", 1, 2),
        ("O", 1, 2),
        ("B-PER", 3, 8),
    ]
    tagged = [TaggedToken(i, "t", label, 0.5, start, end) for i, (label, start, end) in enumerate(pieces)]
    entities = group_entities(tagged, text)
    assert [(e["start"], e["end"], e["tokens"]) for e in entities] == [
        (0, 1, [0, 1, 2]),
        (1, 2, [3, 4]),
        (3, 8, [5]),
    ]
    tagger = Model.load(exports["ner"])
    for result in tagger.tag([text, "🐍 x 🐍🐍🐍", "Zoë 東京"]):
        spans = sorted((entity["start"], entity["end"]) for entity in result["entities"])
        assert all(end <= start for (_, end), (start, _) in zip(spans, spans[1:])), spans
