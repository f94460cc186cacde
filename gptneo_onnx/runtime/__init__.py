"""The thin runtime: run gptneo-onnx exports with onnxruntime, numpy and tokenizers only.

    from gptneo_onnx.runtime import Model
    model = Model.load("export-dir", provider="auto")
    print(model.generate("Once upon a time", max_new_tokens=20).texts[0])

Importing this package never imports torch, transformers or optimum.
"""

from gptneo_onnx.runtime.causal_lm import CausalLM
from gptneo_onnx.runtime.errors import (
    ExportFolderError,
    GenerationConfigError,
    InputError,
    NumericalError,
    ProviderError,
    RuntimeModelError,
)
from gptneo_onnx.runtime.generation import (
    GenerationConfig,
    GenerationResult,
    TokenStep,
    check_choices,
    check_finite,
    seeded_rng,
)
from gptneo_onnx.runtime.head_models import Embedder, QuestionAnswerer, SequenceClassifier, TokenClassifier
from gptneo_onnx.runtime.kv_cache import (
    BoundConcatCache,
    CacheSpec,
    ConcatCache,
    KVCache,
    RaggedCache,
    SharedBufferCache,
)
from gptneo_onnx.runtime.manifest import Manifest, load_manifest
from gptneo_onnx.runtime.model import Model
from gptneo_onnx.runtime.providers import ProviderOptions, available_providers
from gptneo_onnx.runtime.sampling import log_softmax, sample
from gptneo_onnx.runtime.streaming import IncrementalDecoder, StopStringFilter, stream_text

__all__ = [
    "BoundConcatCache",
    "CacheSpec",
    "CausalLM",
    "ConcatCache",
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
    "ProviderOptions",
    "QuestionAnswerer",
    "RaggedCache",
    "RuntimeModelError",
    "SequenceClassifier",
    "SharedBufferCache",
    "StopStringFilter",
    "TokenClassifier",
    "TokenStep",
    "available_providers",
    "check_choices",
    "check_finite",
    "load_manifest",
    "log_softmax",
    "sample",
    "seeded_rng",
    "stream_text",
]
