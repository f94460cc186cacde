"""/v1/chat/completions: chat templates rendered as transformers renders them, carried from a
checkpoint into its export, served to the official `openai` client and checked against the
runtime's own `generate()` on the prompt transformers renders; and best_of on /v1/completions."""

from __future__ import annotations

import json
import subprocess

import httpx
import pytest

pytest.importorskip("fastapi")
openai = pytest.importorskip("openai")
transformers = pytest.importorskip("transformers")
from runtime_helpers import export_tiny, train_tokenizer  # noqa: E402
from serve_helpers import app_server, cli_command, cli_server, export_tiny_lm  # noqa: E402

from gptneo_onnx.runtime import CausalLM  # noqa: E402
from gptneo_onnx.serve.api import ServerState  # noqa: E402
from gptneo_onnx.serve.chat_template import ChatTemplate, ChatTemplateError, special_tokens  # noqa: E402
from gptneo_onnx.serve.engine import EngineLimits  # noqa: E402

NAME = "tiny-chat"
# ChatML, with a system default, the tojson filter and loop controls.
CHATML = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}<|im_start|>system\nBe brief.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
# Roles must alternate (raise_exception), `{% generation %}` marks the assistant's turns, `break`.
STRICT = (
    "{% for message in messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if message['role'] == 'user' %}### User: {{ message['content'] | trim }}\n"
    "{% else %}### Assistant: {% generation %}{{ message['content'] }}{% endgeneration %}{{ eos_token }}\n"
    "{% endif %}{% if message['content'] == 'STOP' %}{% break %}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}### Assistant:{% endif %}{{ {'n': messages | length} | tojson }}"
)
# Zephyr's layout: one block tag per line, indented (trim_blocks and lstrip_blocks matter here).
ZEPHYR = """{% for message in messages %}
    {% if message['role'] == 'user' %}
{{ '<|user|>\n' + message['content'] + eos_token }}
    {% elif message['role'] == 'system' %}
{{ '<|system|>\n' + message['content'] + eos_token }}
    {% elif message['role'] == 'assistant' %}
{{ '<|assistant|>\n'  + message['content'] + eos_token }}
    {% endif %}
    {% if loop.last and add_generation_prompt %}
{{ '<|assistant|>' }}
    {% endif %}
{% endfor %}"""
CONVERSATIONS = [
    [{"role": "user", "content": "Hello there"}],
    [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Straße? 東京?"}],
    [
        {"role": "user", "content": "  Name a colour.  "},
        {"role": "assistant", "content": "Blue"},
        {"role": "user", "content": "Another"},
    ],
]


def transformers_tokenizer(tokenizer_file, template: str):
    return transformers.PreTrainedTokenizerFast(
        tokenizer_file=str(tokenizer_file), bos_token="<s>", eos_token="</s>", pad_token="<pad>",
        chat_template=template,
    )  # fmt: skip


@pytest.fixture(scope="module")
def tokenizer_file(tmp_path_factory):
    return train_tokenizer(tmp_path_factory.mktemp("chat-tokenizer") / "tokenizer.json")


@pytest.mark.parametrize("template", [CHATML, STRICT, ZEPHYR], ids=["chatml", "strict", "zephyr"])
@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_templates_render_as_transformers_renders_them(tokenizer_file, template, add_generation_prompt):
    reference = transformers_tokenizer(tokenizer_file, template)
    ours = ChatTemplate(template, special_tokens(reference.special_tokens_map))
    for messages in CONVERSATIONS:
        if template is STRICT and messages[0]["role"] == "system":
            continue
        expected = reference.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=add_generation_prompt
        )
        assert ours.render(messages, add_generation_prompt) == expected
    # continue_final_message: the prompt stops inside the assistant's last message
    partial = [
        *CONVERSATIONS[2][:2],
        {"role": "user", "content": "Go"},
        {"role": "assistant", "content": "Red and"},
    ]
    expected = reference.apply_chat_template(
        partial, tokenize=False, add_generation_prompt=False, continue_final_message=True
    )
    assert ours.render(partial, False, continue_final_message=True) == expected
    assert expected.endswith("Red and")


def test_template_errors_are_chat_template_errors(tokenizer_file):
    with pytest.raises(ChatTemplateError, match="does not compile"):
        ChatTemplate("{% if messages %}never closed")
    with pytest.raises(ChatTemplateError, match="roles must alternate"):
        ChatTemplate(STRICT).render([{"role": "assistant", "content": "hi"}])
    sandboxed = ChatTemplate("{{ messages.__class__.__mro__ }}")  # the sandbox refuses the escape
    with pytest.raises(ChatTemplateError, match="failed"):
        sandboxed.render([{"role": "user", "content": "x"}])


