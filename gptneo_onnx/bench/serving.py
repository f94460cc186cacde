"""The serving benchmark: drive `gptneo-onnx serve` over HTTP, as vLLM's benchmark_serving does.

    gptneo-onnx bench-serve                    # gpt-neo-125m shape, random init (~10-15 minutes on 2 cores)
    gptneo-onnx bench-serve --workload short   # short answers only (8-32 tokens)
    gptneo-onnx bench-serve --quick            # tiny shape, seconds: a smoke test

For each batching policy (continuous; continuous with left-padded rows, the layout of exports
without ragged rows; static; one request at a time) a server runs in its own process, and the
policies take turns at each client count (`--rounds` turns each, every round in the reverse
order of the last, pooled); 1, 4, 8 and 16 clients take turns over one shared list of 4
requests per client (`--requests-per-client`), streaming completions of mixed prompt and output
lengths (fixed seeds, token-id prompts, `min_tokens` = `max_tokens` so every request makes
exactly its tokens). The default workload mixes answers of 16 to 256 tokens, as chat traffic
does; `short` keeps them at 8-32. Reported: output tokens per second,
over the whole run and sustained (until the list runs dry, before the last requests drain with
fewer clients), time to first token and inter-token latency (p50 / p99), and where the
engine's time went (bench/engine_profile.py, from the server's /metrics). Writes serving.json,
serving.md and serving.png.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import re
import subprocess
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path

import httpx
import numpy as np
from tqdm.auto import tqdm

from gptneo_onnx.bench import engine_profile
from gptneo_onnx.bench.models import OUR_VARIANTS, SHAPES, build_all
from gptneo_onnx.bench.serving_limits import batching_ceiling

POLICIES = ("continuous", "continuous-padded", "static", "sequential")
TARGETS = {"sequential": 4.0, "static": 1.8}  # continuous / policy throughput at 8 clients


@dataclass(frozen=True)
class Plan:
    shape: str
    clients: tuple[int, ...]
    requests_per_client: int
    prompt_lengths: tuple[int, ...]
    output_lengths: tuple[int, ...]


WORKLOADS = {  # name: (prompt lengths, output lengths), each drawn uniformly
    "mixed": ((16, 32, 64, 128), (16, 32, 64, 128, 256)),
    "short": ((16, 32, 64), (8, 16, 32)),
}
FULL = Plan("125m", (1, 4, 8, 16), 4, *WORKLOADS["mixed"])
QUICK = Plan("tiny", (1, 4), 2, (4, 12), (4, 8))


def workload(plan: Plan, clients: int, vocab: int) -> list[tuple[list[int], int]]:
    """The (prompt ids, output length) requests for this client count; the same for every policy."""
    rng = random.Random(1000 + clients)
    return [
        (
            [rng.randrange(1, vocab) for _ in range(rng.choice(plan.prompt_lengths))],
            rng.choice(plan.output_lengths),
        )
        for _ in range(max(plan.requests_per_client * clients, 4))
    ]


async def one_request(http: httpx.AsyncClient, prompt: list[int], tokens: int, seed: int) -> dict:
    """Stream one completion; returns its token arrival times and usage."""
    body = {
        "prompt": prompt, "max_tokens": tokens, "min_tokens": tokens, "temperature": 0, "seed": seed,
        "stream": True, "stream_options": {"include_usage": True},
    }  # fmt: skip
    start = time.perf_counter()
    arrivals, usage = [], None
    async with http.stream("POST", "/v1/completions", json=body) as response:
        if response.status_code != 200:
            raise RuntimeError(f"the server answered {response.status_code}: {await response.aread()!r}")
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = json.loads(line[6:])
            if "error" in event:
                raise RuntimeError(f"the stream failed: {event['error']['message']}")
            if event.get("usage"):
                usage = event["usage"]
            elif event["choices"] and event["choices"][0]["finish_reason"] is None:
                arrivals.append(time.perf_counter())
    return {"start": start, "arrivals": arrivals, "tokens": usage["completion_tokens"]}


async def drive(url: str, requests: list[tuple[list[int], int]], clients: int, bar) -> dict:
    """One round: `clients` workers take the next request from one shared list until it is
    empty, as vLLM's benchmark_serving with --max-concurrency: every client is busy until the
    list ends. Returns what `summarize` pools: each request's arrivals, the round's wall time,
    when the list ran dry, and the server's engine counters before, then and after."""
    limits = httpx.Limits(max_connections=clients + 2)
    queue = list(enumerate(requests))[::-1]
    dry = []  # when the last request was taken: from then on fewer clients are busy
    dry_metrics = []  # the server's /metrics at that moment

    async with httpx.AsyncClient(base_url=url, timeout=600, limits=limits) as http:

        async def engine_totals() -> dict[str, float]:
            return engine_profile.totals((await http.get("/metrics")).text)

        async def client() -> list[dict]:
            results = []
            while queue:
                number, (prompt, tokens) = queue.pop()
                if not queue:
                    dry.append(time.perf_counter())
                    dry_metrics.append(asyncio.create_task(engine_totals()))
                results.append(await one_request(http, prompt, tokens, seed=number))
                bar.update(1)
            return results

        before = await engine_totals()
        start = time.perf_counter()
        per_client = await asyncio.gather(*(client() for _ in range(clients)))
        wall = time.perf_counter() - start
        after, at_dry = await engine_totals(), await dry_metrics[0]
    results = [result for items in per_client for result in items]
    # with no more requests than clients, all start at once: no sustained stretch
    until_dry = dry[0] - start if len(requests) > clients else None
    return {
        "results": results, "wall": wall, "until_dry": until_dry, "dry": dry[0],
        "spent": engine_profile.spent(before, after), "spent_until_dry": engine_profile.spent(before, at_dry),
    }  # fmt: skip


