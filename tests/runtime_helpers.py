"""Helpers for the runtime tests: a tiny byte-level tokenizer and tiny exports of every task."""

from __future__ import annotations

from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

# Multi-byte characters on purpose: byte-level BPE splits them across tokens.
CORPUS = [
    "Once upon a time there was a little robot named Zoë.",
    "Le café est très chaud, n'est-ce pas? Ça va très bien.",
    "東京 and 大阪 are cities in 日本. 🙂 emoji 🚀 rockets 🎉 parties.",
    "Straße, naïve, façade, jalapeño, smörgåsbord, Ελληνικά, русский.",
    "The quick brown fox jumps over the lazy dog. Alice met Bob in Paris.",
]
SPECIAL_TOKENS = ["<pad>", "<s>", "</s>"]  # ids 0, 1, 2: the tiny configs' pad, bos and eos


def train_tokenizer(path: Path, vocab_size: int = 320) -> Path:
    """A byte-level BPE tokenizer.json trained in well under a second."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(CORPUS * 4, trainer=trainer)
    tokenizer.save(str(path))
    return path


def export_tiny(
    task: str,
    folder: Path,
    tokenizer_file: Path | None = None,
    seed: int = 0,
    export_options: dict | None = None,
    **overrides,
):
    """Export a tiny random transformers model of `task`; returns (hf_model, export folder)."""
    from conftest import tiny_hf_model

    from gptneo_onnx.export import export
    from gptneo_onnx.reference import from_transformers

    hf_model = tiny_hf_model(task, seed=seed, **overrides)
    export(
        from_transformers(hf_model),
        folder,
        tokenizer_file=tokenizer_file,
        progress=False,
        **{"overwrite": True, **(export_options or {})},  # tests re-export into one folder
    )
    return hf_model, folder
