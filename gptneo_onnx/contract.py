"""The contract between the exporter and every runtime: the facts the sidecar fixes.

Torch-free and onnxruntime-free: the exporter, the runtime, validation, the bench, the CLI and
the scripts all import these names instead of writing them again. docs/sidecar.md is the
document; this module is its one home in code.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

# ---- the sidecar file ---------------------------------------------------------------------
MANIFEST_NAME = "gptneo_onnx.json"
MANIFEST_FORMAT = "gptneo-onnx"
# The major version is the lowest one a reader needs: 1, or 2 for graphs with a windowed local
# cache (an extra required input, `local_attention_mask`, that a 1.x reader would not feed).
FORMAT_VERSION = 1
WINDOWED_LOCAL_CACHE_VERSION = 2
SUPPORTED_FORMAT_VERSIONS = (FORMAT_VERSION, WINDOWED_LOCAL_CACHE_VERSION)
# Minor versions only add fields: a reader of 1.0 runs a 1.1 export unchanged.
# 2: `optional_inputs` and the `io.num_logits_to_keep` role (causal-lm).
FORMAT_MINOR_VERSION = 2

# ---- export folders ------------------------------------------------------------------------
# An export is written into a staging folder `.NAME.partial-XXXX` holding OWNER_FILE, then renamed.
STAGING_INFIX = ".partial-"
OWNER_FILE = ".owner"
# transformers' tokenizer settings in an export (special tokens, padding side, the chat template)
TOKENIZER_CONFIG_NAME = "tokenizer_config.json"
CHAT_TEMPLATE_NAME = "chat_template.jinja"  # where newer checkpoints keep their chat template
# `validation.status`: only "passed" and "skipped" exports load.
VALIDATION_STATUSES = ("passed", "failed", "pending", "skipped")

# ---- operator domains ---------------------------------------------------------------------
DEFAULT_DOMAIN = "ai.onnx"  # ONNX spells the default operator domain "" or "ai.onnx"
RUNTIME_DOMAINS = (DEFAULT_DOMAIN, "com.microsoft")

# ---- flavors and precisions ---------------------------------------------------------------
FLAVORS = ("portable", "optimized")
PRECISIONS = ("float32", "float16")

# Quantization (onnxruntime's quantizers): the exporter's rules, the CLI's flags, the sidecar's record.
QUANTIZATION_METHODS = {"int8": "int8-dynamic", "int4": "int4-weight-only"}
DEFAULT_BLOCK_SIZE = 32
BLOCK_SIZE_RULE = "a power of two >= 16"
ACCURACY_LEVELS = range(5)  # MatMulNBits accuracy_level: 0 (as the weights) to 4 (int8 compute)
ACCURACY_LEVEL_RULE = f"{ACCURACY_LEVELS.start} to {ACCURACY_LEVELS.stop - 1}"
DEFAULT_ACCURACY_LEVEL = 4


def is_block_size(value: object) -> bool:
    """Whether `value` is a valid quantization block size (BLOCK_SIZE_RULE)."""
    return isinstance(value, int) and value >= 16 and not value & (value - 1)


# ---- tasks --------------------------------------------------------------------------------
@dataclass(frozen=True)
class Task:
    """One head: its graph's IO roles and the classes that implement it on each side."""

    name: str
    hf_class: str  # transformers' class, for checkpoints and parity tests
    reference_class: str  # gptneo_onnx.reference
    runtime_class: str  # gptneo_onnx.runtime
    outputs: tuple[str, ...]  # graph outputs, in order
    cached: bool = False  # takes position_ids and a KV cache (causal-lm)


TASKS: dict[str, Task] = {
    task.name: task
    for task in (
        Task("causal-lm", "GPTNeoForCausalLM", "GPTNeoForCausalLM", "CausalLM", ("logits",), cached=True),
        Task("base", "GPTNeoModel", "GPTNeoBase", "Embedder", ("last_hidden_state",)),
        Task(
            "sequence-classification",
            "GPTNeoForSequenceClassification",
            "GPTNeoForSequenceClassification",
            "SequenceClassifier",
            ("logits",),
        ),
        Task(
            "token-classification",
            "GPTNeoForTokenClassification",
            "GPTNeoForTokenClassification",
            "TokenClassifier",
            ("logits",),
        ),
        Task(
            "question-answering",
            "GPTNeoForQuestionAnswering",
            "GPTNeoForQuestionAnswering",
            "QuestionAnswerer",
            ("start_logits", "end_logits"),
        ),
    )
}
TASK_NAMES = tuple(TASKS)
HF_CLASS_TASKS = {task.hf_class: task.name for task in TASKS.values()}

# ---- graph IO roles and the KV cache --------------------------------------------------------
# `io` maps each role to its graph tensor; these are the names the exporter writes (Optimum's).
# A manifest written before `io` existed (format 1.0) means exactly these.
DEFAULT_IO = {
    "input_ids": "input_ids",
    "attention_mask": "attention_mask",
    "position_ids": "position_ids",
    "logits": "logits",
}
LOCAL_ATTENTION_MASK = "local_attention_mask"  # format 2: the local layers' own mask
# Cache layout: (batch, heads, past_sequence_length, head_dim) for every past and present.
CACHE_LAYOUT = ("batch", "heads", "past_sequence_length", "head_dim")


def cache_names(layer: int) -> dict[str, str]:
    """The past/present tensor names of one layer (Optimum's template)."""
    return {
        "past_key": f"past_key_values.{layer}.key",
        "past_value": f"past_key_values.{layer}.value",
        "present_key": f"present.{layer}.key",
        "present_value": f"present.{layer}.value",
    }


# ---- MLP activations -----------------------------------------------------------------------
# Every activation name transformers' ACT2FN accepts for GPT-Neo's MLP, by the formula it
# computes; the reference (torch) and the exporter (ONNX) each write every formula once. The
# ones with learned parameters (prelu, xielu) are refused: GPT-Neo checkpoints never use them.
ACTIVATIONS = {
    "gelu": "gelu_erf",
    "gelu_python": "gelu_erf",
    "gelu_10": "gelu_erf_clipped_10",
    "gelu_new": "gelu_tanh",
    "gelu_fast": "gelu_tanh",
    "gelu_accurate": "gelu_tanh",
    "gelu_pytorch_tanh": "gelu_tanh",
    "gelu_python_tanh": "gelu_tanh",
    "laplace": "laplace",
    "leaky_relu": "leaky_relu",
    "linear": "identity",
    "mish": "mish",
    "quick_gelu": "quick_gelu",
    "relu": "relu",
    "relu2": "relu_squared",
    "relu6": "relu6",
    "sigmoid": "sigmoid",
    "silu": "silu",
    "swish": "silu",
    "tanh": "tanh",
}
UNSUPPORTED_ACTIVATIONS = ("prelu", "xielu")


# ---- the position-id rule -------------------------------------------------------------------
POSITION_IDS_RULE = "cumsum_minus_one"


def position_ids_from_mask(attention_mask: np.ndarray, length: int) -> np.ndarray:
    """Positions of the last `length` tokens: cumsum(mask) - 1, clipped at 0, so left padding
    is skipped. `attention_mask` (B, past + new) -> (B, length) int64."""
    positions = np.clip(np.cumsum(attention_mask, axis=-1) - 1, 0, None)
    return positions[:, positions.shape[1] - length :].astype(np.int64, copy=False)


# ---- file hashes ----------------------------------------------------------------------------
def sha256_of(path: Path) -> str:
    """The hex sha256 of a file, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()
