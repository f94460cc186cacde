"""Scale-out on Ray Serve: N replicas of the same app, each with its own engine.

Ray does the routing, the queueing in front of the replicas and the backpressure: a replica
takes `max_concurrent` requests at once (its slots), Ray queues `max_queue` more, and answers
429 with Retry-After past that. Ray also drains replicas on shutdown (`graceful_shutdown_timeout_s`)
and, given an autoscaling config, adds and removes replicas with the load: by default it aims at
`max_concurrent` requests per replica (full slots), so a replica is added once requests queue.

For `serve deploy` with a config file, point `import_path` at `gptneo_onnx.serve.ray_app:build`
and give its `args` (docs/serving.md).
"""

from __future__ import annotations

import os
import signal
import sys
import threading
from dataclasses import fields
from pathlib import Path
from typing import Any

from ray import serve
from ray.serve.config import BackpressureConfig

from gptneo_onnx.runtime import ProviderOptions
from gptneo_onnx.serve.access import Access, access_settings
from gptneo_onnx.serve.chat_template import read_option
from gptneo_onnx.serve.engine import EngineLimits

DEPLOYMENT_NAME = "gptneo-onnx"
APP_NAME = "gptneo-onnx"
# Ray Serve kills its HTTP proxy when it is not ready within 5 s, three times over: on a busy
# machine (2 cores, a model loading beside it) that happens, and serve.start fails with
# ActorDiedError. Longer limits, unless the environment sets its own.
PROXY_TIMEOUTS = {
    "RAY_SERVE_PROXY_READY_CHECK_TIMEOUT_S": "60",
    "RAY_SERVE_PROXY_HEALTH_CHECK_TIMEOUT_S": "30",
}


def deployment_app(
    export_dir: str | Path,
    model_name: str,
    limits: EngineLimits,
    policy: str = "continuous",
    load_options: dict[str, Any] | None = None,
    replicas: int = 1,
    shutdown_timeout: float = 30.0,
    access: Access | None = None,
    autoscaling: dict[str, Any] | None = None,
    chat_template: str | None = None,
) -> serve.Application:
    """The Ray Serve application: `replicas` copies of create_app, each loading the export itself,
    or as many as Ray's `autoscaling` config (AutoscalingConfig's fields) asks for."""
    folder, options = str(export_dir), dict(load_options or {})

    def build_replica_app():  # runs on each replica
        from gptneo_onnx.runtime import Model
        from gptneo_onnx.serve.api import ServerState, create_app

        state = ServerState(lambda: Model.load(folder, **options), model_name, limits, policy, chat_template)
        state.load()  # the replica counts as started only once its model is loaded
        if state.phase == "failed":
            raise RuntimeError(state.error)
        return create_app(state, access=access)

    threads = options.get("intra_op_threads") or 1
    if autoscaling is not None:
        autoscaling = {"target_ongoing_requests": limits.max_concurrent, **autoscaling}
    deployment = serve.deployment(
        serve.ingress(build_replica_app)(),
        name=DEPLOYMENT_NAME,
        num_replicas=None if autoscaling is not None else replicas,
        autoscaling_config=autoscaling,
        max_ongoing_requests=limits.max_concurrent,
        max_queued_requests=limits.max_queue,
        backpressure_config=BackpressureConfig(status_code=429, retry_after_s=1),
        graceful_shutdown_timeout_s=shutdown_timeout,
        ray_actor_options={"num_cpus": threads},
    )
    return deployment.bind()


def build(args: dict[str, Any]) -> serve.Application:
    """The application builder for `serve run` / `serve deploy` config files.

    args: export_dir (required), model_name, replicas, policy, threads, shutdown_timeout, the
    limits max_concurrent, max_queue, max_input_tokens, max_total_tokens, request_timeout,
    api_key (default: $GPTNEO_ONNX_API_KEY where the application is built; empty is an error),
    allowed_origins (a list), chat_template (a file on the node that builds the app, or the
    template itself), autoscaling_config (Ray's AutoscalingConfig fields, instead of
    replicas; target_ongoing_requests defaults to max_concurrent),
    and any ProviderOptions field (provider, device_id, cuda_tf32, ...).
    """
    if "export_dir" not in args:
        raise ValueError("the application's args need export_dir (the export folder on every node)")
    if "replicas" in args and "autoscaling_config" in args:
        raise ValueError("give replicas (a fixed count) or autoscaling_config, not both")
    limit_names = ("max_concurrent", "max_queue", "max_input_tokens", "max_total_tokens", "request_timeout")
    limits = EngineLimits(**{name: args[name] for name in limit_names if name in args})
    folder = Path(args["export_dir"])
    chat_template = read_option(args["chat_template"]) if args.get("chat_template") else None
    return deployment_app(
        folder,
        args.get("model_name") or folder.name,
        limits,
        args.get("policy", "continuous"),
        provider_options(args),
        replicas=int(args.get("replicas", 1)),
        shutdown_timeout=float(args.get("shutdown_timeout", 30.0)),
        access=access_settings(args.get("api_key"), args.get("allowed_origins", ())),
        autoscaling=args.get("autoscaling_config"),
        chat_template=chat_template,
    )


def run_on_ray(
    export_dir: Path,
    model_name: str,
    limits: EngineLimits,
    policy: str,
    load_options: dict[str, Any],
    *,
    replicas: int,
    address: str | None,
    host: str,
    port: int,
    shutdown_timeout: float,
    access: Access | None = None,
    max_replicas: int | None = None,
    chat_template: str | None = None,
) -> int:
    """Start (or join) Ray, run the app until SIGTERM / Ctrl-C, then shut Serve and Ray down.
    With `max_replicas`, Ray autoscales between `replicas` and it."""
    import ray

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")  # no usage reports from servers
    for name, seconds in PROXY_TIMEOUTS.items():  # a local cluster's processes inherit these
        os.environ.setdefault(name, seconds)
    ray.init(address=address, include_dashboard=False, log_to_driver=False)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    try:
        scaling = None if max_replicas is None else {"min_replicas": replicas, "max_replicas": max_replicas}
        application = deployment_app(
            export_dir.resolve(), model_name, limits, policy, load_options, replicas, shutdown_timeout,
            access, scaling, chat_template,
        )  # fmt: skip
        try:
            serve.start(http_options={"host": host, "port": port})
            serve.run(application, name=APP_NAME, route_prefix="/")
        except Exception as error:  # a proxy or replica that failed to start, a taken port: one line
            first = (str(error).strip().splitlines() or [type(error).__name__])[0]
            print(f"error: Ray Serve could not start the application: {first} (Ray's logs: "
                  "/tmp/ray/session_latest/logs)", file=sys.stderr)  # fmt: skip
            return 1
        count = f"{replicas} replica(s)" if max_replicas is None else f"{replicas}-{max_replicas} replicas"
        print(f"serving {model_name!r} on http://{host}:{port} with {count} on Ray", file=sys.stderr)
        sys.stderr.flush()
        stop.wait()
        print("shutting down Ray Serve", file=sys.stderr, flush=True)
    finally:
        if address is None:  # our own local cluster: stop Serve with it
            serve.shutdown()
        else:  # a shared cluster: remove only our application
            serve.delete(APP_NAME)
        ray.shutdown()
    return 0


def provider_options(args: dict[str, Any]) -> dict[str, Any]:
    """Model.load's provider keywords from a config file's args (`threads`: intra_op_threads)."""
    options = {field.name: args[field.name] for field in fields(ProviderOptions) if field.name in args}
    if "threads" in args:
        options["intra_op_threads"] = args["threads"]
    return options
