"""Runtime subcommands: generate, classify, tag, qa, embed (onnxruntime, numpy, tokenizers only)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from gptneo_onnx.cli.defaults import DEFAULT_PROMPT
from gptneo_onnx.cli.parsing import add_command, bounded_int, unescape
from gptneo_onnx.cli.provider_flags import add_provider_flags, provider_options


def register(subparsers: argparse._SubParsersAction) -> None:
    generate = add_command(
        subparsers,
        "generate",
        "generate text with a causal-lm export (streams by default)",
        "Generate text. The export folder is -m/--model (default: the bundled model, exported once to "
        "the cache); every positional is a prompt, and several prompts form a left-padded batch. An "
        "argument that names an existing file or folder, or looks like a path, is refused as a prompt "
        "(pass such text with --prompt). Decoding defaults come from the export's sidecar.",
        [
            "gptneo-onnx generate                                   # the bundled model, a Python prompt",
            'gptneo-onnx generate "import os"                       # the bundled model, your prompt',
            'gptneo-onnx generate -m exports/neo "def add(a, b):" --max-new-tokens 50',
            'gptneo-onnx generate -m exports/neo "50256,464" --token-ids --stop "\\n"',
        ],
    )
    generate.add_argument(
        "-m", "--model", metavar="EXPORT", help="export folder (default: the bundled model's cached export)"
    )
    generate.add_argument(
        "prompts", nargs="*", metavar="PROMPT", help=f"prompt text (default: {DEFAULT_PROMPT!r})"
    )
    generate.add_argument(
        "-p", "--prompt", action="append", default=[], metavar="TEXT", dest="literal_prompts",
        help="a prompt taken as is, even when it looks like a path (repeatable; after the positionals)",
    )  # fmt: skip
    _add_decoding_arguments(generate)
    generate.add_argument("--token-ids", action="store_true", help='prompts are token ids: "12,5,99"')
    generate.add_argument("--no-stream", action="store_true", help="print when done instead of streaming")
    generate.add_argument(
        "--prompt-lookup",
        type=int,
        metavar="N",
        dest="prompt_lookup_num_tokens",
        help="prompt-lookup decoding: draft N tokens per step from the context (one prompt)",
    )
    _add_common_arguments(generate)
    generate.set_defaults(handler=run_generate)

    classify = add_command(
        subparsers,
        "classify",
        "sequence classification: labels with scores",
        "Classify texts with a sequence-classification export: each text's labels, best first.",
        ['gptneo-onnx classify exports/sentiment "great movie" "awful movie" --top-k 1'],
    )
    classify.add_argument("export_dir", type=Path, metavar="EXPORT", help="a sequence-classification export")
    classify.add_argument("texts", nargs="+", metavar="TEXT", help="texts to classify (a batch)")
    classify.add_argument(
        "--top-k", type=bounded_int(1), default=None, help="show the k best labels (default: all)"
    )
    _add_common_arguments(classify)
    classify.set_defaults(handler=run_classify)

    tag = add_command(
        subparsers,
        "tag",
        "token classification: per-token labels and entity spans",
        "Tag texts with a token-classification export: entity spans with character offsets.",
        ['gptneo-onnx tag exports/ner "Alice met Bob in Paris."'],
    )
    tag.add_argument("export_dir", type=Path, metavar="EXPORT", help="a token-classification export")
    tag.add_argument("texts", nargs="+", metavar="TEXT", help="texts to tag (a batch)")
    _add_common_arguments(tag)
    tag.set_defaults(handler=run_tag)

    qa = add_command(
        subparsers,
        "qa",
        "extractive question answering over a context",
        "Answer QUESTION with a span of CONTEXT, using a question-answering export.",
        ['gptneo-onnx qa exports/qa "Who met Bob?" "Alice met Bob in Paris." --max-answer-length 10'],
    )
    qa.add_argument("export_dir", type=Path, metavar="EXPORT", help="a question-answering export")
    qa.add_argument("question", metavar="QUESTION", help="the question")
    qa.add_argument("context", metavar="CONTEXT", help="the text that holds the answer")
    qa.add_argument("--max-answer-length", type=bounded_int(1), default=30, help="in tokens")
    _add_common_arguments(qa)
    qa.set_defaults(handler=run_qa)

    embed = add_command(
        subparsers,
        "embed",
        "embeddings from a base export",
        "Embed texts with a base export: one vector per text, pooled over its tokens.",
        ['gptneo-onnx embed exports/base "some text" --pooling last --normalize --json'],
    )
    embed.add_argument("export_dir", type=Path, metavar="EXPORT", help="a base export")
    embed.add_argument("texts", nargs="+", metavar="TEXT", help="texts to embed (a batch)")
    embed.add_argument("--pooling", choices=("mean", "last"), default="mean", help="how tokens are pooled")
    embed.add_argument("--normalize", action="store_true", help="scale vectors to unit length")
    _add_common_arguments(embed)
    embed.set_defaults(handler=run_embed)


def _add_common_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print one JSON object, for scripts")
    add_provider_flags(parser)
    parser.add_argument("--no-verify", action="store_true", help="skip the sha256 checks (faster start)")


def _add_decoding_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("decoding (defaults come from the export's sidecar)")
    group.add_argument("--max-new-tokens", type=bounded_int(1), metavar="N")
    group.add_argument("--min-new-tokens", type=bounded_int(0), metavar="N")
    group.add_argument("--do-sample", action=argparse.BooleanOptionalAction, default=None, help="sample")
    group.add_argument("--temperature", type=float, help="sampling temperature (> 0)")
    group.add_argument("--top-k", type=bounded_int(0), metavar="K", help="0 disables top-k")
    group.add_argument("--top-p", type=float, metavar="P", help="nucleus sampling, in (0, 1]")
    group.add_argument("--repetition-penalty", type=float, metavar="R", help="1.0 = no penalty")
    group.add_argument("--presence-penalty", type=float, metavar="P", help="-P once per generated token")
    group.add_argument("--frequency-penalty", type=float, metavar="F", help="-F per occurrence")
    group.add_argument("--num-beams", type=bounded_int(1), metavar="N", help="beam search with N beams")
    group.add_argument("--length-penalty", type=float, help="beam search: exponent on the length")
    group.add_argument("--early-stopping", choices=("true", "false", "never"), help="beam search stop rule")
    group.add_argument("--num-return-sequences", type=bounded_int(1), metavar="N", help="per prompt")
    group.add_argument("--seed", type=bounded_int(0), help="seed for sampling")
    group.add_argument(
        "--stop", action="append", dest="stop_strings", metavar="TEXT", type=unescape,
        help=r"stop at TEXT (repeatable; \n \t \xHH escapes are read)",
    )  # fmt: skip
    group.add_argument(
        "--eos-token-id", type=bounded_int(0), action="append", metavar="ID", help="override the EOS id(s)"
    )
    group.add_argument(
        "--logit-bias", action="append", type=token_bias, metavar="ID=BIAS",
        help="add BIAS to token ID's logit before the other processors (repeatable; -100 bans it)",
    )  # fmt: skip
    group.add_argument("--truncate", action="store_true", help="keep the last tokens of too-long prompts")


def token_bias(text: str) -> tuple[int, float]:
    """`--logit-bias ID=BIAS`, e.g. 50256=-100."""
    token, _, bias = text.partition("=")
    try:
        return int(token), float(bias)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected ID=BIAS such as 50256=-100, got {text!r}") from None


def _load(args: argparse.Namespace, export_dir: Path | str, model_class: Any) -> Any:
    return model_class.load(export_dir, options=provider_options(args), verify_hashes=not args.no_verify)


def _print_json(payload: dict[str, Any]) -> None:
    print(json.dumps(payload, ensure_ascii=False, indent=2))


def _decoding_options(args: argparse.Namespace) -> dict[str, Any]:
    early = {"true": True, "false": False, "never": "never", None: None}[args.early_stopping]
    names = (
        "max_new_tokens", "min_new_tokens", "do_sample", "temperature", "top_k", "top_p",
        "repetition_penalty", "presence_penalty", "frequency_penalty", "num_beams", "length_penalty",
        "num_return_sequences", "seed", "stop_strings",
        "eos_token_id",
    )  # fmt: skip
    options = {name: getattr(args, name) for name in names}
    options.update(early_stopping=early, truncate=args.truncate or None)
    options["prompt_lookup_num_tokens"] = getattr(args, "prompt_lookup_num_tokens", None)
    options["logit_bias"] = dict(args.logit_bias) if args.logit_bias else None
    return options


def _parse_prompt(text: str, token_ids: bool) -> str | list[int]:
    if not token_ids:
        return text
    from gptneo_onnx.runtime.errors import InputError

    try:
        ids = [int(part) for part in text.replace(",", " ").split()]
    except ValueError as error:
        raise InputError(f"--token-ids prompts must be integers separated by commas, got {text!r}") from error
    if not ids:
        raise InputError(f'--token-ids prompt {text!r} holds no token id; give ids such as "12,5,99"')
    return ids


def run_generate(args: argparse.Namespace) -> int:
    from gptneo_onnx.cli.defaults import default_export_dir
    from gptneo_onnx.cli.prompts import refuse_path_like
    from gptneo_onnx.runtime import CausalLM

    for prompt in args.prompts:
        refuse_path_like(prompt)
    prompts = [*args.prompts, *args.literal_prompts] or [DEFAULT_PROMPT]
    prompts = [_parse_prompt(prompt, args.token_ids) for prompt in prompts]
    export_dir = args.model if args.model is not None else default_export_dir(progress=not args.json)
    model = _load(args, export_dir, CausalLM)
    config = model.generation_config(**_decoding_options(args))
    streamable = len(prompts) == 1 and config.num_beams == 1 and config.num_return_sequences == 1
    if not args.json and not args.no_stream and streamable and model.tokenizer is not None:
        pieces = model.stream(prompts[0], config)  # checks the prompt before it is echoed
        if isinstance(prompts[0], str):
            sys.stdout.write(prompts[0])  # echo the prompt so the completion reads in context
        for piece in pieces:
            sys.stdout.write(piece)
            sys.stdout.flush()
        sys.stdout.write("\n")
        return 0
    result = model.generate(prompts, config)
    if args.json:
        _print_json(
            {
                "provider": model.provider,
                "sequences": [
                    {
                        "prompt_index": result.prompt_index[i],
                        "text": result.texts[i] if result.texts is not None else None,
                        "token_ids": result.sequences[i],
                        "finish_reason": result.finish_reasons[i],
                        "score": result.scores[i] if result.scores is not None else None,
                    }
                    for i in range(len(result.sequences))
                ],
            }
        )
        return 0
    for i, tokens in enumerate(result.sequences):
        text = result.texts[i] if result.texts is not None else " ".join(map(str, tokens))
        prefix = f"[{result.prompt_index[i]}] " if len(result.sequences) > 1 else ""
        print(f"{prefix}{text}")
    return 0


def run_classify(args: argparse.Namespace) -> int:
    from gptneo_onnx.runtime import SequenceClassifier

    model = _load(args, args.export_dir, SequenceClassifier)
    results = model.classify(args.texts, top_k=args.top_k)
    if args.json:
        _print_json(
            {
                "provider": model.provider,
                "results": [{"text": t, "labels": r} for t, r in zip(args.texts, results)],
            }
        )
        return 0
    for text, labels in zip(args.texts, results):
        print(f"{text!r}: " + ", ".join(f"{item['label']} {item['score']:.4f}" for item in labels))
    return 0


def run_tag(args: argparse.Namespace) -> int:
    from gptneo_onnx.runtime import TokenClassifier

    model = _load(args, args.export_dir, TokenClassifier)
    results = model.tag(args.texts)
    if args.json:
        _print_json(
            {"provider": model.provider, "results": [{"text": t, **r} for t, r in zip(args.texts, results)]}
        )
        return 0
    for text, result in zip(args.texts, results):
        print(repr(text))
        for entity in result["entities"]:
            span = f"[{entity['start']}:{entity['end']}]"
            print(f"  {entity['label']:<12} {entity['text']!r} {span} {entity['score']:.4f}")
        if not result["entities"]:
            print("  (no entities)")
    return 0


def run_qa(args: argparse.Namespace) -> int:
    from gptneo_onnx.runtime import QuestionAnswerer

    model = _load(args, args.export_dir, QuestionAnswerer)
    answer = model.answer(args.question, args.context, max_answer_length=args.max_answer_length)[0]
    if args.json:
        _print_json({"provider": model.provider, "question": args.question, **answer})
        return 0
    print(f"{answer['answer']!r} [{answer['start']}:{answer['end']}] score {answer['score']:.4f}")
    return 0


def run_embed(args: argparse.Namespace) -> int:
    from gptneo_onnx.runtime import Embedder

    model = _load(args, args.export_dir, Embedder)
    vectors = model.embed(args.texts, pooling=args.pooling, normalize=args.normalize)
    if args.json:
        _print_json({"provider": model.provider, "pooling": args.pooling, "embeddings": vectors.tolist()})
        return 0
    for text, vector in zip(args.texts, vectors):
        head = ", ".join(f"{value:.4f}" for value in vector[:6])
        print(f"{text!r}: dim {vector.shape[0]} [{head}{', ...' if vector.shape[0] > 6 else ''}]")
    return 0
