"""GPU check (at most ~5 minutes): CUDA parity, IO-bound KV cache, TensorRT, decode vs Optimum.

    python -m scripts.gpu_check --out gpu_check.json [--budget 290] [--skip-optimum]

Run it from the repository root: `python -m` puts the root on the import path, so it runs on a
machine where the package is not installed (`python scripts/gpu_check.py` needs it installed).

Needs onnxruntime-gpu (CUDAExecutionProvider), torch and transformers; optimum-onnx for the
Optimum comparison. Every section is timed and guarded: a failing or skipped section is recorded
with its reason and the script goes on; the JSON report is written whatever happens.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
import traceback
from pathlib import Path

import numpy as np

from gptneo_onnx.bench.models import SHAPES  # the benchmark's gpt-neo-125m shape

SMALL = dict(hidden_size=256, num_layers=4, num_heads=4, window_size=32, vocab_size=1024,
             max_position_embeddings=512, attention_types=[[["global", "local"], 2]])  # fmt: skip

DEVICE = {"name": "cuda", "provider": "CUDAExecutionProvider"}  # --dry-run-cpu swaps in the CPU


class Budget:
    def __init__(self, seconds: float):
        self.deadline = time.monotonic() + seconds

    def left(self) -> float:
        return self.deadline - time.monotonic()


def random_checkpoint(folder: Path, shape: dict, seed: int = 0) -> Path:
    import torch
    from transformers import GPTNeoConfig, GPTNeoForCausalLM

    torch.manual_seed(seed)
    model = GPTNeoForCausalLM(GPTNeoConfig(**shape, bos_token_id=0, eos_token_id=0)).eval()
    with torch.no_grad():  # non-trivial biases and norms, as the tests do
        for name, param in model.named_parameters():
            if name.endswith("bias") or ".ln_" in name:
                param.add_(torch.randn_like(param) * 0.1)
    model.save_pretrained(folder, safe_serialization=True)
    return folder


def cuda_session(path: Path, providers: list):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    # fp32 parity needs plain fp32 matmuls: CUDA's default TF32 moves logits by ~1e-3.
    strict = [(p, {"use_tf32": "0"}) if p == "CUDAExecutionProvider" else p for p in providers]
    return ort.InferenceSession(str(path), options, providers=strict)


def check_parity(reference, work: Path, report: dict) -> None:
    """fp32 and fp16, portable and optimized, on the CUDA provider against the torch reference."""
    from gptneo_onnx.export import export
    from gptneo_onnx.export.validate import Tolerance, parity_verdict

    for flavor in ("portable", "optimized"):
        for precision in ("float32", "float16"):
            folder = work / f"{flavor}-{precision}"
            result = export(reference, folder, progress=False, validate=False, precision=precision,
                            optimize=flavor == "optimized")  # fmt: skip
            session = cuda_session(folder / result.manifest["graph"]["file"], [DEVICE["provider"]])
            verdict = parity_verdict(reference, session, result.manifest, Tolerance.for_precision(precision))
            verdict.pop("checks")
            report[f"parity_cuda_{flavor}_{precision}"] = verdict


class DeviceDecoder:
    """Greedy decoding with the KV cache in device memory: the runtime's IO-bound cache objects,
    shared-buffer mode when the export lists it."""

    def __init__(self, folder: Path, providers: list):
        from gptneo_onnx.runtime import BoundConcatCache, CacheSpec, SharedBufferCache, load_manifest

        self.manifest = load_manifest(folder, task="causal-lm", verify_hashes=False)
        self.session = cuda_session(self.manifest.graph_path, providers)
        self.spec = CacheSpec.from_manifest(self.manifest, device=(DEVICE["name"], 0))
        shared = "shared-buffer" in self.manifest.cache_modes
        self.cache_class = SharedBufferCache if shared else BoundConcatCache

    def generate(self, ids: np.ndarray, new_tokens: int) -> tuple[np.ndarray, float]:
        """Greedy tokens (1, new) and decode tok/s after the first token."""
        from gptneo_onnx.contract import position_ids_from_mask

        io, batch = self.manifest.io, ids.shape[0]
        cache = self.cache_class.empty(self.spec, batch, ids.shape[1] + new_tokens)
        mask, chosen, stamps = np.ones_like(ids), [], []
        current = ids
        for _ in range(new_tokens):
            inputs = {
                io["input_ids"]: current,
                io["attention_mask"]: mask,
                io["position_ids"]: position_ids_from_mask(mask, current.shape[1]),
            }
            current = cache.run(self.session, inputs, mask)[:, -1].argmax(-1)[:, None].astype(np.int64)
            chosen.append(current)
            stamps.append(time.perf_counter())
            mask = np.concatenate([mask, np.ones((batch, 1), np.int64)], axis=1)
        rate = (len(stamps) - 1) / (stamps[-1] - stamps[0]) if len(stamps) > 1 else float("nan")
        return np.concatenate(chosen, axis=1), rate


def check_io_bound_cache(work: Path, report: dict) -> None:
    """Device-resident cache (concat and shared-buffer) gives the CPU run's greedy tokens."""
    from gptneo_onnx.bench.ort_loop import ExportDecoder

    ids = np.random.default_rng(0).integers(1, 1000, size=(1, 24), dtype=np.int64)
    expected = ExportDecoder(work / "optimized-float32").generate(ids, np.ones_like(ids), 16)
    for flavor in ("portable", "optimized"):
        tokens, rate = DeviceDecoder(work / f"{flavor}-float32", [DEVICE["provider"]]).generate(ids, 16)
        report[f"io_bound_cache_{flavor}"] = {
            "same_tokens_as_cpu": bool((tokens == expected).all()),
            "tok_s": rate,
        }
    # The project's runtime on CUDA: IO binding keeps the cache on the device.
    from gptneo_onnx.runtime import Model

    for flavor in ("portable", "optimized"):
        model = Model.load(work / f"{flavor}-float32", provider=DEVICE["name"])
        result = model.generate(
            ids.tolist(), max_new_tokens=16, min_new_tokens=16, do_sample=False, repetition_penalty=1.0
        )
        report[f"runtime_cuda_{flavor}"] = {
            "provider": model.provider,
            "io_binding": bool(getattr(model, "io_binding", None)),
            "same_tokens_as_cpu": result.sequences[0] == expected[0].tolist(),
        }


