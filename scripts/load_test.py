"""Sustained load: one model shared by 8 threads for a bounded time, checked against sequential runs,
then 1,000 generations in a row with RSS sampled; writes a JSON report.

.venv/bin/python scripts/load_test.py                          # the bundled model, portable and optimized
.venv/bin/python scripts/load_test.py --export exports/neo --duration 300 --output load.json

Without --export, the bundled model is exported (a few seconds each, in a child process, so
this process holds only the runtime) to a temporary folder in each flavor asked for:
`portable`, and `optimized` (fused attention with the shared-buffer KV cache written in place).
Exit status 1 when outputs differ or errors occur.
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import onnxruntime
import psutil

from gptneo_onnx.bench.sustained import check_concurrent, make_requests, measure_rss, rss_mb
from gptneo_onnx.runtime import CausalLM


def export_bundled(folder: Path, optimize: bool) -> Path:
    """Export the bundled model in a child process, so this process holds only the runtime (no torch)."""
    from gptneo_onnx.cli.defaults import BUNDLED_MODEL_DIR

    command = [sys.executable, "-m", "gptneo_onnx.cli", "export", "--model", str(BUNDLED_MODEL_DIR)]
    command += ["--output", str(folder)] + (["--optimize"] if optimize else [])
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
    return folder


def run_one(name: str, folder: Path, args: argparse.Namespace) -> dict:
    started = time.perf_counter()
    model = CausalLM.load(folder, provider="cpu")
    print(
        f"[{name}] {folder} (cache mode {model.cache_mode}), RSS after load {rss_mb():.0f} MB",
        file=sys.stderr,
    )
    concurrent = check_concurrent(
        model, make_requests(seed=args.seed, max_new_tokens=args.max_new_tokens), threads=args.threads,
        duration_s=args.duration, max_requests=args.requests,
    )  # fmt: skip
    status = (
        "equal" if concurrent.passed else f"MISMATCH {concurrent.mismatches[:10]} {concurrent.errors[:3]}"
    )
    print(
        f"[{name}] {concurrent.requests} requests on {concurrent.threads} threads: {status}", file=sys.stderr
    )
    memory = measure_rss(
        model, make_requests(seed=args.seed + 1, max_new_tokens=args.max_new_tokens),
        generations=args.generations, sample_every=args.sample_every,
    )  # fmt: skip
    summary = memory.summary()
    print(
        f"[{name}] RSS over {args.generations} generations: start {summary['rss_start_mb']} MB, "
        f"peak {summary['rss_peak_mb']} MB, end {summary['rss_end_mb']} MB, "
        f"slope {summary['slope_mb_per_1000_generations']} MB / 1,000",
        file=sys.stderr,
    )
    return {
        "export": str(folder),
        "cache_mode": model.cache_mode,
        "concurrent": {
            "threads": concurrent.threads,
            "seconds": concurrent.seconds,
            "requests": concurrent.requests,
            "generated_tokens": concurrent.generated_tokens,
            "equal_to_sequential": concurrent.passed,
            "mismatched_requests": concurrent.mismatches,
            "errors": concurrent.errors,
        },
        "memory": summary,
        "total_seconds": round(time.perf_counter() - started, 1),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--export", type=Path, help="a causal-lm export folder (default: the bundled model)")
    parser.add_argument(
        "--flavor", nargs="+", choices=("portable", "optimized"), default=["portable", "optimized"]
    )
    parser.add_argument("--threads", type=int, default=8)
    parser.add_argument("--duration", type=float, default=120.0, help="seconds of concurrent load (bound)")
    parser.add_argument(
        "--requests", type=int, default=None, help="stop the concurrent phase after this many"
    )
    parser.add_argument("--generations", type=int, default=1000, help="sequential generations for RSS")
    parser.add_argument("--sample-every", type=int, default=25)
    parser.add_argument("--max-new-tokens", type=int, default=24)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", type=Path, default=Path("load-report.json"))
    args = parser.parse_args()

    report = {
        "machine": {
            "cpus": psutil.cpu_count(),
            "python": platform.python_version(),
            "onnxruntime": onnxruntime.__version__,
        },
        "settings": {
            key: str(value) if isinstance(value, Path) else value for key, value in vars(args).items()
        },
        "runs": {},
    }
    with tempfile.TemporaryDirectory(prefix="gptneo-load-") as scratch:
        if args.export:
            targets = {"export": args.export}
        else:
            targets = {
                flavor: export_bundled(Path(scratch) / flavor, optimize=flavor == "optimized")
                for flavor in args.flavor
            }
        for name, folder in targets.items():
            report["runs"][name] = run_one(name, folder, args)
    args.output.write_text(json.dumps(report, indent=2))
    print(f"report: {args.output}", file=sys.stderr)
    passed = all(run["concurrent"]["equal_to_sequential"] for run in report["runs"].values())
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
