"""Train the project's bundled default GPT-Neo on the Python standard library, CPU only.

Seeded and deterministic. The learning rate warms up, holds at its peak, then decays on a
cosine over the last quarter of a wall-clock budget (`--minutes`); that decay is sized
from the step times measured just before it starts, so the budget holds even when other
work shares the CPU. The resulting step counts are recorded in `training.json`, together
with the command that reproduces the run exactly (`--steps N --decay-start S`). Run from
the repository root:

    .venv/bin/python scripts/train_default_model.py --minutes 30 --output /tmp/default-model

It never writes into the shipped `gptneo_onnx/default_model`: review a new model, then copy it
in and commit it.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import random
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import tokenizers
import torch
import transformers
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from tqdm import tqdm
from transformers import GPTNeoConfig, GPTNeoForCausalLM

from gptneo_onnx.stdlib_corpus import encode_documents, load_sources, split_sources, stdlib_root, write_split

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUTPUT = REPO_ROOT / "gptneo_onnx" / "default_model"
END_OF_TEXT = "<|endoftext|>"
END_OF_TEXT_ID = 0
VOCAB_SIZE = 4096
CONTEXT = 512
TORCH_THREADS = 2
DECAY_SHARE = 0.25  # the cosine decay fills this last share of a time budget
STEP_TIME_WINDOW = 20  # recent steps whose mean time sizes the decay
PLANNING_MARGIN = 0.95  # share of the remaining budget the decay steps may fill
LOSS_LOG_EVERY = 50


@dataclass(frozen=True)
class Hyperparameters:
    seed: int = 0
    batch_size: int = 4
    context: int = CONTEXT
    learning_rate: float = 8e-4
    min_learning_rate: float = 8e-5
    warmup_steps: int = 50
    weight_decay: float = 0.1
    adam_betas: tuple[float, float] = (0.9, 0.95)
    grad_clip: float = 1.0


@dataclass
class Schedule:
    """Steps where the cosine decay starts and ends; `None` while a budget run is undecided."""

    decay_start: int | None = None
    total_steps: int | None = None


@dataclass
class TrainingRun:
    schedule: Schedule
    steps: int = 0
    seconds: float = 0.0
    stopped_by_budget: bool = False
    losses: list[float] = field(default_factory=list)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=30.0, help="training time budget")
    parser.add_argument("--steps", type=int, help="fixed schedule length; ignores --minutes (exact rerun)")
    parser.add_argument(
        "--decay-start", type=int, help="with --steps: step where the decay starts (default: end of warmup)"
    )
    parser.add_argument("--stop-after", type=int, help="stop after this many steps of the --steps schedule")
    parser.add_argument("--seed", type=int, default=Hyperparameters.seed)
    parser.add_argument("--batch-size", type=int, default=Hyperparameters.batch_size)
    parser.add_argument(
        "--learning-rate",
        type=float,
        default=Hyperparameters.learning_rate,
        help="peak; the floor is a tenth",
    )
    parser.add_argument("--output", type=Path, required=True, help="a new folder (not the shipped model)")
    args = parser.parse_args()
    if args.output.resolve() == DEFAULT_OUTPUT.resolve():
        parser.error(f"--output {args.output} is the shipped model; train elsewhere, then copy it in")
    if args.minutes <= 0:
        parser.error("--minutes must be positive")
    if args.steps is not None and args.steps <= 0:
        parser.error("--steps must be positive")
    if args.stop_after is not None and (args.steps is None or args.stop_after <= 0):
        parser.error("--stop-after needs --steps and must be positive")
    if args.decay_start is not None and (args.steps is None or not 0 <= args.decay_start < args.steps):
        parser.error("--decay-start needs --steps and must lie in [0, steps)")
    return args


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.use_deterministic_algorithms(True)
    torch.set_num_threads(TORCH_THREADS)


def train_tokenizer(texts: list[str]) -> Tokenizer:
    """Byte-level BPE whose decode(encode(text)) returns `text` exactly."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=[END_OF_TEXT],  # first special token gets id 0
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    if tokenizer.token_to_id(END_OF_TEXT) != END_OF_TEXT_ID:
        raise RuntimeError(f"{END_OF_TEXT} did not get id {END_OF_TEXT_ID}")
    return tokenizer


