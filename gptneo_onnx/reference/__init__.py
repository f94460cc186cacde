"""The PyTorch reference GPT-Neo (needs the `export` extra: torch)."""

from gptneo_onnx.reference.generate import greedy_generate
from gptneo_onnx.reference.heads import TASK_CLASSES, TASKS
from gptneo_onnx.reference.loading import (
    CheckpointError,
    build_model,
    from_pretrained,
    from_transformers,
    load_weights,
)
from gptneo_onnx.reference.model import GPTNeoModel, attention_bias, position_ids_from_mask

__all__ = [
    "TASKS",
    "TASK_CLASSES",
    "CheckpointError",
    "GPTNeoModel",
    "attention_bias",
    "build_model",
    "from_pretrained",
    "from_transformers",
    "greedy_generate",
    "load_weights",
    "position_ids_from_mask",
]