@pytest.fixture(scope="module")
def chat_export(tmp_path_factory):
    """A checkpoint whose tokenizer folder has a chat template (as transformers saves it), exported:
    the export carries the template."""
    root = tmp_path_factory.mktemp("chat-export")
    (root / "checkpoint").mkdir()
    tokenizer = train_tokenizer(root / "checkpoint" / "tokenizer.json")
    settings = {"tokenizer_class": "GPT2Tokenizer", "chat_template": CHATML, "bos_token": "<s>"}
    (root / "checkpoint" / "tokenizer_config.json").write_text(json.dumps(settings))
    return export_tiny(
        "causal-lm",
        root / "export",
        tokenizer,
        export_options={"validate": False},
        vocab_size=320,
        max_position_embeddings=512,
    )  # fmt: skip  (transformers' model, the export folder)


@pytest.fixture(scope="module")
def model(chat_export):
    return CausalLM.load(chat_export[1], intra_op_threads=1)


@pytest.fixture(scope="module")
def reference(chat_export):
    """transformers' own tokenizer loaded from the export folder: its chat template renders the
    prompts the server must build."""
    return transformers.AutoTokenizer.from_pretrained(str(chat_export[1]))


@pytest.fixture(scope="module")
def server(chat_export):
    folder = chat_export[1]
    state = ServerState(
        lambda: CausalLM.load(folder, intra_op_threads=1), NAME, EngineLimits(max_concurrent=8)
    )
    with app_server(state) as url:
        yield url


def client(url: str):
    return openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=60)


def prompt_ids(reference, messages) -> list[int]:
    return reference.apply_chat_template(messages, tokenize=True, add_generation_prompt=True)


def test_the_export_carries_the_checkpoints_chat_template(chat_export, reference):
    assert json.loads((chat_export[1] / "tokenizer_config.json").read_text())["chat_template"] == CHATML
    assert reference.chat_template == CHATML


def test_chat_completion_equals_generate_on_the_rendered_prompt(server, model, reference):
    for messages in CONVERSATIONS:
        ids = prompt_ids(reference, messages)
        expected = model.generate(ids, max_new_tokens=20, do_sample=False)
        answer = client(server).chat.completions.create(
            model=NAME, messages=messages, max_completion_tokens=20, temperature=0
        )
        assert answer.object == "chat.completion"
        [choice] = answer.choices
        assert choice.message.role == "assistant"
        assert choice.message.content == expected.texts[0]
        assert choice.finish_reason == ("length" if expected.finish_reasons[0] == "length" else "stop")
        assert answer.usage.prompt_tokens == len(ids)
        assert answer.usage.completion_tokens == len(expected.sequences[0])


