"""Chat templates: the Jinja template that turns chat messages into one prompt, rendered as
transformers' `apply_chat_template` renders it (a sandboxed environment with trimmed blocks,
`raise_exception`, `strftime_now`, `tojson`, loop controls and the `{% generation %}` tag), so a
fine-tuned checkpoint's template gives the prompt it was trained on.

The template comes from `serve --chat-template` (a file, or the template itself), else from the
export's tokenizer_config.json (`chat_template`, carried over from the checkpoint at export).
"""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path
from typing import Any

import jinja2
from jinja2.ext import Extension, loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment

from gptneo_onnx.contract import TOKENIZER_CONFIG_NAME

SPECIAL_TOKENS = ("bos_token", "eos_token", "unk_token", "pad_token")


class ChatTemplateError(ValueError):
    """A template that does not compile or render (its own raise_exception included)."""


class GenerationTag(Extension):
    """`{% generation %}...{% endgeneration %}` marks the assistant's tokens for training masks
    (transformers' AssistantTracker); rendering a prompt keeps the body as it is."""

    tags = {"generation"}

    def parse(self, parser: jinja2.parser.Parser) -> jinja2.nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.Scope(body, lineno=lineno)


def raise_exception(message: str) -> None:
    raise ChatTemplateError(message)


def tojson(
    value: Any, ensure_ascii: bool = False, indent: int | None = None, separators=None, sort_keys=False
) -> str:
    return json.dumps(
        value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
    )


def strftime_now(format: str) -> str:
    return datetime.now().strftime(format)


class ChatTemplate:
    """A compiled chat template and the special tokens it may refer to."""

    def __init__(self, source: str, special_tokens: dict[str, str] | None = None):
        environment = ImmutableSandboxedEnvironment(
            trim_blocks=True, lstrip_blocks=True, extensions=[GenerationTag, loopcontrols]
        )
        environment.filters["tojson"] = tojson
        environment.globals.update(raise_exception=raise_exception, strftime_now=strftime_now)
        try:
            self.template = environment.from_string(source)
        except jinja2.TemplateSyntaxError as error:
            raise ChatTemplateError(
                f"the chat template does not compile: {error} (line {error.lineno})"
            ) from None
        self.special_tokens = dict(special_tokens or {})

    def render(
        self,
        messages: list[dict[str, Any]],
        add_generation_prompt: bool = True,
        continue_final_message: bool = False,
        extra: dict[str, Any] | None = None,
    ) -> str:
        """The prompt for `messages`. With `continue_final_message`, the prompt ends inside the last
        message (no end-of-turn after it), so the model continues it, as transformers does."""
        if add_generation_prompt and continue_final_message:
            raise ChatTemplateError("add_generation_prompt and continue_final_message exclude each other")
        context = {**self.special_tokens, **(extra or {})}
        try:
            prompt = self.template.render(
                **context, messages=messages, add_generation_prompt=add_generation_prompt
            )
        except jinja2.TemplateError as error:  # undefined names, sandbox refusals, bad filters
            raise ChatTemplateError(f"the chat template failed: {error}") from None
        if continue_final_message:
            final = messages[-1].get("content") or ""
            end = prompt.rfind(final.strip()) if final.strip() else -1
            if end < 0:
                raise ChatTemplateError(
                    "continue_final_message: the final message's text is not in the rendered prompt"
                )
            prompt = prompt[: end + len(final.strip())]
        return prompt


def template_text(config: dict[str, Any]) -> str | None:
    """tokenizer_config.json's `chat_template`: a string, or a list of named ones ("default")."""
    template = config.get("chat_template")
    if isinstance(template, list):
        named = {entry.get("name"): entry.get("template") for entry in template if isinstance(entry, dict)}
        template = named.get("default")
    return template if isinstance(template, str) and template.strip() else None


def read_option(value: str) -> str:
    """`--chat-template`: a file's path, or the template itself (it has Jinja's `{`)."""
    path = Path(value).expanduser()
    if path.is_file():
        return path.read_text(encoding="utf-8")
    if "{" in value:
        return value
    raise ChatTemplateError(f"--chat-template: {value} is neither a file nor a Jinja template")


def export_chat_template(folder: Path, override: str | None = None) -> ChatTemplate | None:
    """The chat template to serve an export with: `override` (a template's text), else the
    export's own; None when neither exists. Special tokens come from its tokenizer_config.json."""
    config_path = Path(folder) / TOKENIZER_CONFIG_NAME
    config = {}
    if config_path.is_file():
        try:
            config = json.loads(config_path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as error:
            raise ChatTemplateError(f"{config_path} is not readable JSON: {error}") from None
    source = override if override is not None else template_text(config)
    if source is None:
        return None
    return ChatTemplate(source, special_tokens(config))


def special_tokens(config: dict[str, Any]) -> dict[str, str]:
    """bos_token, eos_token, ... as strings (tokenizer_config.json may hold them as AddedToken dicts)."""
    tokens = {}
    for name in SPECIAL_TOKENS:
        value = config.get(name)
        value = value.get("content") if isinstance(value, dict) else value
        if isinstance(value, str):
            tokens[name] = value
    return tokens