def model_config() -> GPTNeoConfig:
    return GPTNeoConfig(
        vocab_size=VOCAB_SIZE,
        max_position_embeddings=CONTEXT,
        hidden_size=256,
        num_layers=4,
        num_heads=8,
        attention_types=[[["global", "local"], 2]],
        window_size=128,
        intermediate_size=None,
        activation_function="gelu_new",
        embed_dropout=0.0,
        attention_dropout=0.0,
        resid_dropout=0.0,
        bos_token_id=END_OF_TEXT_ID,
        eos_token_id=END_OF_TEXT_ID,
        pad_token_id=END_OF_TEXT_ID,
    )


def learning_rate_at(step: int, schedule: Schedule, hp: Hyperparameters) -> float:
    """Linear warmup times a cosine decay to `min_learning_rate` over the decay steps."""
    warmup = min(1.0, (step + 1) / hp.warmup_steps)
    if schedule.decay_start is None or schedule.total_steps is None or step < schedule.decay_start:
        return hp.learning_rate * warmup
    progress = (step - schedule.decay_start) / max(1, schedule.total_steps - schedule.decay_start)
    floor = hp.min_learning_rate / hp.learning_rate
    decay = floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))
    return hp.learning_rate * warmup * decay


def build_optimizer(model: torch.nn.Module, hp: Hyperparameters) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices and embeddings only, not biases or norms."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": hp.weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=hp.learning_rate, betas=hp.adam_betas)


def sample_batch(ids: torch.Tensor, hp: Hyperparameters, generator: torch.Generator) -> torch.Tensor:
    """`(batch, context)` windows at seeded random offsets of the training stream."""
    starts = torch.randint(0, len(ids) - hp.context, (hp.batch_size,), generator=generator)
    return torch.stack([ids[start : start + hp.context] for start in starts.tolist()])


def plan_decay(steps_done: int, elapsed: float, step_seconds: list[float], budget: float) -> Schedule:
    """Decay that starts now and fills the rest of the budget at the recent step time."""
    recent = step_seconds[-STEP_TIME_WINDOW:]
    remaining = max(0.0, budget - elapsed) * PLANNING_MARGIN
    decay_steps = max(1, int(remaining / (sum(recent) / len(recent))))
    return Schedule(decay_start=steps_done, total_steps=steps_done + decay_steps)


def train(
    model: GPTNeoForCausalLM,
    ids: torch.Tensor,
    hp: Hyperparameters,
    schedule: Schedule,
    budget_seconds: float | None,
    stop_after: int | None,
) -> TrainingRun:
    """Train in place. With a budget, plan the decay once `DECAY_SHARE` of it is left."""
    run = TrainingRun(schedule=schedule)
    optimizer = build_optimizer(model, hp)
    generator = torch.Generator().manual_seed(hp.seed)
    progress = tqdm(total=schedule.total_steps, desc="train", unit="step", mininterval=10.0)
    model.train()
    start = previous = time.monotonic()
    step_seconds: list[float] = []
    while run.steps < min(run.schedule.total_steps or math.inf, stop_after or math.inf):
        batch = sample_batch(ids, hp, generator)
        learning_rate = learning_rate_at(run.steps, run.schedule, hp)
        for group in optimizer.param_groups:
            group["lr"] = learning_rate
        loss = model(input_ids=batch, labels=batch).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), hp.grad_clip)
        optimizer.step()

        run.steps += 1
        run.losses.append(loss.item())
        now = time.monotonic()
        step_seconds.append(now - previous)
        previous, elapsed = now, now - start
        tokens_per_second = run.steps * hp.batch_size * hp.context / elapsed
        progress.set_postfix(
            loss=f"{loss.item():.3f}",
            lr=f"{learning_rate:.2e}",
            tok_s=f"{tokens_per_second:.0f}",
            refresh=False,
        )
        progress.update()
        if budget_seconds is None:
            continue
        if run.schedule.decay_start is None and elapsed >= budget_seconds * (1.0 - DECAY_SHARE):
            run.schedule = plan_decay(run.steps, elapsed, step_seconds, budget_seconds)
            progress.total = run.schedule.total_steps
            progress.write(f"decay planned: steps {run.schedule.decay_start} to {run.schedule.total_steps}")
        if elapsed >= budget_seconds:
            run.stopped_by_budget = run.steps < (run.schedule.total_steps or 0)
            break
    progress.close()
    run.seconds = time.monotonic() - start
    return run


def loss_curve(losses: list[float], every: int) -> list[list[float]]:
    """`[last step, mean loss]` for each consecutive chunk of `every` steps."""
    chunks = [losses[start : start + every] for start in range(0, len(losses), every)]
    ends = [min(start + every, len(losses)) for start in range(0, len(losses), every)]
    return [[end, round(sum(chunk) / len(chunk), 4)] for end, chunk in zip(ends, chunks)]


