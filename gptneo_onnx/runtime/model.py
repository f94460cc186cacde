"""`Model.load`: read the manifest, verify the files, start a session, return the task's model."""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar

import onnxruntime as ort
from tokenizers import Tokenizer

from gptneo_onnx.runtime.encoding import load_tokenizer
from gptneo_onnx.runtime.errors import ExportFolderError
from gptneo_onnx.runtime.export_state import warn_if_unvalidated
from gptneo_onnx.runtime.manifest import Manifest, load_manifest
from gptneo_onnx.runtime.providers import ProviderOptions, create_session

_TASK_CLASSES: dict[str, type[Model]] = {}


class Model:
    """A loaded export. `Model.load` returns the subclass for the manifest's task.

    Attributes: `manifest`, `session` (onnxruntime.InferenceSession), `provider` (the short
    name of the provider that actually runs: cpu, cuda or tensorrt), `tokenizer` (a
    tokenizers.Tokenizer, or None when the export has none).
    """

    task: ClassVar[str | None] = None

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if cls.task is not None:
            _TASK_CLASSES[cls.task] = cls

    def __init__(
        self,
        manifest: Manifest,
        session: ort.InferenceSession,
        provider: str,
        tokenizer: Tokenizer | None,
        options: ProviderOptions,
    ):
        self.manifest = manifest
        self.session = session
        self.provider = provider
        self.tokenizer = tokenizer
        self.options = options

    @classmethod
    def load(
        cls,
        export_dir: str | Path,
        provider: str = "auto",
        *,
        device_id: int = 0,
        trt_fp16: bool = False,
        trt_engine_cache_dir: str | Path | None = None,
        cuda_tf32: bool = False,
        intra_op_threads: int | None = None,
        graph_optimization_level: str = "all",
        verify_hashes: bool = True,
        **task_options: Any,
    ) -> Model:
        """Load an export folder on `provider` (auto, cpu, cuda, tensorrt).

        Called on a task class (e.g. `CausalLM.load`), the folder must hold that task.
        `cuda_tf32=True` lets CUDA use TF32 matmuls (faster on Ampere and later; off by default
        because it moves fp32 logits ~1e-3 away from the reference).
        `verify_hashes=False` skips the sha256 checks of the files (faster start for big exports).
        """
        manifest = load_manifest(
            export_dir, task=cls.task, verify_hashes=verify_hashes, warn_unvalidated=False
        )
        target = _TASK_CLASSES.get(manifest.task)
        if target is None:
            raise ExportFolderError(f"no runtime class for task {manifest.task!r}")
        options = ProviderOptions(
            provider=provider,
            device_id=device_id,
            trt_fp16=trt_fp16,
            trt_engine_cache_dir=trt_engine_cache_dir,
            cuda_tf32=cuda_tf32,
            intra_op_threads=intra_op_threads,
            graph_optimization_level=graph_optimization_level,
        )
        session, running = create_session(manifest.graph_path, options)
        _check_graph_io(manifest, session)
        tokenizer = load_tokenizer(manifest.tokenizer_path, manifest.vocab_size)
        model = target(manifest, session, running, tokenizer, options, **task_options)
        warn_if_unvalidated(manifest.folder, manifest.raw)  # once every check has passed
        return model

    @property
    def pad_token_id(self) -> int:
        """The manifest's pad token, or the first EOS id when there is none (as transformers does)."""
        if self.manifest.pad_token_id is not None:
            return self.manifest.pad_token_id
        eos = self.manifest.eos_token_ids
        return eos[0] if eos else 0

    def __repr__(self) -> str:
        return f"{type(self).__name__}({str(self.manifest.folder)!r}, provider={self.provider!r})"


def _check_graph_io(manifest: Manifest, session: ort.InferenceSession) -> None:
    """The graph's input and output names must be the ones the manifest promises, and a causal
    LM's logits as wide as the manifest's vocab_size (token ids are checked against it)."""
    graph_inputs = {item.name for item in session.get_inputs()}
    graph_outputs = {item.name: item for item in session.get_outputs()}
    missing_inputs = [name for name in manifest.input_names if name not in graph_inputs]
    missing_outputs = [name for name in manifest.output_names if name not in graph_outputs]
    if missing_inputs or missing_outputs:
        raise ExportFolderError(
            f"{manifest.graph_path.name} does not match {manifest.folder / 'gptneo_onnx.json'}: "
            f"missing inputs {missing_inputs}, missing outputs {missing_outputs}; re-export the folder"
        )
    logits = graph_outputs.get("logits")
    width = logits.shape[-1] if manifest.task == "causal-lm" and logits is not None and logits.shape else None
    if isinstance(width, int) and width != manifest.vocab_size:
        raise ExportFolderError(
            f"{manifest.graph_path.name} has {width} logits per token but the manifest's vocab_size is "
            f"{manifest.vocab_size}; re-export the folder"
        )