def summarize(rounds: list[dict]) -> dict:
    """One policy at one client count, its rounds pooled: tokens over the rounds' summed wall
    time, latency percentiles over every request, and the engine's summed counters."""
    results = [result for one in rounds for result in one["results"]]
    wall = sum(one["wall"] for one in rounds)
    engine = engine_profile.profile(
        engine_profile.pooled([one["spent"] for one in rounds]), wall, len(results)
    )
    ttft = [r["arrivals"][0] - r["start"] for r in results if r["arrivals"]]
    itl = [b - a for r in results for a, b in zip(r["arrivals"], r["arrivals"][1:])]
    tokens = sum(r["tokens"] for r in results)
    sustained = sustained_engine = None
    if all(one["until_dry"] for one in rounds):
        until_dry = sum(one["until_dry"] for one in rounds)
        early = sum(t <= one["dry"] for one in rounds for r in one["results"] for t in r["arrivals"])
        sustained = early / until_dry
        spent = engine_profile.pooled([one["spent_until_dry"] for one in rounds])
        sustained_engine = engine_profile.profile(spent, until_dry, None)

    def percentile(values: list[float], q: float) -> float | None:
        return float(np.percentile(values, q)) if values else None

    return {
        "requests": len(results),
        "output_tokens": tokens,
        "seconds": wall,
        "tokens_per_second": tokens / wall,
        "sustained_tokens_per_second": sustained,
        "ttft_p50": percentile(ttft, 50), "ttft_p99": percentile(ttft, 99),
        "itl_p50": percentile(itl, 50), "itl_p99": percentile(itl, 99),
        "engine": engine,
        "sustained_engine": sustained_engine,
        "round_tokens_per_second": [sum(r["tokens"] for r in one["results"]) / one["wall"] for one in rounds],
    }  # fmt: skip