def reproduce_command(run: TrainingRun, args: argparse.Namespace) -> str:
    command = (
        f"python scripts/train_default_model.py --steps {run.schedule.total_steps}"
        f" --decay-start {run.schedule.decay_start} --seed {args.seed} --batch-size {args.batch_size}"
    )
    if run.schedule.total_steps is not None and run.steps < run.schedule.total_steps:
        command += f" --stop-after {run.steps}"
    return command


def library_versions() -> dict[str, str]:
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "tokenizers": tokenizers.__version__,
        "numpy": np.__version__,
    }


def save_model_folder(output: Path, model: GPTNeoForCausalLM, tokenizer: Tokenizer, training: dict) -> None:
    """Write only the files the folder ships; drop the now stale quality.json."""
    output.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as scratch:
        model.save_pretrained(scratch, safe_serialization=True)
        for name in ("config.json", "model.safetensors"):
            shutil.copyfile(Path(scratch) / name, output / name)
    tokenizer.save(str(output / "tokenizer.json"))
    generation = {
        "bos_token_id": END_OF_TEXT_ID,
        "eos_token_id": END_OF_TEXT_ID,
        "pad_token_id": END_OF_TEXT_ID,
        "max_new_tokens": 64,
        "do_sample": False,
        # a tiny model loops under plain greedy decoding; this keeps the demo readable
        "repetition_penalty": 1.3,
        "transformers_version": transformers.__version__,
    }
    (output / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
    (output / "training.json").write_text(json.dumps(training, indent=2) + "\n")
    (output / "quality.json").unlink(missing_ok=True)


def main() -> None:
    args = parse_args()
    script_start = time.monotonic()
    hp = Hyperparameters(
        seed=args.seed,
        batch_size=args.batch_size,
        learning_rate=args.learning_rate,
        min_learning_rate=args.learning_rate / 10,
    )
    seed_everything(hp.seed)

    root = stdlib_root()
    sources = load_sources(root)
    split = split_sources(sources)
    print(f"corpus: {root}: {len(split.train)} train, {len(split.validation)} validation files")
    args.output.mkdir(parents=True, exist_ok=True)
    write_split(args.output / "split.json", split, sources)

    train_texts = [sources[path] for path in split.train]
    tokenizer = train_tokenizer(train_texts)
    ids = torch.from_numpy(encode_documents(tokenizer, train_texts, END_OF_TEXT_ID))
    print(f"tokenizer: vocab {tokenizer.get_vocab_size()}, {len(ids):,} training tokens")

    model = GPTNeoForCausalLM(model_config())
    parameters = sum(p.numel() for p in model.parameters())
    print(f"model: {parameters:,} parameters")
    if args.steps is None:
        schedule, budget = Schedule(), args.minutes * 60.0
    else:
        decay_start = hp.warmup_steps if args.decay_start is None else args.decay_start
        schedule, budget = Schedule(decay_start=decay_start, total_steps=args.steps), None
    run = train(model, ids, hp, schedule, budget, args.stop_after)

    tail = run.losses[-LOSS_LOG_EVERY:]
    training = {
        "model": "GPTNeoForCausalLM",
        "parameters": parameters,
        "hyperparameters": asdict(hp),
        "budget_minutes": None if args.steps else args.minutes,
        "schedule": asdict(run.schedule),
        "steps": run.steps,
        "stopped_by_budget": run.stopped_by_budget,
        "tokens_seen": run.steps * hp.batch_size * hp.context,
        "train_tokens": len(ids),
        "train_seconds": round(run.seconds, 1),
        "total_seconds": round(time.monotonic() - script_start, 1),
        "final_train_loss": round(sum(tail) / len(tail), 4),
        "final_train_loss_window": f"mean of the last {len(tail)} steps",
        "loss_curve": loss_curve(run.losses, LOSS_LOG_EVERY),
        "loss_curve_format": f"[last step, mean train loss] per {LOSS_LOG_EVERY} steps",
        "reproduce": reproduce_command(run, args),
        "torch_threads": TORCH_THREADS,
        "versions": library_versions(),
    }
    save_model_folder(args.output, model, tokenizer, training)
    print(
        f"done: {run.steps} steps in {run.seconds:.0f} s, "
        f"final train loss {training['final_train_loss']}; wrote {args.output}"
    )


if __name__ == "__main__":
    main()