def check_ragged_rows(work: Path, report: dict) -> None:
    """The serving engine's ragged batch (rows of their own lengths joining and leaving a
    RaggedCache) on the device gives each request the greedy tokens it gets alone."""
    from gptneo_onnx.runtime import Model
    from gptneo_onnx.serve import Engine, EngineLimits, EngineRequest, TokenEvent

    model = Model.load(work / "optimized-float32", provider=DEVICE["name"])
    if not model.ragged_rows:
        report["ragged_rows"] = {"skipped": f"cache mode {model.cache_mode} offers no ragged rows"}
        return
    rng = np.random.default_rng(1)
    requests = [
        EngineRequest(
            rng.integers(1, 1000, prompt).tolist(),
            model.generation_config(max_new_tokens=new, min_new_tokens=new, do_sample=False),
        )
        for prompt, new in ((5, 12), (40, 6), (17, 20), (3, 9), (28, 14))
    ]
    engine = Engine(model, EngineLimits(max_concurrent=3), ragged_rows=True)
    handles = [engine.submit(request) for request in requests]
    engine.start()
    got = [[event.token_id for event in handle if isinstance(event, TokenEvent)] for handle in handles]
    engine.stop()
    alone = [model.generate(request.prompt_ids, request.config).sequences[0] for request in requests]
    report["ragged_rows"] = {"provider": model.provider, "same_tokens_as_alone": got == alone}


