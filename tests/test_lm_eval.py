"""lm-evaluation-harness, run as its users run it: its `local-completions` model scores tasks
against `gptneo-onnx serve` (tokenizing through the server's /tokenize), and its `hf` model
scores the same tasks with transformers on the same checkpoint. Both runs must give the same
accuracy and the same log-likelihood per sample.

The tasks are local (no hub): multiple choice (which line comes next in a Python file), greedy
completion of that line (generate_until, stopping at the newline), and rolling log-likelihood
(perplexity over whole files, several context windows each), built from the bundled model's
held-out standard-library files.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("lm_eval")
from serve_helpers import app_server  # noqa: E402

from gptneo_onnx.cli.defaults import BUNDLED_MODEL_DIR  # noqa: E402
from gptneo_onnx.runtime import CausalLM  # noqa: E402
from gptneo_onnx.serve.api import ServerState  # noqa: E402
from gptneo_onnx.serve.engine import EngineLimits  # noqa: E402
from gptneo_onnx.stdlib_corpus import read_validation_paths, stdlib_root  # noqa: E402

NAME = "neo-bundled"
CHOICE_ITEMS, PERPLEXITY_DOCS = 24, 4
TASKS = {
    "neo_next_line": """
output_type: multiple_choice
doc_to_text: "{{context}}"
doc_to_choice: "{{choices}}"
doc_to_target: "{{label}}"
target_delimiter: ""
metric_list: [{metric: acc}]
""",
    # greedy, without the checkpoint's generation_config repetition penalty (transformers would
    # apply it; the server's OpenAI defaults do not); 64 new tokens at most, as that config's
    # max_new_tokens wins over the max_length lm_eval's hf model gives generate
    "neo_complete": """
output_type: generate_until
doc_to_text: "{{context}}"
doc_to_target: "{{answer}}"
generation_kwargs:
  {until: ["\\n"], max_gen_toks: 64, do_sample: false, temperature: 0.0, repetition_penalty: 1.0}
metric_list: [{metric: exact_match}]
""",
    "neo_perplexity": """
output_type: loglikelihood_rolling
doc_to_text: ""
doc_to_target: "{{text}}"
metric_list: [{metric: word_perplexity}, {metric: bits_per_byte}]
""",
}


def write_tasks(folder: Path) -> None:
    """Task YAMLs and their JSON lines from the held-out files (seeded)."""
    root = stdlib_root()
    paths = [p for p in read_validation_paths(BUNDLED_MODEL_DIR / "split.json") if (root / p).is_file()]
    sources = {path: (root / path).read_text(encoding="utf-8") for path in paths}
    lines = {
        path: [line for line in text.splitlines() if len(line.strip()) >= 12]
        for path, text in sources.items()
    }
    paths = [path for path in paths if len(lines[path]) > 40]
    assert len(paths) >= 4, "the held-out standard-library files are missing"
    rng = random.Random(0)
    items = []
    while len(items) < CHOICE_ITEMS:
        path = rng.choice(paths)
        at = rng.randrange(8, len(lines[path]))
        others = [rng.choice(lines[other]) for other in rng.sample([p for p in paths if p != path], 3)]
        choices = [lines[path][at], *others]
        rng.shuffle(choices)
        context = "\n".join(lines[path][at - 8 : at]) + "\n"
        items.append({"context": context, "choices": choices, "label": choices.index(lines[path][at])})
    documents = [{"text": sources[path][:2500]} for path in paths[:PERPLEXITY_DOCS]]
    completions = [{"context": item["context"], "answer": item["choices"][item["label"]]} for item in items]
    tasks = (("neo_next_line", items), ("neo_complete", completions), ("neo_perplexity", documents))
    for task, rows in tasks:
        data = folder / f"{task}.jsonl"
        data.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
        header = f"task: {task}\ndataset_path: json\ndataset_kwargs: {{data_files: {{test: {data}}}}}\n"
        (folder / f"{task}.yaml").write_text(header + "test_split: test\n" + TASKS[task], encoding="utf-8")


def run_lm_eval(folder: Path, out: Path, model: str, model_args: str) -> dict:
    """One `lm_eval` run; returns each task's log-likelihoods (per sample and choice), the
    metrics and the log."""
    command = [
        str(Path(sys.executable).with_name("lm_eval")), "--model", model, "--model_args", model_args,
        "--include_path", str(folder), "--tasks", ",".join(TASKS), "--log_samples", "--output_path", str(out),
    ]  # fmt: skip
    environment = {
        **os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
        "HF_DATASETS_CACHE": str(folder / "datasets-cache"), "TOKENIZERS_PARALLELISM": "false",
    }  # fmt: skip
    done = subprocess.run(command, env=environment, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    results = {}
    for task in TASKS:
        [samples] = out.rglob(f"samples_{task}_*.jsonl")
        rows = sorted(
            (json.loads(line) for line in samples.read_text().splitlines()), key=lambda r: r["doc_id"]
        )
        # a response is [loglikelihood, is_greedy] (multiple choice), [loglikelihood] (rolling)
        # or [text] (generation)
        responses = [response[0] for row in rows for response in row["resps"]]
        results[task] = [
            r if task == "neo_complete" else float(r[0] if isinstance(r, list) else r) for r in responses
        ]
    [summary] = out.rglob("results_*.json")
    results["metrics"] = json.loads(summary.read_text())["results"]
    results["log"] = done.stderr + done.stdout
    return results


def test_lm_eval_scores_the_server_as_it_scores_transformers(bundled_export, tmp_path):
    write_tasks(tmp_path)
    context = CausalLM.load(bundled_export).manifest.max_position_embeddings
    state = ServerState(
        lambda: CausalLM.load(bundled_export, intra_op_threads=1), NAME, EngineLimits(max_concurrent=4)
    )
    with app_server(state) as url:
        served = run_lm_eval(
            tmp_path, tmp_path / "served", "local-completions",
            f"model={NAME},base_url={url}/v1/completions,tokenized_requests=True,max_length={context},"
            "num_concurrent=4",
        )  # fmt: skip
    # no tokenizer given: lm_eval found the server's /tokenizer_info and /tokenize and used them
    assert "Using remote tokenizer" in served["log"]
    # local-completions keeps a token for the answer and windows by max_length - 2: the hf
    # model gets the same windows with max_length = context - 2
    reference = run_lm_eval(
        tmp_path,
        tmp_path / "hf",
        "hf",
        f"pretrained={BUNDLED_MODEL_DIR},dtype=float32,max_length={context - 2}",
    )
    assert len(served["neo_next_line"]) == CHOICE_ITEMS * 4
    assert served["neo_next_line"] == pytest.approx(reference["neo_next_line"], abs=1e-3)
    # whole files: sums over ~700 tokens in float32 differ in the last digits
    assert served["neo_perplexity"] == pytest.approx(reference["neo_perplexity"], rel=1e-6, abs=5e-3)
    # greedy completions cut at the first newline: the same text, character for character
    assert len(served["neo_complete"]) == CHOICE_ITEMS and any(served["neo_complete"])
    assert served["neo_complete"] == reference["neo_complete"]
    metrics = served["metrics"], reference["metrics"]
    assert metrics[0]["neo_next_line"]["acc,none"] == metrics[1]["neo_next_line"]["acc,none"]
    assert metrics[0]["neo_perplexity"]["bits_per_byte,none"] == pytest.approx(
        metrics[1]["neo_perplexity"]["bits_per_byte,none"], rel=1e-5
    )
