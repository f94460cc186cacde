"""The benchmark's model: one random-init GPT-Neo checkpoint, and every export made from it."""

from __future__ import annotations

import hashlib
import json
import shutil
from dataclasses import dataclass
from pathlib import Path

from gptneo_onnx.contract import MANIFEST_NAME

# transformers' GPTNeoConfig for EleutherAI/gpt-neo-125m; "tiny" is for --quick smoke runs.
SHAPES = {
    "125m": dict(
        hidden_size=768,
        num_layers=12,
        num_heads=12,
        window_size=256,
        vocab_size=50257,
        max_position_embeddings=2048,
        attention_types=[[["global", "local"], 6]],
    ),
    "tiny": dict(
        hidden_size=64,
        num_layers=2,
        num_heads=4,
        window_size=16,
        vocab_size=512,
        max_position_embeddings=256,
        attention_types=[[["global", "local"], 1]],
    ),
}
# Our variants: (export options). Quantized ones build on the optimized flavor.
OUR_VARIANTS = {
    "ours-portable-fp32": dict(),
    "ours-portable-fp32-windowed": dict(windowed_local_cache=True),
    "ours-optimized-fp32": dict(optimize=True),
    "ours-optimized-int8": dict(optimize=True, quantize="int8"),
    "ours-optimized-int4": dict(optimize=True, quantize="int4"),
}
INT4_SETTINGS = dict(block_size=32, accuracy_level=4, is_symmetric=True)


@dataclass
class Artifacts:
    checkpoint: Path  # Hugging Face folder (config.json + model.safetensors)
    exports: dict[str, Path]  # variant name -> folder


def build_checkpoint(folder: Path, shape: str, seed: int = 0) -> Path:
    """Save a random-init GPTNeoForCausalLM of `shape`; reused when already there."""
    if (folder / "config.json").is_file() and (folder / "model.safetensors").is_file():
        return folder
    import torch
    from transformers import GPTNeoConfig, GPTNeoForCausalLM

    torch.manual_seed(seed)
    config = GPTNeoConfig(**SHAPES[shape], bos_token_id=50256 % SHAPES[shape]["vocab_size"])
    config.eos_token_id = config.bos_token_id
    model = GPTNeoForCausalLM(config).eval()
    model.save_pretrained(folder, safe_serialization=True)
    return folder


def exporter_stamp() -> str:
    """A hash of the exporter's and the reference model's source: a cached export made by other
    code (an older checkout) is rebuilt rather than benchmarked."""
    package = Path(__file__).resolve().parent.parent
    digest = hashlib.sha256()
    for path in sorted([*(package / "export").glob("*.py"), *(package / "reference").glob("*.py")]):
        digest.update(path.name.encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()


def export_ours(checkpoint: Path, folder: Path, options: dict, block_size: int) -> Path:
    stamp = folder.with_name(folder.name + ".stamp")
    if (folder / MANIFEST_NAME).is_file() and stamp.is_file() and stamp.read_text() == exporter_stamp():
        return folder
    from gptneo_onnx.export import export
    from gptneo_onnx.reference import from_pretrained

    reference = from_pretrained(checkpoint)
    extra = {"block_size": block_size, "accuracy_level": INT4_SETTINGS["accuracy_level"]}
    # External data: onnxruntime maps the weights file instead of copying the graph's bytes.
    extra = {**(extra if "quantize" in options else {}), "external_data": True}
    export(reference, folder, progress=False, overwrite=True, **options, **extra)
    stamp.write_text(exporter_stamp())
    return folder


def export_optimum(checkpoint: Path, folder: Path) -> Path:
    """Optimum's own export (opset and graph as it chooses), loadable by ORTModelForCausalLM."""
    if (folder / "model.onnx").is_file():
        return folder
    from optimum.exporters.onnx import main_export

    main_export(str(checkpoint), folder, task="text-generation-with-past", do_validation=False)
    return folder


def quantize_optimum_int4(source: Path, folder: Path, block_size: int) -> Path:
    """Optimum's graph through onnxruntime's MatMulNBits quantizer, with our int4 settings."""
    if (folder / "model.onnx").is_file():
        return folder
    import onnx
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    folder.mkdir(parents=True, exist_ok=True)
    for item in source.iterdir():
        if item.is_file() and not item.name.startswith("model.onnx"):
            shutil.copy(item, folder / item.name)
    settings = {**INT4_SETTINGS, "block_size": block_size}
    quantizer = MatMulNBitsQuantizer(onnx.load(str(source / "model.onnx")), bits=4, **settings)
    quantizer.process()
    onnx.save_model(quantizer.model.model, str(folder / "model.onnx"))
    (folder / "quantization.json").write_text(json.dumps({"method": "MatMulNBits", **settings}) + "\n")
    return folder


def build_all(work: Path, shape: str, variants: list[str], progress) -> Artifacts:
    """The checkpoint and each requested variant's folder under `work` (cached between runs)."""
    block_size = 32 if shape == "125m" else 16
    checkpoint = build_checkpoint(work / f"checkpoint-{shape}", shape)
    exports: dict[str, Path] = {}
    for name in variants:
        progress(f"export {name}")
        if name in OUR_VARIANTS:
            exports[name] = export_ours(checkpoint, work / f"{name}-{shape}", OUR_VARIANTS[name], block_size)
        elif name == "optimum-fp32":
            exports[name] = export_optimum(checkpoint, work / f"optimum-fp32-{shape}")
        elif name == "optimum-int4":
            base = export_optimum(checkpoint, work / f"optimum-fp32-{shape}")
            exports[name] = quantize_optimum_int4(base, work / f"optimum-int4-{shape}", block_size)
        elif name == "transformers-fp32":
            exports[name] = checkpoint
        else:
            raise ValueError(f"unknown variant {name!r}")
    return Artifacts(checkpoint, exports)
