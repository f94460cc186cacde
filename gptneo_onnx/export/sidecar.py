"""Write the `gptneo_onnx.json` manifest that describes an export (schema: docs/sidecar.md)."""

from __future__ import annotations

import json
from dataclasses import asdict
from importlib import metadata
from pathlib import Path

import onnx

from gptneo_onnx.config import GPTNeoConfig
from gptneo_onnx.contract import (
    CHAT_TEMPLATE_NAME,
    DEFAULT_DOMAIN,
    FORMAT_MINOR_VERSION,
    FORMAT_VERSION,
    LOCAL_ATTENTION_MASK,
    MANIFEST_NAME,
    TOKENIZER_CONFIG_NAME,
    WINDOWED_LOCAL_CACHE_VERSION,
    cache_names,
    sha256_of,
)
from gptneo_onnx.errors import CheckpointError
from gptneo_onnx.export.graphs import NUM_LOGITS_TO_KEEP, IOSpec
from gptneo_onnx.export.optimized import optimization_summary
from gptneo_onnx.export.output_folder import write_json
from gptneo_onnx.export.plan import ExportPlan

PARITY_REPORT = "parity_report.json"
QUALITY_REPORT = "quality_report.json"
QUALITY_FIELDS = ("perplexity", "reference_perplexity", "top1_agreement")

GENERATION_DEFAULTS = {
    "max_new_tokens": 64,
    "do_sample": False,
    "temperature": 1.0,
    "top_k": 50,
    "top_p": 1.0,
    "repetition_penalty": 1.0,
    "num_beams": 1,
    "length_penalty": 1.0,
    "early_stopping": False,
}


def tool_versions() -> dict[str, str | None]:
    versions = {}
    for name, dist in (
        ("gptneo_onnx", "gptneo-onnx"),
        ("torch", "torch"),
        ("onnx", "onnx"),
        ("onnxruntime", "onnxruntime"),
        ("transformers", "transformers"),
    ):
        try:
            versions[name] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def generation_defaults(generation_config: dict | None) -> dict:
    defaults = dict(GENERATION_DEFAULTS)
    for key in defaults:
        if generation_config and generation_config.get(key) is not None:
            defaults[key] = generation_config[key]
    return defaults


def eos_ids(config: GPTNeoConfig) -> list[int]:
    if config.eos_token_id is None:
        return []
    return list(config.eos_token_id) if isinstance(config.eos_token_id, list) else [config.eos_token_id]


def file_entry(folder: Path, name: str) -> dict:
    path = folder / name
    return {"file": name, "sha256": sha256_of(path), "bytes": path.stat().st_size}


def operator_domains(graph_path: Path) -> list[str]:
    """Every operator domain the graph imports or uses, subgraphs and functions included, sorted."""
    model = onnx.load(str(graph_path), load_external_data=False)
    domains = {entry.domain for entry in model.opset_import}
    pending = [model.graph]
    for function in model.functions:
        domains.update(entry.domain for entry in function.opset_import)
        domains.update(node.domain for node in function.node)
    while pending:
        graph = pending.pop()
        for node in graph.node:
            domains.add(node.domain)
            for attribute in node.attribute:
                pending.extend([attribute.g] if attribute.HasField("g") else [])
                pending.extend(attribute.graphs)
    return sorted({domain or DEFAULT_DOMAIN for domain in domains})


def io_roles(plan: ExportPlan) -> dict:
    """The manifest's `io` object: which graph input/output plays which role, and the input rules.

    A foreign runtime reads names and semantics from here instead of assuming them.
    """
    causal = plan.cached
    return {
        "input_ids": "input_ids",
        "attention_mask": "attention_mask",
        "position_ids": "position_ids" if causal else None,
        "local_attention_mask": LOCAL_ATTENTION_MASK if plan.windowed_local_cache else None,
        "logits": "logits" if causal else None,
        "num_logits_to_keep": NUM_LOGITS_TO_KEEP if causal else None,
        "padding_side": "left",
        "attention_mask_columns": "past_and_new" if causal else "sequence",
        "position_ids_rule": "cumsum_minus_one" if causal else "in_graph",
    }


