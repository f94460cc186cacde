"""Runtime subcommands: generate, classify, tag, qa, embed (onnxruntime, numpy, tokenizers only)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any


def register(subparsers: argparse._SubParsersAction) -> None:
    generate = subparsers.add_parser(
        "generate",
        help="generate text with a causal-lm export (streams by default)",
        description='gptneo-onnx generate [EXPORT_DIR] "prompt" ["prompt" ...]. With one argument, '
        "the bundled default model answers it. Several prompts form a left-padded batch.",
    )
    generate.add_argument(
        "inputs",
        nargs="*",
        metavar="[EXPORT_DIR] PROMPT",
        help="export folder, then prompts (default: the bundled model and a Python prompt)",
    )
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

    classify = subparsers.add_parser("classify", help="sequence classification: labels with scores")
    classify.add_argument("export_dir", type=Path)
    classify.add_argument("texts", nargs="+")
    classify.add_argument("--top-k", type=int, default=None, help="show the k best labels (default all)")
    _add_common_arguments(classify)
    classify.set_defaults(handler=run_classify)

    tag = subparsers.add_parser("tag", help="token classification: per-token labels and entity spans")
    tag.add_argument("export_dir", type=Path)
    tag.add_argument("texts", nargs="+")
    _add_common_arguments(tag)
    tag.set_defaults(handler=run_tag)

    qa = subparsers.add_parser("qa", help="extractive question answering over a context")
    qa.add_argument("export_dir", type=Path)
    qa.add_argument("question")
    qa.add_argument("context")
    qa.add_argument("--max-answer-length", type=int, default=30, help="in tokens (default 30)")
    _add_common_arguments(qa)
    qa.set_defaults(handler=run_qa)

    embed = subparsers.add_parser("embed", help="embeddings from a base export")
    embed.add_argument("export_dir", type=Path)
    embed.add_argument("texts", nargs="+")
    embed.add_argument("--pooling", choices=("mean", "last"), default="mean")
    embed.add_argument("--normalize", action="store_true", help="scale vectors to unit length")
    _add_common_arguments(embed)
    embed.set_defaults(handler=run_embed)


def _add_common_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print one JSON object, for scripts")
    group = parser.add_argument_group("execution provider")
    group.add_argument("--provider", default="auto", help="auto (TensorRT > CUDA > CPU), cpu, cuda, tensorrt")
    group.add_argument("--device-id", type=int, default=0)
    group.add_argument("--trt-fp16", action="store_true", help="TensorRT: build fp16 engines")
    group.add_argument("--trt-engine-cache", type=Path, default=None, help="TensorRT: engine cache folder")
    group.add_argument("--threads", type=int, default=None, help="intra-op threads (default: onnxruntime's)")
    group.add_argument(
        "--optimization-level", choices=("disable", "basic", "extended", "all"), default="all",
        help="onnxruntime graph optimization level",
    )  # fmt: skip
    group.add_argument("--no-verify", action="store_true", help="skip the sha256 checks (faster start)")


def _add_decoding_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("decoding (defaults come from the export's manifest)")
    group.add_argument("--max-new-tokens", type=int)
    group.add_argument("--min-new-tokens", type=int)
    group.add_argument("--do-sample", action=argparse.BooleanOptionalAction, default=None)
    group.add_argument("--temperature", type=float)
    group.add_argument("--top-k", type=int)
    group.add_argument("--top-p", type=float)
    group.add_argument("--repetition-penalty", type=float)
    group.add_argument("--num-beams", type=int)
    group.add_argument("--length-penalty", type=float)
    group.add_argument("--early-stopping", choices=("true", "false", "never"))
    group.add_argument("--num-return-sequences", type=int)
    group.add_argument("--seed", type=int)
    group.add_argument("--stop", action="append", dest="stop_strings", metavar="TEXT", help="repeatable")
    group.add_argument("--eos-token-id", type=int, action="append", help="override the EOS id(s)")
    group.add_argument("--truncate", action="store_true", help="keep the last tokens of too-long prompts")


def _load(args: argparse.Namespace, export_dir: Path | str, model_class: Any) -> Any:
    return model_class.load(
        export_dir,
        provider=args.provider,
        device_id=args.device_id,
        trt_fp16=args.trt_fp16,
        trt_engine_cache_dir=args.trt_engine_cache,
        intra_op_threads=args.threads,
        graph_optimization_level=args.optimization_level,
        verify_hashes=not args.no_verify,
    )


def _print_json(payload: dict[str, Any]) -> None:
    print(json.dumps(payload, ensure_ascii=False, indent=2))


def _decoding_options(args: argparse.Namespace) -> dict[str, Any]:
    early = {"true": True, "false": False, "never": "never", None: None}[args.early_stopping]
    names = (
        "max_new_tokens", "min_new_tokens", "do_sample", "temperature", "top_k", "top_p",
        "repetition_penalty", "num_beams", "length_penalty", "num_return_sequences", "seed", "stop_strings",
        "eos_token_id",
    )  # fmt: skip
    options = {name: getattr(args, name) for name in names}
    options.update(early_stopping=early, truncate=args.truncate or None)
    options["prompt_lookup_num_tokens"] = getattr(args, "prompt_lookup_num_tokens", None)
    return options


def _parse_prompt(text: str, token_ids: bool) -> str | list[int]:
    if not token_ids:
        return text
    from gptneo_onnx.runtime.errors import InputError

    try:
        return [int(part) for part in text.replace(",", " ").split()]
    except ValueError as error:
        raise InputError(f"--token-ids prompts must be integers separated by commas, got {text!r}") from error


def run_generate(args: argparse.Namespace) -> int:
    from gptneo_onnx.cli.defaults import DEFAULT_PROMPT, default_export_dir
    from gptneo_onnx.runtime import CausalLM

    inputs = list(args.inputs)
    if inputs and (Path(inputs[0]) / "gptneo_onnx.json").is_file():
        export_dir, prompts = inputs[0], inputs[1:] or [DEFAULT_PROMPT]
    elif len(inputs) <= 1:
        export_dir, prompts = default_export_dir(), inputs or [DEFAULT_PROMPT]
    else:
        export_dir, prompts = inputs[0], inputs[1:]
    model = _load(args, export_dir, CausalLM)
    prompts = [_parse_prompt(prompt, args.token_ids) for prompt in prompts]
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