def check_tensorrt(work: Path, report: dict, available: list[str]) -> None:
    if "TensorrtExecutionProvider" not in available:
        report["tensorrt"] = {"skipped": "TensorrtExecutionProvider is not installed"}
        return
    trt = ("TensorrtExecutionProvider", {"trt_fp16_enable": False, "trt_max_workspace_size": 2 << 30})
    ids = np.random.default_rng(1).integers(1, 1000, size=(1, 24), dtype=np.int64)
    from gptneo_onnx.bench.ort_loop import ExportDecoder

    expected = ExportDecoder(work / "portable-float32").generate(ids, np.ones_like(ids), 8)
    start = time.perf_counter()
    decoder = DeviceDecoder(work / "portable-float32", [trt, DEVICE["provider"]])
    running = decoder.session.get_providers()[0]
    if running != "TensorrtExecutionProvider":  # onnxruntime fell back: TensorRT's libraries are missing
        report["tensorrt"] = {"skipped": f"TensorRT did not start (libnvinfer missing?); {running} ran"}
        return
    tokens, rate = decoder.generate(ids, 8)
    report["tensorrt"] = {"same_tokens_as_cpu": bool((tokens == expected).all()), "tok_s": rate,
                          "seconds_with_engine_build": time.perf_counter() - start}  # fmt: skip


def runtime_decode_rate(model, ids: np.ndarray, new_tokens: int = 128) -> float:
    """Decode tok/s of the runtime's generate: (time for 1 + new tokens - time for 1) / new."""
    options = dict(do_sample=False, repetition_penalty=1.0)
    model.generate(ids.tolist(), max_new_tokens=4, min_new_tokens=4, **options)  # warm-up
    timings = []
    for count in (1, new_tokens + 1):
        start = time.perf_counter()
        model.generate(ids.tolist(), max_new_tokens=count, min_new_tokens=count, **options)
        timings.append(time.perf_counter() - start)
    return new_tokens / (timings[1] - timings[0])


