"""The thin runtime: run gptneo-onnx exports with onnxruntime, numpy and tokenizers only.

    from gptneo_onnx.runtime import Model
    model = Model.load("export-dir", provider="auto")
    print(model.generate("Once upon a time", max_new_tokens=20).texts[0])

Importing this package never imports torch, transformers or optimum.
"""

from gptneo_onnx.runtime.causal_lm import CausalLM, KVCache
from gptneo_onnx.runtime.errors import (
    ExportFolderError,
    GenerationConfigError,
    InputError,
    NumericalError,
    ProviderError,
    RuntimeModelError,
)
from gptneo_onnx.runtime.generation import GenerationConfig, GenerationResult, TokenStep
from gptneo_onnx.runtime.manifest import Manifest, load_manifest
from gptneo_onnx.runtime.model import Model
from gptneo_onnx.runtime.providers import available_providers
from gptneo_onnx.runtime.streaming import IncrementalDecoder, stream_text
from gptneo_onnx.runtime.tasks import Embedder, QuestionAnswerer, SequenceClassifier, TokenClassifier

__all__ = [
    "CausalLM",
    "Embedder",
    "ExportFolderError",
    "GenerationConfig",
    "GenerationConfigError",
    "GenerationResult",
    "IncrementalDecoder",
    "InputError",
    "KVCache",
    "Manifest",
    "Model",
    "NumericalError",
    "ProviderError",
    "QuestionAnswerer",
    "RuntimeModelError",
    "SequenceClassifier",
    "TokenClassifier",
    "TokenStep",
    "available_providers",
    "load_manifest",
    "stream_text",
]
