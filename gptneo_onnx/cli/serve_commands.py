"""`gptneo-onnx serve` (an OpenAI-compatible server; the `serve` extra, `ray` for --replicas) and
`gptneo-onnx bench-serve` (the serving benchmark)."""

from __future__ import annotations

import argparse
import sys
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING

from gptneo_onnx.cli.parsing import add_command, bounded_int
from gptneo_onnx.cli.provider_flags import add_provider_flags, provider_options

if TYPE_CHECKING:  # the serve extra (FastAPI) may be missing: imported when serving
    from gptneo_onnx.serve.access import Access


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = add_command(
        subparsers,
        "serve",
        "serve an export over HTTP: OpenAI /v1/completions with continuous batching, metrics",
        "Serve an export over HTTP (OpenAI-compatible). One replica in this process, or N replicas on "
        "Ray Serve with --replicas / --max-replicas / --ray-address. Binds 127.0.0.1 unless --host "
        "says otherwise.",
        [
            "gptneo-onnx serve                                  # the bundled model on 127.0.0.1:8000",
            "gptneo-onnx serve exports/neo --max-concurrent 8 --threads 2",
            "gptneo-onnx serve exports/neo --replicas 2 --threads 1    # Ray Serve (the ray extra)",
            "gptneo-onnx serve exports/neo --max-replicas 4 --threads 1  # Ray autoscales 1-4 replicas",
        ],
    )
    parser.add_argument(
        "export_dir", nargs="?", type=Path, help="the export folder (default: the bundled model's export)"
    )
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    parser.add_argument(
        "--port", type=bounded_int(0, 65535), default=8000, help="port (default 8000; 0 picks a free one)"
    )
    parser.add_argument("--model-name", help="the model id clients send (default: the folder's name)")
    parser.add_argument(
        "--chat-template",
        help="a Jinja chat template (a file, or the template itself) for /v1/chat/completions "
        "(default: the export's own, from its checkpoint; base GPT-Neo has none)",
    )
    parser.add_argument(
        "--max-concurrent", type=bounded_int(1, 1024), default=8, help="requests decoded at once (slots)"
    )
    parser.add_argument(
        "--max-queue", type=bounded_int(0), default=64, help="requests waiting for a slot; more get 429"
    )
    parser.add_argument(
        "--max-input-tokens", type=bounded_int(1), help="longest prompt accepted (default: the context)"
    )
    parser.add_argument(
        "--max-total-tokens", type=bounded_int(1), help="prompt + max_tokens limit (default: the context)"
    )
    parser.add_argument("--request-timeout", type=float, help="seconds a request may take (default: none)")
    parser.add_argument(
        "--shutdown-timeout", type=float, default=30.0, help="seconds SIGTERM waits for running requests"
    )
    parser.add_argument(
        "--policy", choices=("continuous", "static", "sequential", "continuous-padded"),
        default="continuous",
        help="batching: continuous (default), static batches, one request at a time, or continuous "
        "with rows left-padded to the longest (the layout of exports without ragged rows)",
    )  # fmt: skip
    parser.add_argument(
        "--replicas", type=bounded_int(1, 64), help="run N replicas on Ray Serve (the ray extra)"
    )
    parser.add_argument(
        "--max-replicas", type=bounded_int(1, 64),
        help="let Ray Serve autoscale from --replicas (default 1) up to M replicas as requests queue",
    )  # fmt: skip
    parser.add_argument("--ray-address", help="join this Ray cluster (e.g. auto or ray://head:10001)")
    parser.add_argument(
        "--api-key",
        help="require `Authorization: Bearer KEY` on every route but /health and /metrics (default: "
        "$GPTNEO_ONNX_API_KEY; "
        "the environment keeps the key out of the process list)",
    )
    parser.add_argument(
        "--allowed-origins",
        help="comma-separated origins a browser may call from (CORS), or * for any (default: none)",
    )
    add_provider_flags(parser)  # --threads is per replica
    parser.set_defaults(handler=run_serve)

    bench = subparsers.add_parser(
        "bench-serve",
        help="drive the server over HTTP: continuous vs static batching vs one request at a time",
        add_help=False,
    )
    bench.set_defaults(handler=run_bench_serve, passthrough=[])


class ServeSetupError(Exception):
    """A missing extra, a bad option or a port that can't be bound: one `error:` line, exit 2."""