def check_decode_vs_optimum(work: Path, report: dict, skip_optimum: bool) -> None:
    """125m shape, batch 1, 32-token prompt, 128 new: decode tok/s on CUDA, ours vs Optimum."""
    from gptneo_onnx.export import export
    from gptneo_onnx.reference import from_pretrained
    from gptneo_onnx.runtime import Model

    checkpoint = random_checkpoint(work / "ckpt-125m", SHAPES["125m"])
    reference = from_pretrained(checkpoint)
    ids = np.random.default_rng(2).integers(1, 50000, size=(1, 32), dtype=np.int64)
    long_ids = np.random.default_rng(3).integers(1, 50000, size=(1, 1500), dtype=np.int64)
    figures = {}
    variants = {
        "ours-portable-fp32": dict(),
        "ours-portable-fp16": dict(precision="float16"),
        "ours-optimized-fp32": dict(optimize=True),
        "ours-optimized-fp16": dict(optimize=True, precision="float16"),
    }
    for name, options in variants.items():
        folder = work / name
        export(reference, folder, progress=False, validate=False, **options)
        decoder = DeviceDecoder(folder, [DEVICE["provider"]])
        decoder.generate(ids, 4)  # warm-up
        figures[name] = decoder.generate(ids, 128)[1]
        model = Model.load(folder, provider=DEVICE["name"])  # the project's runtime, same graph
        figures[f"runtime-{name}"] = runtime_decode_rate(model, ids)
        figures[f"runtime-{name}@1500"] = runtime_decode_rate(model, long_ids, 64)
    if not skip_optimum:
        import torch
        from optimum.exporters.onnx import main_export
        from optimum.onnxruntime import ORTModelForCausalLM

        main_export(str(checkpoint), work / "optimum", task="text-generation-with-past", do_validation=False)
        on_cuda = DEVICE["name"] == "cuda"  # same fp32 math as ours: no TF32
        model = ORTModelForCausalLM.from_pretrained(
            work / "optimum",
            provider=DEVICE["provider"],
            use_io_binding=on_cuda,
            provider_options={"use_tf32": "0"} if on_cuda else None,
        )
        model.generation_config.eos_token_id = None
        prompt = torch.from_numpy(ids).to(DEVICE["name"])
        model.generate(prompt, max_new_tokens=4, min_new_tokens=4, do_sample=False, pad_token_id=0)
        for label, prompt_ids, count in (("optimum-fp32", ids, 128), ("optimum-fp32@1500", long_ids, 64)):
            prompt = torch.from_numpy(prompt_ids).to(DEVICE["name"])
            timings = []
            for new in (1, count + 1):
                start = time.perf_counter()
                model.generate(
                    prompt, max_new_tokens=new, min_new_tokens=new, do_sample=False, pad_token_id=0
                )
                timings.append(time.perf_counter() - start)
            figures[label] = count / (timings[1] - timings[0])
    report["decode_tok_s_cuda_125m"] = figures
    if "optimum-fp32" in figures:
        report["decode_ratio_vs_optimum"] = {
            k: v / figures["optimum-fp32@1500" if k.endswith("@1500") else "optimum-fp32"]
            for k, v in figures.items()
        }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("gpu_check.json"))
    parser.add_argument("--budget", type=float, default=290.0, help="seconds; later sections are skipped")
    parser.add_argument("--skip-optimum", action="store_true")
    parser.add_argument("--dry-run-cpu", action="store_true", help="exercise the script on the CPU provider")
    args = parser.parse_args(argv)
    if args.dry_run_cpu:
        DEVICE.update(name="cpu", provider="CPUExecutionProvider")
    budget, report = Budget(args.budget), {"started": time.strftime("%Y-%m-%d %H:%M:%S")}
    try:
        import onnxruntime as ort

        if hasattr(ort, "preload_dlls"):  # CUDA/cuDNN from the nvidia-* pip packages, if present
            ort.preload_dlls()
        available = ort.get_available_providers()
        report.update(onnxruntime=ort.__version__, providers=available)
    except ImportError as error:
        available, report["error"] = [], f"onnxruntime is not installed: {error}"
    if DEVICE["provider"] not in available:
        report.setdefault("error", "CUDAExecutionProvider is missing: pip install onnxruntime-gpu")
        args.out.write_text(json.dumps(report, indent=2) + "\n")
        print(json.dumps(report, indent=2))
        return 1
    try:
        import torch

        report["gpu"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none seen by torch"
    except Exception as error:  # noqa: BLE001 - informational only
        report["gpu"] = f"unknown: {error}"
    work = Path(tempfile.mkdtemp(prefix="gpu_check_"))
    from gptneo_onnx.reference import from_pretrained

    sections = [
        (
            "parity",
            60,
            lambda: check_parity(from_pretrained(random_checkpoint(work / "small", SMALL)), work, report),
        ),
        ("io_bound_cache", 30, lambda: check_io_bound_cache(work, report)),
        ("ragged_rows", 20, lambda: check_ragged_rows(work, report)),
        ("tensorrt", 60, lambda: check_tensorrt(work, report, available)),
        ("decode_vs_optimum", 120, lambda: check_decode_vs_optimum(work, report, args.skip_optimum)),
    ]
    for name, needs, run in sections:
        if budget.left() < needs:
            report[f"{name}_status"] = f"skipped: {budget.left():.0f} s left, needs ~{needs} s"
            continue
        start = time.perf_counter()
        try:
            run()
            report[f"{name}_status"] = f"ok in {time.perf_counter() - start:.1f} s"
        except Exception as error:  # noqa: BLE001 - record and go on to the next section
            report[f"{name}_status"] = f"failed: {type(error).__name__}: {error}"[:800]
            report[f"{name}_traceback"] = traceback.format_exc()[-2000:]
        args.out.write_text(json.dumps(report, indent=2, default=str) + "\n")
    print(json.dumps(report, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
