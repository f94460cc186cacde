"""Big models end to end: export random weights at a real shape (external data), generate, move the
folder, change the working directory, load it again and generate the same tokens.

.venv/bin/python scripts/big_model_e2e.py --shape 1.3b --workdir /tmp/neo-e2e --output e2e-1.3b.json

Each phase runs in its own process, so each peak RSS (VmHWM) is that phase's alone:
1. export: scripts/export_real_size.py (GPT-Neo init, parity-validated, external data)
2. generate: Model.load (every file's sha256 checked) and greedy generation from fixed token ids
3. move the folder to another parent and name, then, from an unrelated working directory,
   load it through a relative path and generate again: the tokens must be the same.
The export is deleted at the end (--keep keeps it). Waits for --min-available-gb of free
memory before exporting (the 1.3B export peaks near 12 GB). Exit status 1 on a mismatch.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import psutil

SCRIPTS = Path(__file__).resolve().parent
PROMPT = [464, 3290, 318, 257, 1332, 286, 262, 8399]  # fixed ids inside every shape's 50257 tokens


def peak_rss_mb() -> float:
    """This process's peak resident set size (Linux VmHWM)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM in /proc/self/status (Linux only)")


def generate_here(folder: str, tokens: int) -> dict:
    """Load `folder` (relative to the current directory is fine) and generate greedily; one JSON-able dict."""
    from gptneo_onnx.runtime import CausalLM

    started = time.perf_counter()
    model = CausalLM.load(folder, provider="cpu")
    loaded = time.perf_counter()
    result = model.generate([PROMPT], max_new_tokens=tokens, do_sample=False, num_beams=1)
    finished = time.perf_counter()
    return {
        "cwd": os.getcwd(),
        "folder": folder,
        "resolved_folder": str(model.manifest.folder),
        "load_seconds": round(loaded - started, 1),  # includes the sha256 of every file
        "generate_seconds": round(finished - loaded, 1),
        "peak_rss_gb": round(peak_rss_mb() / 1024, 2),
        "tokens": result.sequences[0],
    }


def run_phase(command: list[str], cwd: Path) -> dict:
    """Run a child process that prints one JSON object on stdout; returns it with the wall time added."""
    started = time.perf_counter()
    done = subprocess.run(command, cwd=cwd, check=True, stdout=subprocess.PIPE, text=True)
    figures = json.loads(done.stdout[done.stdout.index("{") :])
    figures["wall_seconds"] = round(time.perf_counter() - started, 1)
    return figures


def wait_for_memory(min_gb: float, wait_minutes: float) -> float:
    deadline = time.monotonic() + wait_minutes * 60
    while (available := psutil.virtual_memory().available / 2**30) < min_gb:
        if time.monotonic() > deadline:
            raise SystemExit(f"only {available:.1f} GB of memory available after waiting; need {min_gb} GB")
        print(f"waiting for memory: {available:.1f} GB available, need {min_gb} GB", file=sys.stderr)
        time.sleep(30)
    return round(available, 1)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default="1.3b", help="a shape of scripts/export_real_size.py")
    parser.add_argument("--workdir", type=Path, help="scratch folder (required; created, then emptied)")
    parser.add_argument("--tokens", type=int, default=8, help="new tokens per generation")
    parser.add_argument("--output", type=Path, default=None, help="write the JSON report here too")
    parser.add_argument("--min-available-gb", type=float, default=16.0)
    parser.add_argument("--wait-minutes", type=float, default=30.0)
    parser.add_argument("--keep", action="store_true", help="keep the exported folder")
    parser.add_argument("--generate-only", metavar="FOLDER", help=argparse.SUPPRESS)  # the child phase
    args = parser.parse_args()
    if args.generate_only:
        print(json.dumps(generate_here(args.generate_only, args.tokens)))
        return 0
    if args.workdir is None:
        parser.error("--workdir is required")

    workdir = args.workdir.resolve()
    first, moved, elsewhere = (
        workdir / "export",
        workdir / "moved" / "neo-moved",
        workdir / "unrelated" / "cwd",
    )
    for folder in (workdir, moved.parent, elsewhere):
        folder.mkdir(parents=True, exist_ok=True)
    report: dict = {
        "shape": args.shape,
        "available_memory_gb": wait_for_memory(args.min_available_gb, args.wait_minutes),
    }
    try:
        export_command = [sys.executable, str(SCRIPTS / "export_real_size.py"), "--shape", args.shape]
        export_command += ["--output", str(first), "--external-data"]
        report["export"] = run_phase(export_command, workdir)

        generate = [sys.executable, str(Path(__file__).resolve()), "--tokens", str(args.tokens)]
        generate.append("--generate-only")
        report["generate_in_place"] = run_phase(generate + ["export"], workdir)

        started = time.perf_counter()
        shutil.move(first, moved)  # same filesystem: a rename; the folder's old path no longer exists
        report["move_seconds"] = round(time.perf_counter() - started, 2)
        relative = os.path.relpath(moved, elsewhere)
        report["generate_after_move"] = run_phase(generate + [relative], elsewhere)
    finally:
        if not args.keep:
            for folder in (first, moved.parent, elsewhere.parent):
                shutil.rmtree(folder, ignore_errors=True)
    same = report["generate_in_place"]["tokens"] == report["generate_after_move"]["tokens"]
    report["same_tokens_after_move"] = same
    text = json.dumps(report, indent=2)
    print(text)
    if args.output:
        args.output.write_text(text)
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
