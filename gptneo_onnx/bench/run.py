"""The benchmark: this project's exports against transformers and Optimum, in one run.

    gptneo-onnx bench              # gpt-neo-125m shape, random init (~15 min on 2 cores)
    gptneo-onnx bench --quick      # tiny shape, seconds: a smoke test

Every system generates greedily from the same random-init weights, each in its own process
(bench/worker.py). Scenarios are repeated, and within each the systems take turns (so load
drifts hit all alike); medians are reported with ratios against each peer. Cold start and
peak RSS come from fresh processes (bench/cold.py).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from tqdm.auto import tqdm

from gptneo_onnx.bench.bandwidth import bytes_per_token, percent_of_limit, read_bandwidth
from gptneo_onnx.bench.models import OUR_VARIANTS, build_all
from gptneo_onnx.bench.report import evaluate_targets, markdown_table, write_chart
from gptneo_onnx.bench.worker import Worker

# variant -> (export it uses, runner kind)
VARIANTS = {
    "ours-portable-fp32": ("ours-portable-fp32", "ours"),
    "ours-portable-fp32-windowed": ("ours-portable-fp32-windowed", "ours"),
    "ours-optimized-fp32-concat": ("ours-optimized-fp32", "ours"),
    "ours-optimized-fp32": ("ours-optimized-fp32", "ours-shared"),
    "ours-optimized-int8": ("ours-optimized-int8", "ours-shared"),
    "ours-optimized-int4": ("ours-optimized-int4", "ours-shared"),
    "runtime-optimized-fp32": ("ours-optimized-fp32", "runtime"),
    "runtime-optimized-int4": ("ours-optimized-int4", "runtime"),
    "transformers-fp32": ("transformers-fp32", "transformers"),
    "optimum-fp32": ("optimum-fp32", "optimum"),
    "optimum-int4": ("optimum-int4", "optimum"),
}


@dataclass(frozen=True)
class Plan:
    shape: str
    short: tuple[int, int]  # (prompt, new tokens)
    long: tuple[int, int]
    contexts: tuple[tuple[int, int], ...]  # extra (prompt, new) points for the chart and prefill
    batch: tuple[int, int, int]  # (rows, prompt, new)
    repeats: int
    cold: tuple[int, int]  # (prompt, new) in the fresh process
    cold_repeats: int


FULL = Plan("125m", (32, 128), (1500, 64), ((512, 16), (1024, 16)), (8, 32, 64), 3, (32, 16), 3)
QUICK = Plan("tiny", (8, 8), (96, 4), ((32, 4), (64, 4)), (2, 8, 4), 1, (8, 2), 1)


def scenarios(plan: Plan) -> list[tuple[str, tuple[int, ...]]]:
    """(kind, sizes) per warm scenario: short decode, prefill + decode per context, batch."""
    contexts = [("context", sizes) for sizes in (*plan.contexts, plan.long)]
    return [("short", plan.short), *contexts, ("batch", plan.batch)]


def measure_warm(
    plan: Plan, workers: dict[str, Worker], vocab: int, bar
) -> dict[str, dict[str, list[float]]]:
    """Each scenario, `plan.repeats` times. Systems take turns within each scenario, so the samples
    being compared are seconds apart and share the machine's state; the turn order is reversed
    every other repeat, so no system always runs first. Each system runs in its own process."""
    samples: dict[str, dict[str, list[float]]] = {name: {} for name in workers}

    def add(name: str, metric: str, value: float) -> None:
        samples[name].setdefault(metric, []).append(value)

    for worker in workers.values():  # warm-up: first-run allocations, thread pools
        worker.timed(1, plan.short[0], 2, 99, vocab)
    for repeat in range(plan.repeats):
        order = list(workers.items())[:: 1 if repeat % 2 == 0 else -1]
        for kind, sizes in scenarios(plan):
            for name, worker in order:
                if kind == "short":
                    length, new = sizes
                    bar.set_postfix_str(f"{name}: decode after {length}")
                    result = worker.timed(1, length, new, repeat, vocab)
                    add(name, f"decode_tok_s@{length}", result["decode_tok_s"])
                elif kind == "context":
                    length, new = sizes
                    bar.set_postfix_str(f"{name}: prefill {length} + decode")
                    result = worker.timed(1, length, new, repeat, vocab)
                    add(name, f"prefill_tok_s@{length}", length / result["first_token_s"])
                    add(name, f"decode_tok_s@{length}", result["decode_tok_s"])
                else:
                    rows, length, new = sizes
                    bar.set_postfix_str(f"{name}: batch {rows}")
                    result = worker.timed(rows, length, new, repeat, vocab)
                    add(name, f"batch{rows}_tok_s", rows * new / result["total_s"])
                bar.update()
    return samples


def measure_cold(plan: Plan, name: str, kind: str, path: Path) -> dict[str, list[float]]:
    """Spawn-to-first-token and peak RSS of a fresh process serving `path`."""
    samples: dict[str, list[float]] = {"cold_start_s": [], "peak_rss_mb": []}
    for _ in range(plan.cold_repeats):
        command = [sys.executable, "-m", "gptneo_onnx.bench.cold", kind, str(path), *map(str, plan.cold)]
        spawned = time.time()
        done = subprocess.run(command, capture_output=True, text=True, timeout=600)
        if done.returncode:
            raise RuntimeError(f"cold start of {name} failed:\n{done.stderr[-2000:]}")
        result = json.loads(done.stdout.strip().splitlines()[-1])
        samples["cold_start_s"].append(result["first_token_at"] - spawned)
        samples["peak_rss_mb"].append(result["peak_rss_mb"])
    return samples


def bandwidth_use(medians: dict, plan: Plan, paths: dict[str, Path], limit: float) -> dict:
    """Each variant's short decode as read bandwidth: bytes per token x tok/s, and % of `limit`."""
    context = plan.short[0]
    variants = {}
    for name, path in paths.items():
        per_token = bytes_per_token(path, context)
        rate = medians[name].get(f"decode_tok_s@{context}")
        if per_token is None or not rate:
            continue
        gb_s, percent = percent_of_limit(per_token, rate, limit)
        variants[name] = {"mb_per_token": per_token / 1e6, "tok_s": rate, "gb_s": gb_s, "percent": percent}
    return {"read_gb_s": limit / 1e9, "context": context, "variants": variants}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="gptneo-onnx bench", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny shape and short scenarios (smoke test)")
    parser.add_argument(
        "--out", type=Path, default=Path("bench-results"), help="folder for JSON, table, chart"
    )
    parser.add_argument(
        "--work", type=Path, default=None, help="folder for the checkpoint and exports (cached)"
    )
    parser.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated subset of variants")
    parser.add_argument("--repeats", type=int, default=None, help="repeats per scenario (default 3, quick 1)")
    parser.add_argument("--no-cold", action="store_true", help="skip cold start and peak RSS")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    plan = QUICK if args.quick else FULL
    if args.repeats:
        plan = Plan(**{**plan.__dict__, "repeats": args.repeats})
    variants = [name.strip() for name in args.variants.split(",") if name.strip()]
    unknown = sorted(set(variants) - set(VARIANTS))
    if unknown:
        raise SystemExit(f"unknown variant(s) {', '.join(unknown)}; expected some of {', '.join(VARIANTS)}")
    work = args.work or args.out / "work"
    args.out.mkdir(parents=True, exist_ok=True)
    exports_needed = sorted({VARIANTS[name][0] for name in variants})
    with tqdm(total=len(exports_needed), desc="exports", unit="model") as bar:
        artifacts = build_all(
            work, plan.shape, exports_needed, lambda text: (bar.set_postfix_str(text), bar.update())
        )
    vocab = json.loads((artifacts.checkpoint / "config.json").read_text())["vocab_size"]
    limit = read_bandwidth()  # before the workers start, while the benchmark itself is idle
    workers: dict[str, Worker] = {}
    try:
        for name in tqdm(variants, desc="loading systems", unit="process"):
            log = work / f"worker-{name}.log"
            workers[name] = Worker(VARIANTS[name][1], artifacts.exports[VARIANTS[name][0]], log)
        total = plan.repeats * len(workers) * len(scenarios(plan))
        with tqdm(total=total, desc="warm scenarios", unit="run") as bar:
            samples = measure_warm(plan, workers, vocab, bar)
    finally:
        for worker in workers.values():
            worker.close()
    if not args.no_cold:
        for name in tqdm(variants, desc="cold start + peak RSS", unit="process"):
            export_name, kind = VARIANTS[name]
            samples[name].update(measure_cold(plan, name, kind, artifacts.exports[export_name]))
    medians = {name: {metric: statistics.median(v) for metric, v in m.items()} for name, m in samples.items()}
    results = {
        "plan": plan.__dict__,
        "machine": {"cpus": os.cpu_count(), "load_average": os.getloadavg()},
        "variants": {name: {"export": VARIANTS[name][0], "runner": VARIANTS[name][1]} for name in variants},
        "our_variants": list(OUR_VARIANTS),
        "samples": samples,
        "medians": medians,
    }
    paths = {name: artifacts.exports[VARIANTS[name][0]] for name in variants}
    results["bandwidth"] = bandwidth_use(medians, plan, paths, limit)
    results["targets"] = evaluate_targets(medians, plan, results["bandwidth"])
    (args.out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    table = markdown_table(results, plan)
    (args.out / "table.md").write_text(table + "\n")
    write_chart(medians, plan, args.out / "speedup_vs_context.png")
    print(table)
    return results


if __name__ == "__main__":
    main()
