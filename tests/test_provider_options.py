"""ProviderOptions is the one list of provider options: every field is a flag of each command that
loads a model, and a keyword of Model.load; no flag or keyword exists on one side only."""

from __future__ import annotations

import typing
from dataclasses import fields, replace
from pathlib import Path

import pytest
from runtime_helpers import export_tiny

from gptneo_onnx.bench.run import parse_args as parse_bench_args
from gptneo_onnx.cli import build_parser
from gptneo_onnx.cli.parsing import UsageError, parse, subcommands
from gptneo_onnx.cli.provider_flags import provider_flags, provider_options
from gptneo_onnx.runtime import Model, ProviderOptions

HINTS = typing.get_type_hints(ProviderOptions)
# The commands that load a model on a provider, with the positionals each needs to parse.
LOADING_COMMANDS = {
    "generate": ["hi"],
    "classify": ["EXPORT", "a text"],
    "tag": ["EXPORT", "a text"],
    "qa": ["EXPORT", "a question?", "a context."],
    "embed": ["EXPORT", "a text"],
    "serve": ["EXPORT"],
}
# Commands that run on the CPU by design (the parity run, the CPU benchmark): no provider flag.
CPU_COMMANDS = {"verify": ["EXPORT", "--reference", "CHECKPOINT"]}


def changed_value(item) -> object:
    """A value of the field's type that is not its default."""
    kind = HINTS[item.name]
    if kind is bool:
        return not item.default
    if "choices" in item.metadata:
        return next(choice for choice in item.metadata["choices"] if choice != item.default)
    if int in typing.get_args(kind) or kind is int:
        return (item.default or 0) + 1
    if Path in typing.get_args(kind):
        return Path("engines")
    return "cpu"  # the provider: the one a CPU test machine can start


def flag_words(flag: str, value: object) -> list[str]:
    return [flag] if isinstance(value, bool) else [flag, str(value)]


def provider_section(help_text: str) -> set[str]:
    """The flags listed under "execution provider:" in a command's --help."""
    lines = help_text.split("execution provider:\n", 1)[1].split("\n\n", 1)[0].splitlines()
    return {line.split()[0].rstrip(",") for line in lines if line.lstrip().startswith("--")}


def test_every_field_is_a_flag_of_every_loading_command_and_nothing_else_is():
    flags = provider_flags()
    assert flags["cuda_tf32"] == "--cuda-tf32" and flags["intra_op_threads"] == "--threads"
    commands = subcommands(build_parser())
    for command, positionals in LOADING_COMMANDS.items():
        assert provider_section(commands[command].format_help()) == set(flags.values()), command
        for item in fields(ProviderOptions):
            value = changed_value(item)
            args = parse(build_parser(), [command, *positionals, *flag_words(flags[item.name], value)])
            assert provider_options(args) == replace(ProviderOptions(), **{item.name: value}), (command, item)
        assert provider_options(parse(build_parser(), [command, *positionals])) == ProviderOptions()


def test_the_cpu_only_commands_take_no_provider_flag(capsys):
    flags = provider_flags()
    for item in fields(ProviderOptions):
        words = flag_words(flags[item.name], changed_value(item))
        for command, positionals in CPU_COMMANDS.items():
            with pytest.raises(UsageError, match="unrecognized"):
                parse(build_parser(), [command, *positionals, *words])
        with pytest.raises(SystemExit) as stopped:  # `gptneo-onnx bench` hands its words to bench.run
            parse_bench_args(["--quick", *words])
        assert stopped.value.code == 2 and "unrecognized arguments" in capsys.readouterr().err


@pytest.fixture(scope="module")
def export_dir(tmp_path_factory):
    return export_tiny("causal-lm", tmp_path_factory.mktemp("export") / "clm")[1]


def test_model_load_takes_every_field_as_a_keyword_or_in_options(export_dir):
    changed = {item.name: changed_value(item) for item in fields(ProviderOptions)}
    model = Model.load(export_dir, **changed)
    assert model.options == ProviderOptions(**changed) != ProviderOptions()
    assert model.provider == "cpu" and model.session.get_session_options().intra_op_num_threads == 1
    # keywords go over `options`
    base = ProviderOptions(intra_op_threads=2, graph_optimization_level="basic")
    model = Model.load(export_dir, options=base, intra_op_threads=1)
    assert model.options == replace(base, intra_op_threads=1)
    assert model.session.get_session_options().intra_op_num_threads == 1
    with pytest.raises(TypeError, match=r"unknown option\(s\) cuda_tf33; provider options are provider, "):
        Model.load(export_dir, cuda_tf33=True)
    with pytest.raises(TypeError, match="CausalLM's own .*cache_mode"):
        Model.load(export_dir, cache_modes="concat")
