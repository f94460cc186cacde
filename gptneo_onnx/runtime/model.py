"""`Model.load`: read the manifest, verify the files, start a session, return the task's model."""

from __future__ import annotations

import inspect
from dataclasses import replace
from pathlib import Path
from typing import Any, ClassVar

import onnxruntime as ort
from tokenizers import Tokenizer

from gptneo_onnx.contract import MANIFEST_NAME
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
        *,
        options: ProviderOptions | None = None,
        verify_hashes: bool = True,
        **keywords: Any,
    ) -> Model:
        """Load an export folder with `options` (a ProviderOptions: provider auto, cpu, cuda or
        tensorrt, and its settings). Each ProviderOptions field can also be given as a keyword
        (`provider="cpu"`, `intra_op_threads=2`, `cuda_tf32=True`), over `options`; the other
        keywords go to the task class (e.g. CausalLM's `cache_mode`).

        Called on a task class (e.g. `CausalLM.load`), the folder must hold that task.
        `verify_hashes=False` skips the sha256 checks of the files (faster start for big exports).
        """
        provider_keywords, task_options = ProviderOptions.split(keywords)
        options = replace(options or ProviderOptions(), **provider_keywords)
        manifest = load_manifest(
            export_dir, task=cls.task, verify_hashes=verify_hashes, warn_unvalidated=False
        )
        target = _TASK_CLASSES.get(manifest.task)
        if target is None:
            raise ExportFolderError(f"no runtime class for task {manifest.task!r}")
        _check_task_options(target, task_options)
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


def _check_task_options(target: type[Model], task_options: dict[str, Any]) -> None:
    """Every keyword must be a ProviderOptions field or one of the task class's own options."""
    accepted = [
        name
        for name, parameter in inspect.signature(target.__init__).parameters.items()
        if parameter.kind is inspect.Parameter.KEYWORD_ONLY
    ]
    unknown = sorted(set(task_options) - set(accepted))
    if unknown:
        raise TypeError(
            f"{target.__name__}.load() got unknown option(s) {', '.join(unknown)}; provider options are "
            f"{', '.join(ProviderOptions.names())}"
            + (f", {target.__name__}'s own {', '.join(accepted)}" if accepted else "")
        )


def _check_graph_io(manifest: Manifest, session: ort.InferenceSession) -> None:
    """The graph's input and output names must be the ones the manifest promises, and a causal
    LM's logits as wide as the manifest's vocab_size (token ids are checked against it)."""
    graph_inputs = {item.name for item in session.get_inputs()}
    graph_outputs = {item.name: item for item in session.get_outputs()}
    missing_inputs = [name for name in manifest.input_names if name not in graph_inputs]
    missing_outputs = [name for name in manifest.output_names if name not in graph_outputs]
    if missing_inputs or missing_outputs:
        raise ExportFolderError(
            f"{manifest.graph_path.name} does not match {manifest.folder / MANIFEST_NAME}: "
            f"missing inputs {missing_inputs}, missing outputs {missing_outputs}; re-export the folder"
        )
    logits = graph_outputs.get(manifest.io["logits"] or "")
    width = logits.shape[-1] if manifest.task == "causal-lm" and logits is not None and logits.shape else None
    if isinstance(width, int) and width != manifest.vocab_size:
        raise ExportFolderError(
            f"{manifest.graph_path.name} has {width} logits per token but the manifest's vocab_size is "
            f"{manifest.vocab_size}; re-export the folder"
        )