class ServerProcess:
    """`gptneo-onnx serve` in a child process on a free port; stopped with SIGTERM."""

    def __init__(self, export: Path, policy: str, max_concurrent: int, threads: int):
        command = [
            sys.executable, "-m", "gptneo_onnx.cli", "serve", str(export), "--port", "0",
            "--policy", policy, "--max-concurrent", str(max_concurrent), "--max-queue", "256",
            "--threads", str(threads), "--shutdown-timeout", "5",
        ]  # fmt: skip
        self.process = subprocess.Popen(command, stderr=subprocess.PIPE, text=True)
        self.url = wait_until_serving(self.process)
        # Warm-up (first-run allocations, thread pools), not measured.
        body = {"prompt": [1, 2, 3, 4], "max_tokens": 4, "temperature": 0}
        httpx.post(f"{self.url}/v1/completions", json=body, timeout=120).raise_for_status()

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


def wait_until_serving(process: subprocess.Popen, timeout: float = 300) -> str:
    """The server's URL, once its `serving ... on http://...` line is out and /health is 200."""
    deadline = time.monotonic() + timeout
    url = None
    while url is None:
        line = process.stderr.readline()
        if not line and process.poll() is not None:
            raise RuntimeError(f"the server exited with {process.returncode} before serving")
        found = re.search(r"on (http://\S+)", line)
        url = found.group(1) if found else None
        if time.monotonic() > deadline:
            raise TimeoutError("the server did not start in time")
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{url}/health", timeout=5).status_code == 200:
                return url
        except httpx.TransportError:
            pass
        if process.poll() is not None:
            raise RuntimeError(f"the server exited with {process.returncode} while loading")
        time.sleep(0.1)
    raise TimeoutError("the server did not become healthy in time")