def run_serve(args: argparse.Namespace) -> int:
    try:
        return _serve(args)
    except (ServeSetupError, OSError) as error:
        if isinstance(error, FileNotFoundError):
            raise  # the CLI's own handler reports it
        print(f"error: {error}", file=sys.stderr)
        return 2


def _serve(args: argparse.Namespace) -> int:
    try:  # FastAPI and uvicorn (the serve extra) come in with these
        from gptneo_onnx.serve.engine import EngineLimits
        from gptneo_onnx.serve.server import serve_forever
    except ImportError as error:
        raise ServeSetupError(
            f"serving needs the serve extra: pip install 'gptneo-onnx[serve]' ({error})"
        ) from None
    from gptneo_onnx.runtime import load_manifest
    from gptneo_onnx.runtime.providers import check_options

    for name in ("max_concurrent", "max_queue", "replicas", "max_replicas", "threads"):
        value, least = getattr(args, name), 0 if name == "max_queue" else 1
        if value is not None and value < least:
            raise ServeSetupError(f"--{name.replace('_', '-')} must be >= {least}, got {value}")
    options = provider_options(args)
    check_options(options)  # threads or a device id out of range: one error line, before any export
    if args.export_dir is None:
        from gptneo_onnx.cli.defaults import default_export_dir

        args.export_dir = default_export_dir()
    load_manifest(args.export_dir)  # a bad folder is one error line, before anything listens
    model_name = args.model_name or args.export_dir.resolve().name
    chat_template = chat_template_from(args)
    limits = EngineLimits(
        max_concurrent=args.max_concurrent,
        max_queue=args.max_queue,
        max_input_tokens=args.max_input_tokens,
        max_total_tokens=args.max_total_tokens,
        request_timeout=args.request_timeout,
    )
    load_options = asdict(options)  # plain keywords of Model.load, sent as is to Ray replicas
    access = access_from(args)
    if args.max_replicas is not None and args.max_replicas < (args.replicas or 1):
        least = args.replicas or 1
        raise ServeSetupError(f"--max-replicas ({args.max_replicas}) must be >= --replicas ({least})")
    if args.replicas is not None or args.max_replicas is not None or args.ray_address is not None:
        try:
            from gptneo_onnx.serve.ray_app import run_on_ray
        except ImportError as error:
            raise ServeSetupError(
                "--replicas, --max-replicas and --ray-address need the ray extra: "
                f"pip install 'gptneo-onnx[ray]' ({error})"
            ) from None

        return run_on_ray(
            args.export_dir, model_name, limits, args.policy, load_options,
            replicas=args.replicas or 1, address=args.ray_address, host=args.host, port=args.port,
            shutdown_timeout=args.shutdown_timeout, access=access, max_replicas=args.max_replicas,
            chat_template=chat_template,
        )  # fmt: skip
    from gptneo_onnx.runtime import Model
    from gptneo_onnx.serve.api import ServerState

    folder = args.export_dir
    state = ServerState(
        lambda: Model.load(folder, **load_options), model_name, limits, args.policy, chat_template
    )
    return serve_forever(state, args.host, args.port, args.shutdown_timeout, access)


def chat_template_from(args: argparse.Namespace) -> str | None:
    """--chat-template's text, compiled once here so a broken template is one error line."""
    from gptneo_onnx.serve.chat_template import ChatTemplateError, export_chat_template, read_option

    try:
        source = read_option(args.chat_template) if args.chat_template is not None else None
        export_chat_template(args.export_dir, source)  # the export's own template compiles too
    except (ChatTemplateError, OSError, UnicodeDecodeError) as error:
        raise ServeSetupError(str(error)) from None
    return source


def access_from(args: argparse.Namespace) -> Access:
    """The API key (flag, else the environment) and CORS origins; a warning for an open bind."""
    from gptneo_onnx.serve.access import API_KEY_ENV, access_settings

    try:
        access = access_settings(args.api_key, (args.allowed_origins or "").split(","))
    except ValueError as error:
        raise ServeSetupError(str(error).replace("the API key", "--api-key")) from None
    if access.api_key is None and args.host not in ("127.0.0.1", "localhost", "::1"):
        print(
            f"warning: serving on {args.host} without an API key: anyone who reaches the port can use "
            f"the model (set {API_KEY_ENV} or --api-key)",
            file=sys.stderr,
        )
    return access


def run_bench_serve(args: argparse.Namespace) -> int:
    from gptneo_onnx.bench.serving import main

    main(args.passthrough)
    return 0