def optional_inputs(plan: ExportPlan) -> list[dict]:
    """Graph inputs with a default value (initializers of the same name): a runtime may leave them out."""
    if not plan.cached:
        return []
    return [{"name": NUM_LOGITS_TO_KEEP, "dtype": "int64", "shape": [], "default": 0}]


def local_window_entry(window: int) -> dict:
    """`cache.local_window`: local layers' caches may keep only the newest rows (docs/sidecar.md)."""
    return {
        "input": LOCAL_ATTENTION_MASK,
        "window": window,
        # A local layer's past may be any suffix of the sequence with at least
        # min(past_sequence_length, min_rows) rows; the input masks exactly those rows + the new ones.
        "min_rows": window - 1,
    }


def tokenizer_entry(folder: Path, name: str) -> dict:
    return {**file_entry(folder, name), "add_special_tokens": True, "skip_special_tokens": True}


def tokenizer_config(config: GPTNeoConfig, tokenizer_path: Path, checkpoint: Path | None = None) -> dict:
    """tokenizer_config.json for transformers(.js): GPT-2's tokenizer class, the checkpoint's special
    tokens (pad falls back to eos, so a padded batch has one), left padding, as the graphs expect,
    and the chat template of the tokenizer's folder (`checkpoint`), if it has one."""
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(tokenizer_path))
    eos = eos_ids(config)
    ids = {
        "bos_token": config.bos_token_id,
        "eos_token": eos[0] if eos else None,
        "pad_token": config.pad_token_id if config.pad_token_id is not None else (eos[0] if eos else None),
    }
    tokens = {name: tokenizer.id_to_token(i) for name, i in ids.items() if i is not None}
    return {
        "tokenizer_class": "GPT2Tokenizer",
        **tokens,
        "padding_side": "left",
        "model_max_length": config.max_position_embeddings,
        "clean_up_tokenization_spaces": False,
        **({"chat_template": template} if (template := checkpoint_chat_template(checkpoint)) else {}),
    }


def checkpoint_chat_template(folder: Path | None) -> str | list | None:
    """A checkpoint's chat template: chat_template.jinja, else tokenizer_config.json's
    `chat_template` (a string, or a list of named templates), as transformers saves them."""
    if folder is None:
        return None
    if (folder / CHAT_TEMPLATE_NAME).is_file():
        return (folder / CHAT_TEMPLATE_NAME).read_text(encoding="utf-8")
    settings = folder / TOKENIZER_CONFIG_NAME
    if not settings.is_file():
        return None
    try:
        template = json.loads(settings.read_text(encoding="utf-8")).get("chat_template")
    except (OSError, ValueError, AttributeError) as error:
        raise CheckpointError(f"{settings} is not a readable JSON object: {error}") from error
    return template if isinstance(template, (str, list)) and template else None


def cache_entry(config: GPTNeoConfig, plan: ExportPlan) -> dict | None:
    """The manifest's `cache` object (causal-lm): the layout, each layer's names and window, the
    local window when the plan gives local layers their own, and the cache modes the graph serves."""
    if not plan.cached:
        return None
    cache = {
        "mode": "concat",
        "layout": ["batch_size", "num_heads", "past_sequence_length", "head_dim"],
        "dtype": plan.precision,
        "layers": [
            {
                "layer": layer.layer,
                "attention": config.attention_layers[layer.layer],
                "window": layer.window,
                **cache_names(layer.layer),
            }
            for layer in plan.layers
        ],
    }
    if plan.windowed_local_cache:
        cache["local_window"] = local_window_entry(plan.local_window)
    if plan.flavor == "optimized":
        cache["modes"] = optimization_summary(config, plan)["cache_modes"]
        # GQA reads each row up to its mask's last real column (export/optimized.py)
        cache["ragged_rows"] = "shared-buffer" in cache["modes"]
    return cache