def test_streamed_chat_completion_equals_the_whole_answer(server, model, reference):
    messages = CONVERSATIONS[1]
    expected = model.generate(prompt_ids(reference, messages), max_new_tokens=24, do_sample=False)
    stream = client(server).chat.completions.create(
        model=NAME, messages=messages, max_tokens=24, temperature=0, stream=True,
        stream_options={"include_usage": True},
    )  # fmt: skip
    chunks = list(stream)
    assert all(chunk.object == "chat.completion.chunk" for chunk in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(choice.delta.content or "" for chunk in chunks for choice in chunk.choices)
    assert text == expected.texts[0]
    reasons = [choice.finish_reason for chunk in chunks for choice in chunk.choices if choice.finish_reason]
    assert reasons == ["length" if expected.finish_reasons[0] == "length" else "stop"]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == len(expected.sequences[0])


def test_chat_sampling_n_and_stop_follow_the_runtime(server, model, reference):
    """n=2 with a seed: choice i samples as generate() with seed + i; a stop string cuts as the
    runtime cuts."""
    messages = CONVERSATIONS[0]
    ids = prompt_ids(reference, messages)
    answer = client(server).chat.completions.create(
        model=NAME, messages=messages, max_tokens=16, temperature=0.9, top_p=0.95, seed=3, n=2
    )
    for choice in answer.choices:
        alone = model.generate(
            ids,
            max_new_tokens=16,
            do_sample=True,
            temperature=0.9,
            top_p=0.95,
            top_k=0,
            seed=3 + choice.index,
        )
        assert choice.message.content == alone.texts[0]
    greedy = model.generate(ids, max_new_tokens=30, do_sample=False).texts[0]
    stop = greedy[3:5]
    cut = client(server).chat.completions.create(
        model=NAME, messages=messages, max_tokens=30, temperature=0, stop=[stop]
    )
    expected = model.generate(ids, max_new_tokens=30, do_sample=False, stop_strings=[stop])
    assert cut.choices[0].message.content == expected.texts[0]
    assert cut.choices[0].finish_reason == "stop"


def test_chat_logprobs_are_the_models_and_bytes_are_the_tokens(server, model, chat_export, reference):
    """The chosen tokens' logprobs and the top 3 equal a float64 log-softmax of transformers'
    logits on the same ids; each entry's bytes are its token's (GPT-2's byte table, from
    transformers), so a character split across tokens survives."""
    import torch
    from transformers.models.gpt2.tokenization_gpt2 import bytes_to_unicode

    hf_model, _ = chat_export
    messages = CONVERSATIONS[1]
    ids = prompt_ids(reference, messages)
    answer = client(server).chat.completions.create(
        model=NAME, messages=messages, max_tokens=12, temperature=0, logprobs=True, top_logprobs=3,
        extra_body={"min_tokens": 12},
    )  # fmt: skip
    content = answer.choices[0].logprobs.content
    greedy = model.generate(ids, max_new_tokens=12, min_new_tokens=12, do_sample=False)
    assert answer.choices[0].message.content == greedy.texts[0]
    generated = [int(token) for token in greedy.sequences[0]]
    with torch.no_grad():
        logits = hf_model(torch.tensor([ids + generated])).logits[0].double()
    expected = torch.log_softmax(logits, -1)[len(ids) - 1 : -1]
    assert len(content) == len(generated) == 12
    byte_of = {character: byte for byte, character in bytes_to_unicode().items()}
    for entry, token, row in zip(content, generated, expected):
        assert entry.logprob == pytest.approx(row[token].item(), abs=1e-4)
        best = torch.topk(row, 3)
        assert [alternative.logprob for alternative in entry.top_logprobs] == pytest.approx(
            best.values.tolist(), abs=1e-4
        )
        assert entry.bytes == [byte_of[character] for character in reference.convert_ids_to_tokens(token)]


def test_chat_refusals_are_openai_errors(server, tmp_path_factory):
    def post(body):
        return httpx.post(f"{server}/v1/chat/completions", json={"model": NAME, **body}, timeout=30)

    user = [{"role": "user", "content": "hi"}]
    cases = [
        ({"messages": user, "tools": [{"type": "function", "function": {"name": "f"}}]}, "tools"),
        ({"messages": user, "response_format": {"type": "json_object"}}, "response_format"),
        (
            {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
            None,
        ),
        ({"messages": []}, None),
        ({"messages": user, "top_logprobs": 2}, "top_logprobs"),
        ({"messages": user, "top_logprobs": 21, "logprobs": True}, None),
        ({"messages": user, "continue_final_message": True, "add_generation_prompt": False}, None),
        ({"messages": user, "max_tokens": 4000}, "prompt"),
    ]
    for body, param in cases:
        response = post(body)
        assert response.status_code == 400, (body, response.text)
        error = response.json()["error"]
        assert error["message"] and error["type"]
        if param is not None:
            assert error["param"] == param, (body, error)
    text_parts = post(
        {
            "messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}]}],
            "max_tokens": 3,
            "temperature": 0,
        }
    )
    plain = post({"messages": user, "max_tokens": 3, "temperature": 0})
    assert text_parts.json()["choices"][0]["message"] == plain.json()["choices"][0]["message"]


def test_an_export_without_a_template_or_a_tokenizer_answers_404(tmp_path_factory):
    base = export_tiny_lm(tmp_path_factory.getbasetemp() / "serve-lm")
    bare = export_tiny(
        "causal-lm", tmp_path_factory.mktemp("bare") / "export", export_options={"validate": False}
    )[1]
    for folder, template, says in ((base, None, "--chat-template"), (bare, CHATML, "tokenizer.json")):
        load = lambda folder=folder: CausalLM.load(folder, intra_op_threads=1)
        state = ServerState(load, NAME, EngineLimits(max_concurrent=1), chat_template=template)
        with app_server(state) as url:
            body = {"messages": [{"role": "user", "content": "x"}]}
            response = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=30)
        assert response.status_code == 404
        assert says in response.json()["error"]["message"]


def test_cli_chat_template_serves_a_base_export(tmp_path_factory):
    """`serve --chat-template FILE` on an export without one: prompts as transformers renders
    them with that template, the template's raise_exception as a 400; a broken template is one
    error line before anything listens."""
    root = tmp_path_factory.getbasetemp() / "serve-lm"
    base = export_tiny_lm(root)
    template = tmp_path_factory.mktemp("template") / "strict.jinja"
    template.write_text(STRICT)
    reference = transformers_tokenizer(root / "tokenizer.json", STRICT)
    messages = CONVERSATIONS[2]
    ids = reference.apply_chat_template(messages, tokenize=True, add_generation_prompt=True)
    expected = CausalLM.load(base, intra_op_threads=1).generate(ids, max_new_tokens=8, do_sample=False)
    with cli_server(str(base), "--port", "0", "--threads", "1", "--chat-template", str(template)) as (_, url):
        answer = client(url).chat.completions.create(
            model=base.name, messages=messages, max_tokens=8, temperature=0
        )
        assert answer.choices[0].message.content == expected.texts[0]
        assert answer.usage.prompt_tokens == len(ids)
        with pytest.raises(openai.BadRequestError, match="roles must alternate"):
            client(url).chat.completions.create(model=base.name, messages=messages[1:], max_tokens=2)
    broken = subprocess.run(
        [*cli_command(), "serve", str(base), "--port", "0", "--chat-template", "{% for m in messages %}"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert broken.returncode == 2
    errors = [line for line in broken.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and errors[0].startswith("error: the chat template does not compile")
    assert "Traceback" not in broken.stderr


def test_best_of_returns_the_most_likely_candidates(server, model, chat_export):
    """best_of=4, n=2 with a seed: the answer is the two of the four seeded candidates (seed + i,
    each as generate() samples it) whose tokens have the highest summed log-probability, best
    first; usage counts all four."""
    import torch

    hf_model, _ = chat_export
    prompt = "Once upon a time"
    sampling = dict(max_new_tokens=10, min_new_tokens=10, do_sample=True, temperature=1.0, top_k=0)
    candidates = [model.generate(prompt, seed=11 + i, **sampling) for i in range(4)]
    scored = []
    for result in candidates:
        prompt_ids = model.tokenizer.encode(prompt).ids
        ids = prompt_ids + [int(token) for token in result.sequences[0]]
        with torch.no_grad():  # the model's raw log-probabilities of the sampled tokens
            logprobs = torch.log_softmax(hf_model(torch.tensor([ids])).logits[0].double(), -1)
        total = sum(
            logprobs[position - 1, ids[position]].item() for position in range(len(prompt_ids), len(ids))
        )
        scored.append((total, result.texts[0]))
    best = [text for _, text in sorted(scored, reverse=True)[:2]]
    answer = client(server).completions.create(
        model=NAME, prompt=prompt, max_tokens=10, temperature=1.0, seed=11, n=2, best_of=4,
        extra_body={"min_tokens": 10},
    )  # fmt: skip
    assert [choice.text for choice in sorted(answer.choices, key=lambda c: c.index)] == best
    assert answer.usage.completion_tokens == 40
    for body in ({"best_of": 1, "n": 2}, {"best_of": 3, "stream": True}, {"best_of": 17}):
        response = httpx.post(f"{server}/v1/completions", json={"prompt": prompt, **body}, timeout=30)
        assert response.status_code == 400, body


def test_checkpoint_templates_in_either_place_and_named_ones(tmp_path, tokenizer_file):
    """A checkpoint's chat_template.jinja wins over its tokenizer_config.json's (as transformers
    saves them); a list of named templates serves `default`; the export's tokenizer_config.json
    then gives transformers the same template."""
    from gptneo_onnx.export.sidecar import checkpoint_chat_template
    from gptneo_onnx.serve.chat_template import export_chat_template

    named = [{"name": "tool_use", "template": STRICT}, {"name": "default", "template": ZEPHYR}]
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": named}))
    assert checkpoint_chat_template(tmp_path) == named
    (tmp_path / "export").mkdir()
    settings = {"chat_template": named, "eos_token": {"content": "</s>", "special": True}}
    (tmp_path / "export" / "tokenizer_config.json").write_text(json.dumps(settings))
    served = export_chat_template(tmp_path / "export")
    expected = transformers_tokenizer(tokenizer_file, ZEPHYR).apply_chat_template(
        CONVERSATIONS[1], tokenize=False
    )
    assert served.render(CONVERSATIONS[1], add_generation_prompt=False) == expected
    (tmp_path / "chat_template.jinja").write_text(CHATML)
    assert checkpoint_chat_template(tmp_path) == CHATML
    assert checkpoint_chat_template(tmp_path / "missing") is None