def markdown_table(results: dict) -> str:
    def ms(value: float | None) -> str:
        return "-" if value is None else f"{value * 1000:.0f}"

    def rate(value: float | None) -> str:
        return "-" if value is None else f"{value:.1f}"

    lines = [
        "| policy | clients | requests | tok/s | sustained tok/s | TTFT p50 ms | TTFT p99 ms "
        "| ITL p50 ms | ITL p99 ms |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for policy, levels in results["runs"].items():
        for clients, run in levels.items():
            lines.append(
                f"| {policy} | {clients} | {run['requests']} | {run['tokens_per_second']:.1f} | "
                f"{rate(run.get('sustained_tokens_per_second'))} | "
                f"{ms(run['ttft_p50'])} | {ms(run['ttft_p99'])} | "
                f"{ms(run['itl_p50'])} | {ms(run['itl_p99'])} |"
            )
    for name, target in results["targets"].items():
        sustained = target.get("sustained_ratio")
        each = target.get("round_ratios") or []
        by_round = f"; rounds {', '.join(f'{ratio:.2f}x' for ratio in each)}" if len(each) > 1 else ""
        lines.append(
            f"\n{name}: {target['ratio']:.2f}x (target >= {target['target']}x; "
            f"sustained {rate(sustained)}x; ceiling on this machine {target['ceiling']:.2f}x{by_round})"
        )
    ceiling = results["ceiling"]
    steps = ", ".join(f"batch {b}: {ms:.1f} ms" for b, ms in ceiling["step_ms"].items())
    prefills = ", ".join(
        f"{b} x {ceiling['prompt_tokens']} tokens: {ms:.0f} ms" for b, ms in ceiling["prefill_ms"].items()
    )
    lines.append(
        f"\nThe ceiling (gptneo_onnx/bench/serving_limits.py): decode step after {ceiling['past_tokens']} "
        f"tokens, {steps}; prefill, {prefills}."
    )
    lines += ["\nWhere the engine's time went (share of each run's wall time):\n"]
    lines.append(engine_profile.markdown_table(results["runs"]))
    return "\n".join(lines)


def write_chart(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (throughput, latency, engine) = plt.subplots(
        1, 3, figsize=(16, 4), gridspec_kw={"width_ratios": [1, 1, 0.8]}
    )
    for policy, levels in results["runs"].items():
        clients = [int(c) for c in levels]
        (line,) = throughput.plot(
            clients, [run["tokens_per_second"] for run in levels.values()], marker="o", label=policy
        )
        sustained = [run.get("sustained_tokens_per_second") for run in levels.values()]
        if all(sustained):
            throughput.plot(clients, sustained, linestyle=":", color=line.get_color())
        latency.plot(
            clients, [(run["ttft_p50"] or 0) * 1000 for run in levels.values()], marker="o", label=policy
        )
    ceiling = results.get("ceiling")
    if ceiling:  # what continuous batching could make with every slot busy (bench/serving_limits.py)
        best = ceiling["tokens_per_second"]["continuous"]
        throughput.axhline(best, linestyle="--", color="gray", label="ceiling, every slot busy")
        throughput.set_ylim(0, best * 1.4)  # room above the ceiling for the legend
    throughput.plot([], [], linestyle=":", color="gray", label="dotted: sustained")
    throughput.set(xlabel="concurrent clients", ylabel="output tokens / s", title="Throughput")
    latency.set(xlabel="concurrent clients", ylabel="ms", title="Time to first token (p50)", yscale="log")
    throughput.legend(loc="upper left", ncols=2)
    latency.legend(loc="upper left")
    for axes in (throughput, latency):
        axes.grid(alpha=0.3)
    engine_chart(engine, results["runs"])
    figure.suptitle(
        f"gptneo-onnx serve, {results['shape']} shape, {results['workload']} workload, "
        f"{results['threads']} threads"
    )
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def engine_chart(axes, runs: dict) -> None:
    """Stacked bars: each policy's wall time by engine phase at 8 clients (or the most run)."""
    counts = {count for levels in runs.values() for count in levels}
    clients = "8" if "8" in counts else max(counts, key=int)
    policies = [policy for policy, levels in runs.items() if "engine" in levels.get(clients, {})]
    left = [0.0] * len(policies)
    for part in engine_profile.SHARES:
        shares = [100 * runs[policy][clients]["engine"][f"{part}_share"] for policy in policies]
        color = "lightgray" if part == "other" else None  # waiting for requests, HTTP, the loop
        axes.barh(policies, shares, left=left, label=part, color=color)
        left = [a + b for a, b in zip(left, shares)]
    axes.set(xlabel="% of wall time", title=f"Engine time at {clients} clients", xlim=(0, 100))
    axes.invert_yaxis()
    axes.legend(loc="lower center", bbox_to_anchor=(0.5, -0.45), ncols=4, fontsize="small")


def targets(runs: dict, ceiling: dict) -> dict:
    at = "8" if "8" in runs.get("continuous", {}) else None
    found = {}
    for policy, target in TARGETS.items():
        if at and at in runs.get(policy, {}):
            ours, theirs = runs["continuous"][at], runs[policy][at]
            ratio = ours["tokens_per_second"] / theirs["tokens_per_second"]
            sustained = [run.get("sustained_tokens_per_second") for run in (ours, theirs)]
            found[f"continuous vs {policy} at {at} clients"] = {
                "ratio": ratio,  # whole runs (their rounds pooled): the target is judged on these
                "round_ratios": [
                    a / b for a, b in zip(ours["round_tokens_per_second"], theirs["round_tokens_per_second"])
                ],
                "sustained_ratio": sustained[0] / sustained[1] if all(sustained) else None,
                "target": target,
                "met": ratio >= target,
                "ceiling": ceiling["ratio"][policy],  # with every slot busy, from timed steps
            }
    return found


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog="gptneo-onnx bench-serve", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny shape, 1 and 4 clients: a smoke test")
    parser.add_argument("--policies", default=",".join(POLICIES), help="comma-separated batching policies")
    parser.add_argument("--clients", help="comma-separated client counts (default 1,4,8,16)")
    parser.add_argument(
        "--workload", default="mixed", choices=sorted(WORKLOADS), help="prompt and output lengths"
    )
    parser.add_argument(
        "--requests-per-client",
        type=int,
        help=f"length of the request list (default {FULL.requests_per_client})",
    )
    parser.add_argument("--variant", default="ours-optimized-fp32", choices=sorted(OUR_VARIANTS))
    parser.add_argument(
        "--rounds", type=int, default=1,
        help="turns of every policy per client count, each round in the reverse order of the last, "
        "pooled: an even count cancels a steady drift in the machine's speed (default 1)",
    )  # fmt: skip
    parser.add_argument("--max-concurrent", type=int, default=8, help="server slots")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="onnxruntime threads")
    parser.add_argument(
        "--work", type=Path, default=Path(".bench-work"), help="cache of checkpoints and exports"
    )
    parser.add_argument("--output", type=Path, default=Path("bench-serve-results"), help="where results go")
    args = parser.parse_args(argv)
    prompts, outputs = WORKLOADS[args.workload]
    plan = QUICK if args.quick else replace(FULL, prompt_lengths=prompts, output_lengths=outputs)
    if args.clients:
        plan = replace(plan, clients=tuple(int(count) for count in args.clients.split(",")))
    if args.requests_per_client:
        plan = replace(plan, requests_per_client=args.requests_per_client)
    if args.rounds < 1:
        parser.error(f"--rounds must be >= 1, got {args.rounds}")
    policies = [policy for policy in args.policies.split(",") if policy]
    unknown = sorted(set(policies) - set(POLICIES))
    if unknown:
        parser.error(f"unknown policies {unknown}; expected some of {list(POLICIES)}")
    export = build_all(args.work, plan.shape, [args.variant], lambda message: None).exports[args.variant]
    vocab = SHAPES[plan.shape]["vocab_size"]
    total = sum(len(workload(plan, c, vocab)) for c in plan.clients) * len(policies) * args.rounds
    rounds: dict[str, dict[str, list[dict]]] = {policy: {} for policy in policies}
    servers: dict[str, ServerProcess] = {}
    try:  # every policy's server is up at once (idle ones cost no CPU); they take turns per
        for policy in policies:  # client count, so load drifts on a shared machine hit all alike
            servers[policy] = ServerProcess(export, policy, args.max_concurrent, args.threads)
        with tqdm(total=total, desc="requests", unit="req") as bar:
            for clients in plan.clients:
                for turn in range(args.rounds):  # each round in the reverse order of the last
                    for policy in policies if turn % 2 == 0 else policies[::-1]:
                        bar.set_postfix_str(f"{clients} clients, {policy}, round {turn + 1}")
                        requests = workload(plan, clients, vocab)
                        run = asyncio.run(drive(servers[policy].url, requests, clients, bar))
                        rounds[policy].setdefault(str(clients), []).append(run)
    finally:
        for server in servers.values():
            server.stop()
    runs = {policy: {c: summarize(turns) for c, turns in levels.items()} for policy, levels in rounds.items()}
    ceiling = batching_ceiling(
        export, args.threads, args.max_concurrent, plan.prompt_lengths, plan.output_lengths
    )
    results = {
        "shape": plan.shape, "variant": args.variant, "threads": args.threads,
        "max_concurrent": args.max_concurrent, "cpu_count": os.cpu_count(), "plan": vars(plan),
        "rounds": args.rounds,
        "workload": "quick" if args.quick else args.workload,
        "runs": runs, "targets": targets(runs, ceiling), "ceiling": ceiling,
    }  # fmt: skip
    args.output.mkdir(parents=True, exist_ok=True)
    (args.output / "serving.json").write_text(json.dumps(results, indent=2) + "\n")
    table = markdown_table(results)
    (args.output / "serving.md").write_text(table)
    write_chart(results, args.output / "serving.png")
    print(table)
    print(f"wrote {args.output / 'serving.json'}, serving.md and serving.png")
    return results