def build_manifest(
    folder: Path,
    config: GPTNeoConfig,
    plan: ExportPlan,
    inputs: list[IOSpec],
    outputs: list[IOSpec],
    *,
    quantization: dict | None = None,
    tokenizer_file: str | None = None,
    generation_config: dict | None = None,
) -> dict:
    """The manifest of the export in `folder`, as the plan made it: every field but the outcome of
    validation (`pending`, or `skipped` when the plan skips it) and of the quality report, which
    `record_validation` and `record_quality` write in."""
    classification = plan.task in ("sequence-classification", "token-classification")
    manifest = {
        "format": "gptneo-onnx",
        "format_version": WINDOWED_LOCAL_CACHE_VERSION if plan.windowed_local_cache else FORMAT_VERSION,
        "format_minor_version": FORMAT_MINOR_VERSION,
        "task": plan.task,
        "flavor": plan.flavor,
        "precision": plan.precision,
        "quantization": quantization,
        "opset": plan.opset,
        "graph": {
            **file_entry(folder, plan.graph_file),
            "external_data": [file_entry(folder, plan.external_data_file)] if plan.external_data else [],
            "op_domains": operator_domains(folder / plan.graph_file),
        },
        "inputs": [asdict(spec) for spec in inputs],
        "outputs": [asdict(spec) for spec in outputs],
        "optional_inputs": optional_inputs(plan),
        "io": io_roles(plan),
        "cache": cache_entry(config, plan),
        "model": {
            "vocab_size": config.vocab_size,
            "hidden_size": config.hidden_size,
            "num_layers": config.num_layers,
            "num_heads": config.num_heads,
            "head_dim": config.head_dim,
            "max_position_embeddings": config.max_position_embeddings,
            "window_size": config.window_size,
            "attention_layers": config.attention_layers,
        },
        "special_tokens": {
            "bos_token_id": config.bos_token_id,
            "eos_token_id": eos_ids(config),
            "pad_token_id": config.pad_token_id,
        },
        "labels": {"id2label": {str(k): v for k, v in config.id2label.items()}} if classification else None,
        "generation": generation_defaults(generation_config),
        "tokenizer": tokenizer_entry(folder, tokenizer_file) if tokenizer_file else None,
        "validation": validation_entry(None, "pending" if plan.validate else "skipped"),
        "tools": tool_versions(),
    }
    if plan.flavor == "optimized":
        manifest["optimization"] = optimization_summary(config, plan)
    return manifest


def validation_entry(report: dict | None, status: str, quantized: bool = False) -> dict:
    """The sidecar's `validation` object (docs/sidecar.md). `status`: pending (written before the
    validation runs, so an export killed during it never reads as validated), passed, failed or
    skipped. `checked` says what a pass means: `parity` (outputs within the tolerance of PyTorch's)
    or, for quantized graphs, `runs` (it runs, with the reference's shapes and finite outputs; its
    closeness is the quality report's business). `passed` stays for readers from before `status`
    (they refuse `passed: false`, so a pending or failed export stays refused there too)."""
    entry: dict = (
        {"status": status} if status == "skipped" else {"status": status, "passed": status == "passed"}
    )
    if report is not None:
        entry.update(
            checked="runs" if quantized else "parity",
            report=PARITY_REPORT,
            max_abs_diff=report["max_abs_diff"],
            top1_agreement=report["top1_agreement"],
        )
    return entry


def write_manifest(folder: Path, manifest: dict) -> Path:
    """Write the sidecar atomically (a reader never sees half of it)."""
    return write_json(folder, MANIFEST_NAME, manifest)


def record_validation(folder: Path, manifest: dict, report: dict) -> None:
    """Write the outcome of a validation into the sidecar: what parity_report.json says, passed or
    failed (a failed export stops loading)."""
    status = "passed" if report["passed"] else "failed"
    manifest["validation"] = validation_entry(
        report, status, quantized=manifest.get("quantization") is not None
    )
    write_manifest(folder, manifest)


def record_quality(folder: Path, manifest: dict, quality: dict) -> None:
    """Write quality_report.json and its headline figures into the sidecar's `quality` object."""
    write_json(folder, QUALITY_REPORT, quality)
    manifest["quality"] = {"report": QUALITY_REPORT, **{key: quality[key] for key in QUALITY_FIELDS}}
    write_manifest(folder, manifest)
