"""gptneo-onnx: GPT-Neo from PyTorch to ONNX, and a thin runtime to run it anywhere.

Importing this package loads nothing heavy; `gptneo_onnx.reference` and `gptneo_onnx.export`
need the `export` extra (torch, onnx), `gptneo_onnx.runtime` needs only onnxruntime, numpy
and tokenizers.
"""

from gptneo_onnx.config import ConfigError, GPTNeoConfig

__version__ = "0.1.0"
__all__ = ["ConfigError", "GPTNeoConfig", "__version__"]
