"""Held-out perplexity and greedy samples of the default model, with PyTorch transformers.

Scores the validation files listed in the model folder's `split.json`, concatenated with
`<|endoftext|>` between files and cut into non-overlapping 512-token windows, and writes
`quality.json` to --out (never into the shipped model folder: copy it in and commit it). Run
from the repository root:

    .venv/bin/python scripts/evaluate_default_model.py --out /tmp/quality.json
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm
from train_default_model import (
    CONTEXT,
    DEFAULT_OUTPUT,
    TORCH_THREADS,
    library_versions,
)
from transformers import GPTNeoForCausalLM, PreTrainedTokenizerFast

from gptneo_onnx.stdlib_corpus import (
    chop_windows,
    corpus_fingerprint,
    load_sources,
    read_validation_paths,
    stdlib_root,
    validation_ids,
)

DEFAULT_PROMPTS = ("def fibonacci(n):", "import os\n")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=DEFAULT_OUTPUT, help="model folder")
    parser.add_argument("--out", type=Path, required=True, help="where to write quality.json")
    parser.add_argument("--max-windows", type=int, default=200, help="windows to score")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--prompt", action="append", help=f"greedy sample prompt (default {DEFAULT_PROMPTS})")
    args = parser.parse_args()
    if args.out.resolve().parent == DEFAULT_OUTPUT.resolve():
        parser.error(f"--out {args.out} is inside the shipped model; write it elsewhere, then copy it in")
    if args.max_windows <= 0 or args.batch_size <= 0:
        parser.error("--max-windows and --batch-size must be positive")
    return args


def validation_windows(model_folder: Path, max_windows: int) -> tuple[np.ndarray, dict]:
    """Token windows of the validation files named in `split.json`, plus provenance."""
    split_path = model_folder / "split.json"
    if not split_path.is_file():
        raise FileNotFoundError(f"{split_path} is missing; run train_default_model.py first")
    sources = load_sources(stdlib_root())
    ids = validation_ids(model_folder, sources)
    trained_on = json.loads(split_path.read_text(encoding="utf-8"))["corpus_sha256"]
    provenance = {
        "validation_files": len(read_validation_paths(split_path)),
        "validation_tokens": len(ids),
        "corpus_matches_training": corpus_fingerprint(sources) == trained_on,
    }
    return chop_windows(ids, CONTEXT, max_windows), provenance


@torch.no_grad()
def mean_token_nll(model: GPTNeoForCausalLM, windows: np.ndarray, batch_size: int) -> float:
    """Mean next-token negative log-likelihood over every position after the first."""
    total_nll = 0.0
    for start in tqdm(range(0, len(windows), batch_size), desc="eval", unit="batch"):
        batch = torch.from_numpy(windows[start : start + batch_size])
        logits = model(input_ids=batch).logits  # (B, T, vocab)
        nll = torch.nn.functional.cross_entropy(
            logits[:, :-1].reshape(-1, logits.shape[-1]),
            batch[:, 1:].reshape(-1),
            reduction="sum",
        )
        total_nll += nll.item()
    return total_nll / (windows.shape[0] * (windows.shape[1] - 1))


@torch.no_grad()
def greedy_samples(model_folder: Path, model: GPTNeoForCausalLM, prompts: list[str]) -> dict:
    """Greedy completions, using the folder's generation_config.json defaults."""
    tokenizer = PreTrainedTokenizerFast(tokenizer_file=str(model_folder / "tokenizer.json"))
    samples = {}
    for prompt in prompts:
        input_ids = torch.tensor([tokenizer.encode(prompt)])
        output = model.generate(input_ids, attention_mask=torch.ones_like(input_ids))
        samples[prompt] = tokenizer.decode(output[0, input_ids.shape[1] :])
    return samples


def main() -> None:
    args = parse_args()
    torch.set_num_threads(TORCH_THREADS)
    start = time.monotonic()
    windows, provenance = validation_windows(args.model, args.max_windows)
    model = GPTNeoForCausalLM.from_pretrained(args.model).eval()
    nll = mean_token_nll(model, windows, args.batch_size)
    samples = greedy_samples(args.model, model, args.prompt or list(DEFAULT_PROMPTS))
    quality = {
        "perplexity": round(math.exp(nll), 4),
        "mean_token_nll": round(nll, 6),
        "tokens_scored": int(windows.shape[0] * (windows.shape[1] - 1)),
        "windows": int(windows.shape[0]),
        "window_tokens": CONTEXT,
        "max_windows": args.max_windows,
        **provenance,
        "method": "transformers GPTNeoForCausalLM, fp32; non-overlapping windows from the "
        "start of the validation stream; the first token of each window is not scored",
        "greedy_samples": samples,
        "seconds": round(time.monotonic() - start, 1),
        "versions": library_versions(),
    }
    args.out.write_text(json.dumps(quality, indent=2) + "\n")
    print(f"perplexity {quality['perplexity']} over {quality['tokens_scored']:,} tokens")
    for prompt, completion in samples.items():
        print(f"--- {prompt!r}\n{prompt}{completion}")


if __name__ == "__main__":
    main()
