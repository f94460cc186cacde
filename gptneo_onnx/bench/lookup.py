"""Prompt-lookup decoding on the bundled model, ours beside transformers', in one run.

    gptneo-onnx bench-lookup            # 5 prompts, N = 3, 5, 8, medians of 7 rounds (minutes)
    gptneo-onnx bench-lookup --quick    # 2 prompts, N = 3, 1 round: a smoke test

The bundled model's optimized export (cached in --work) and transformers' GPTNeoForCausalLM on
the same checkpoint decode 64 new tokens greedily (min_new_tokens = 64, the model's own
repetition penalty) from each prompt, with prompt lookup off and with N draft tokens. Prompts:

- editing: a stdlib function's source (inspect.getsource), then
  "\\n\\n# The same function, with one name changed:\\n" and its `def` line with the function
  renamed (textwrap.indent -> indent_lines, shlex.split -> split_words, string.capwords ->
  capitalize_words);
- the edit prompt of tests/test_prompt_lookup.py (a function shown 3 times, then the start of
  a copy with `parse` renamed `read`);
- continuation in context: the source of shlex.quote (ids P), our plain greedy 64-token
  continuation of it (ids C), then the prompt P + C + P, whose greedy continuation is C again
  as far as the model repeats itself.

Each round runs every (prompt, system, setting) once, in reversed order every other round;
medians of the rounds. Decode tok/s counts the tokens after the first forward step over the
time after it (the first step holds the prefill). Every run's tokens must equal its system's
plain greedy tokens, and ours must equal transformers': a mismatch stops the benchmark. Forward
steps are counted (our session's forward, a pre-hook on transformers' model); accepted drafts
per step = (new tokens - steps) / steps. The step-cost probe times one forward step of K tokens
on a past against a one-token step (K = N + 1, a verification step). "copied" counts the leading
tokens of the plain continuation that spell what a copying model would write (the function's
body, or C). `--repetition-penalty 1.0` turns the model's penalty off. Writes lookup.json,
lookup.md and lookup.png to --output.
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import json
import os
import platform
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from gptneo_onnx.cli.defaults import BUNDLED_MODEL_DIR

NEW_TOKENS = 64
TARGET = 1.8  # issue 18: decode speed-up on editing-style prompts
EDITS = (("textwrap", "indent", "indent_lines"), ("shlex", "split", "split_words"))
EDITS += (("string", "capwords", "capitalize_words"),)
EDIT_HEADER = "\n\n# The same function, with one name changed:\n"
_FUNCTION = 'def parse(line, default=None):\n    key, sep, value = line.partition(":")\n'
_FUNCTION += "    if not sep:\n        return default\n    return key.strip(), value.strip()\n"
# tests/test_prompt_lookup.py::test_bundled_model_on_an_edit_prompt_matches_transformers
TEST_EDIT_PROMPT = _FUNCTION * 3 + "\n\n" + _FUNCTION.replace("parse", "read")[:40]
CONTINUATION_BASE = ("shlex", "quote")


@dataclass(frozen=True)
class Plan:
    rounds: int
    lookups: tuple[int, ...]
    prompts: tuple[str, ...] | None  # None: all
    probe_repeats: int


FULL = Plan(7, (3, 5, 8), None, 100)
QUICK = Plan(1, (3,), ("shlex.split", "continuation in context"), 5)


@dataclass
class Run:
    tokens: list[int]
    decode_tok_s: float
    total_s: float
    step_lengths: list[int]  # input tokens of each forward step, the prefill first
    produced: int = NEW_TOKENS  # transformers' prompt lookup may make one token more


@dataclass
class Prompt:
    name: str
    description: str
    ids: list[int]
    copy: str  # the text a model that copies its context would continue with
    copy_tokens: int  # its length in tokens
    reference: dict[str, Run] = field(default_factory=dict)  # "ours"/"transformers" plain run


def source(module: str, name: str) -> str:
    return inspect.getsource(getattr(importlib.import_module(module), name))


def build_prompts(ours: Ours, plan: Plan) -> list[Prompt]:
    """The prompts of the module docstring, as token ids of the bundled tokenizer."""
    encode = ours.model.tokenizer.encode

    prompts = []
    for module, name, new_name in EDITS:
        text = source(module, name)
        renamed = text.splitlines()[0].replace(f"def {name}(", f"def {new_name}(") + "\n"
        description = f"`{module}.{name}` source, the header, then `{renamed.strip()}`"
        body = text.split("\n", 1)[1]
        prompt = encode(text + EDIT_HEADER + renamed).ids
        prompts.append(Prompt(f"{module}.{name}", description, prompt, body, len(encode(body).ids)))
    description = "`parse` x 3, then the start of a copy renamed `read` (tests/test_prompt_lookup.py)"
    rest = _FUNCTION.replace("parse", "read")[40:]
    prompt = encode(TEST_EDIT_PROMPT).ids
    prompts.append(Prompt("test edit prompt", description, prompt, rest, len(encode(rest).ids)))
    base = encode(source(*CONTINUATION_BASE)).ids
    continuation = ours.run(base, None).tokens
    description = f"`{'.'.join(CONTINUATION_BASE)}` source P, its greedy continuation C, then P + C + P"
    copy = ours.model.tokenizer.decode(continuation)
    ids = base + continuation + base
    prompts.append(Prompt("continuation in context", description, ids, copy, len(continuation)))
    return [prompt for prompt in prompts if plan.prompts is None or prompt.name in plan.prompts]


def copied(tokens: list[int], copy: str, decode) -> int:
    """How many leading tokens of the continuation spell the start of the copy (compared as text,
    so a token boundary that BPE draws differently at the prompt's end does not count)."""
    return next((k for k in range(len(tokens), 0, -1) if copy.startswith(decode(tokens[:k]))), 0)


def decode_rate(arrivals: list[tuple[float, int]], start: float) -> tuple[float, float]:
    """(decode tok/s after the first step, total seconds) from (time, tokens) arrivals."""
    first, last = arrivals[0][0], arrivals[-1][0]
    later = sum(count for _, count in arrivals[1:])
    return later / (last - first), last - start


class Ours:
    """The bundled model's optimized export through the runtime, counting its forward steps."""

    def __init__(self, export_dir: Path, threads: int, repetition_penalty: float):
        from gptneo_onnx.runtime import CausalLM

        self.model = CausalLM.load(export_dir, provider="cpu", intra_op_threads=threads)
        self.repetition_penalty = repetition_penalty
        self.lengths: list[int] = []
        forward = self.model.forward
        self.model.forward = lambda ids, *a, **k: self.lengths.append(ids.shape[1]) or forward(ids, *a, **k)

    def run(self, ids: list[int], lookup: int | None) -> Run:
        from gptneo_onnx.runtime import TokenStep

        self.lengths = []
        settings = dict(max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False)
        settings |= dict(repetition_penalty=self.repetition_penalty, prompt_lookup_num_tokens=lookup)
        arrivals, tokens = [], []
        start = time.perf_counter()
        for event in self.model.generate_steps([ids], **settings):
            if isinstance(event, TokenStep):
                arrivals.append((time.perf_counter(), 1))
                tokens.append(int(event.token_ids[0]))
        rate, total = decode_rate(arrivals, start)
        return Run(tokens, rate, total, self.lengths)

    def step_ms(self, ids: list[int], widths: list[int], repeats: int) -> dict[str, float]:
        """Median ms of a forward step of each width on a past of `ids` (logits for each token),
        the widths taking turns."""
        prompt = np.array([ids], np.int64)
        _, cache = self.model.forward(prompt, np.ones_like(prompt), num_logits_to_keep=1)
        times: dict[str, list[float]] = {str(width): [] for width in widths}
        for _ in range(repeats):
            for width in widths:
                mask = np.ones((1, prompt.shape[1] + width), np.int64)
                start = time.perf_counter()
                _, cache = self.model.forward(prompt[:, :width], mask, past=cache, num_logits_to_keep=width)
                times[str(width)].append(time.perf_counter() - start)
                cache.drop_newest(width)
        return {width: 1000 * statistics.median(samples) for width, samples in times.items()}


class Transformers:
    """transformers' GPTNeoForCausalLM on the bundled checkpoint; torch threads set to ours."""

    def __init__(self, threads: int, repetition_penalty: float):
        import torch
        from transformers import GPTNeoForCausalLM

        torch.set_num_threads(threads)
        self.torch = torch
        self.model = GPTNeoForCausalLM.from_pretrained(BUNDLED_MODEL_DIR).eval()
        self.repetition_penalty = repetition_penalty
        self.lengths: list[int] = []
        hook = lambda _module, _args, kwargs: self.lengths.append(kwargs["input_ids"].shape[1])  # noqa: E731
        self.model.register_forward_pre_hook(hook, with_kwargs=True)

    def run(self, ids: list[int], lookup: int | None) -> Run:
        from transformers.generation.streamers import BaseStreamer

        arrivals: list[tuple[float, int]] = []

        class Arrivals(BaseStreamer):
            def put(self, value):  # the prompt first, then each step's new tokens
                arrivals.append((time.perf_counter(), int(value.numel())))

            def end(self):
                pass

        self.lengths = []
        input_ids = self.torch.tensor([ids])
        start = time.perf_counter()
        with self.torch.inference_mode():
            output = self.model.generate(
                input_ids,
                attention_mask=self.torch.ones_like(input_ids),
                do_sample=False,
                max_new_tokens=NEW_TOKENS,
                min_new_tokens=NEW_TOKENS,
                repetition_penalty=self.repetition_penalty,
                prompt_lookup_num_tokens=lookup,
                streamer=Arrivals(),
            )
        rate, total = decode_rate(arrivals[1:], start)
        tokens = output[0, len(ids) :].tolist()
        return Run(tokens[:NEW_TOKENS], rate, total, self.lengths, len(tokens))

    def step_ms(self, ids: list[int], widths: list[int], repeats: int) -> dict[str, float]:
        prompt = self.torch.tensor([ids])
        times: dict[str, list[float]] = {str(width): [] for width in widths}
        with self.torch.inference_mode():
            cache = self.model(input_ids=prompt, use_cache=True).past_key_values
            for _ in range(repeats):
                for width in widths:
                    start = time.perf_counter()
                    step = prompt[:, :width]
                    self.model(input_ids=step, past_key_values=cache, use_cache=True, logits_to_keep=width)
                    times[str(width)].append(time.perf_counter() - start)
                    cache.crop(len(ids))
        return {width: 1000 * statistics.median(samples) for width, samples in times.items()}


def setting_name(lookup: int | None) -> str:
    return "plain" if lookup is None else f"N={lookup}"


def check_tokens(prompt: Prompt, system: str, lookup: int | None, run: Run) -> None:
    """Every run gives its system's plain greedy tokens, and ours are transformers'."""
    plain = prompt.reference.get(system, run)
    if run.tokens != plain.tokens or len(run.tokens) != NEW_TOKENS:
        raise RuntimeError(
            f"{system} with {setting_name(lookup)} on {prompt.name!r} made other tokens than its plain "
            f"greedy run ({len(run.tokens)} tokens): prompt-lookup decoding must not change the output"
        )
    other = prompt.reference.get("ours" if system == "transformers" else "transformers")
    if other is not None and other.tokens != plain.tokens:
        raise RuntimeError(f"ours and transformers' plain greedy tokens differ on {prompt.name!r}")


def measure(systems: dict, prompts: list[Prompt], plan: Plan, progress: bool) -> dict:
    """Per prompt, system and setting: the tok/s samples, steps and tokens."""
    settings = [None, *plan.lookups]
    jobs = [(prompt, system, lookup) for prompt in prompts for system in systems for lookup in settings]
    samples: dict = {(p.name, s, setting_name(n)): [] for p, s, n in jobs}
    runs: dict = {}
    bar = tqdm(total=len(jobs) * (plan.rounds + 1), desc="generations", unit="run", disable=not progress)
    for round_index in range(plan.rounds + 1):  # round 0 warms up and keeps the reference runs
        for prompt, system, lookup in jobs if round_index % 2 == 0 else jobs[::-1]:
            run = systems[system].run(prompt.ids, lookup)
            if round_index == 0 and lookup is None:
                prompt.reference[system] = run
            check_tokens(prompt, system, lookup, run)
            key = (prompt.name, system, setting_name(lookup))
            if round_index == 0:
                runs[key] = run
            else:
                samples[key].append(run.decode_tok_s)
            bar.update()
    bar.close()
    return {"samples": samples, "runs": runs}


def summarize(prompts: list[Prompt], systems: list[str], plan: Plan, measured: dict, tokenizer) -> list[dict]:
    rows = []
    for prompt in prompts:
        row = {"name": prompt.name, "description": prompt.description, "prompt_ids": prompt.ids}
        row["plain_tokens"] = prompt.reference["ours"].tokens
        row["copied_tokens"] = copied(row["plain_tokens"], prompt.copy, tokenizer.decode)
        row["copy_tokens"] = prompt.copy_tokens
        for system in systems:
            results = {}
            for lookup in [None, *plan.lookups]:
                name = setting_name(lookup)
                run, samples = (
                    measured["runs"][prompt.name, system, name],
                    measured["samples"][prompt.name, system, name],
                )
                steps = len(run.step_lengths)
                drafted = sum(run.step_lengths) - len(prompt.ids) - (steps - 1)
                results[name] = {
                    "tok_s": statistics.median(samples),
                    "tok_s_samples": samples,
                    "total_s": run.total_s,
                    "steps": steps,
                    "drafted": drafted,
                    "accepted_per_step": (run.produced - steps) / steps,
                    "tokens": run.tokens,
                }
            plain = results["plain"]["tok_s"]
            for values in results.values():
                values["speedup"] = values["tok_s"] / plain
            row[system] = results
        rows.append(row)
    return rows


def probe_steps(systems: dict, ids: list[int], plan: Plan) -> dict:
    """ms of a forward step of K = 1 and K = N + 1 tokens on a past of the prompt, per system."""
    widths = [1, *(n + 1 for n in plan.lookups)]
    return {name: system.step_ms(ids, widths, plan.probe_repeats) for name, system in systems.items()}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog="gptneo-onnx bench-lookup", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="2 prompts, N = 3, 1 round: a smoke test")
    parser.add_argument(
        "--threads", type=int, default=os.cpu_count() or 1, help="onnxruntime and torch threads"
    )
    parser.add_argument("--rounds", type=int, help="timed rounds (default 7, --quick 1)")
    parser.add_argument("--work", type=Path, default=Path("bench-work") / "lookup", help="cached export")
    parser.add_argument("--export", type=Path, help="use this export of the bundled model instead")
    parser.add_argument("--output", type=Path, default=Path("bench-lookup-results"))
    parser.add_argument(
        "--repetition-penalty", type=float, help="default: the bundled model's generation_config.json (1.3)"
    )
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    plan = QUICK if args.quick else FULL
    if args.rounds is not None:
        if args.rounds < 1:
            parser.error("--rounds must be >= 1")
        plan = Plan(args.rounds, plan.lookups, plan.prompts, plan.probe_repeats)
    if args.threads < 1:
        parser.error("--threads must be >= 1")
    import matplotlib  # noqa: F401  (the bench extra: fail before measuring, not after)

    from gptneo_onnx.bench.lookup_report import write_chart, write_table

    penalty = args.repetition_penalty
    if penalty is None:
        defaults = json.loads((BUNDLED_MODEL_DIR / "generation_config.json").read_text())
        penalty = float(defaults.get("repetition_penalty", 1.0))
    if not penalty > 0:
        parser.error("--repetition-penalty must be > 0")
    export_dir = args.export or cached_export(args.work)
    systems = {
        "ours": Ours(export_dir, args.threads, penalty),
        "transformers": Transformers(args.threads, penalty),
    }
    prompts = build_prompts(systems["ours"], plan)
    load_before = os.getloadavg()
    measured = measure(systems, prompts, plan, not args.no_progress)
    results = {
        "settings": {
            "new_tokens": NEW_TOKENS,
            "rounds": plan.rounds,
            "lookups": list(plan.lookups),
            "threads": args.threads,
            "repetition_penalty": penalty,
            "export": str(export_dir),
            "target": TARGET,
            "load_average": [load_before[0], os.getloadavg()[0]],
            "versions": versions(),
        },
        "prompts": summarize(prompts, list(systems), plan, measured, systems["ours"].model.tokenizer),
        "step_ms": probe_steps(systems, prompts[0].ids, plan),
    }
    args.output.mkdir(parents=True, exist_ok=True)
    (args.output / "lookup.json").write_text(json.dumps(results, indent=1) + "\n")
    table = write_table(results, args.output / "lookup.md")
    write_chart(results, args.output / "lookup.png")
    print(table)
    return results


def cached_export(work: Path) -> Path:
    """The bundled model's optimized export under `work`, remade when the exporter or the weights change."""
    import hashlib

    from gptneo_onnx.bench.models import exporter_stamp
    from gptneo_onnx.cli.defaults import export_bundled_model
    from gptneo_onnx.contract import MANIFEST_NAME

    folder = work / "bundled-optimized"
    stamp = folder.with_name(folder.name + ".stamp")
    weights = hashlib.sha256((BUNDLED_MODEL_DIR / "model.safetensors").read_bytes()).hexdigest()
    expected = exporter_stamp() + weights
    if (folder / MANIFEST_NAME).is_file() and stamp.is_file() and stamp.read_text() == expected:
        return folder
    work.mkdir(parents=True, exist_ok=True)
    export_bundled_model(folder, progress=False, optimize=True, overwrite=True)
    stamp.write_text(expected)
    return folder


def versions() -> dict:
    import onnxruntime
    import torch
    import transformers

    return {
        "python": platform.python_version(),
        "onnxruntime": onnxruntime.__version__,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
    }


if __name__ == "__main__":
    main()
