"""Parity validation: run an export in ONNX Runtime against the reference model.

The inputs exercise what matters for GPT-Neo: a batch of two with left padding, a total
length longer than the local window, a prefill with an empty past, and decode steps with a past.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from gptneo_onnx.config import GPTNeoConfig
from gptneo_onnx.export.output_folder import write_json


class ParityError(AssertionError):
    """The export's outputs differ from the reference model beyond tolerance."""


@dataclass(frozen=True)
class Tolerance:
    """fp32 uses a tight bound, |diff| <= atol + rtol * |reference| as numpy's allclose (and
    Optimum) do; fp16 and quantized graphs a loose one plus top-1 agreement."""

    max_abs_diff: float
    min_top1_agreement: float
    relative_to_logit_range: bool = False
    rtol: float = 0.0

    @classmethod
    def for_precision(cls, precision: str, quantization: str | None = None) -> Tolerance:
        if quantization:
            return cls(max_abs_diff=float("inf"), min_top1_agreement=0.0)  # quality is judged by perplexity
        if precision == "float16":
            return cls(max_abs_diff=0.05, min_top1_agreement=0.98, relative_to_logit_range=True)
        return cls(max_abs_diff=1e-4, min_top1_agreement=1.0, rtol=1e-4)

    def against_float32_reference(self) -> Tolerance:
        """When the reference itself runs in float32 (big models), both sides carry float32
        rounding: widen the tight fp32 bound tenfold and let near-tied top-1 tokens flip."""
        if self.rtol == 0.0:
            return self
        return Tolerance(self.max_abs_diff * 10, min(self.min_top1_agreement, 0.99), rtol=self.rtol * 10)


def validation_batch(config: GPTNeoConfig, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Two rows of random ids, the second left-padded, longer than the largest local window."""
    windows = [config.layer_window(i) or 0 for i in range(config.num_layers)]
    length = min(config.max_position_embeddings, max(max(windows) + 16, 24))
    rng = np.random.default_rng(seed)
    low = 0 if config.pad_token_id is None else 1
    ids = rng.integers(low, config.vocab_size, size=(2, length), dtype=np.int64)
    if config.pad_token_id is not None:
        ids[ids == config.pad_token_id] = (config.pad_token_id + 1) % config.vocab_size
    mask = np.ones_like(ids)
    padding = min(5, length // 4)
    mask[1, :padding] = 0
    if config.pad_token_id is not None:
        ids[1, :padding] = config.pad_token_id
    return ids, mask


def positions(mask: np.ndarray, query_length: int) -> np.ndarray:
    return np.maximum(np.cumsum(mask, axis=1) - 1, 0)[:, -query_length:]


class _Comparison:
    """Accumulates the worst difference and the top-1 agreement over all compared outputs."""

    def __init__(self, rtol: float = 0.0):
        self.rtol = rtol
        self.max_abs_diff = 0.0
        self.max_excess = 0.0  # the largest |diff| - rtol * |reference|
        self.logit_range = 1.0
        self.top1_same = 0
        self.top1_total = 0
        self.checks: list[dict] = []

    def add(self, name: str, expected: np.ndarray, actual: np.ndarray, keep: np.ndarray | None, top1: bool):
        if expected.shape != actual.shape:
            raise ParityError(f"{name}: shape {actual.shape}, the reference gives {expected.shape}")
        if not np.isfinite(actual).all():
            raise ParityError(f"{name}: the export produced NaN or Inf")
        expected, actual = expected.astype(np.float32), actual.astype(np.float32)
        if keep is not None:
            expected, actual = expected[keep], actual[keep]
        diff = float(np.abs(expected - actual).max()) if expected.size else 0.0
        self.max_abs_diff = max(self.max_abs_diff, diff)
        if expected.size:
            excess = float((np.abs(expected - actual) - self.rtol * np.abs(expected)).max())
            self.max_excess = max(self.max_excess, excess)
        entry = {"output": name, "max_abs_diff": diff}
        if top1:
            same = int((expected.argmax(-1) == actual.argmax(-1)).sum())
            self.top1_same += same
            self.top1_total += expected.shape[0] if expected.ndim == 2 else int(np.prod(expected.shape[:-1]))
            self.logit_range = max(self.logit_range, float(np.abs(expected).max()))
            entry["top1_agreement"] = same / max(1, int(np.prod(expected.shape[:-1])))
        self.checks.append(entry)

    def verdict(self, tolerance: Tolerance) -> dict:
        bound = tolerance.max_abs_diff * (self.logit_range if tolerance.relative_to_logit_range else 1.0)
        agreement = self.top1_same / self.top1_total if self.top1_total else 1.0
        return {
            "passed": self.max_excess <= bound and agreement >= tolerance.min_top1_agreement,
            "max_abs_diff": self.max_abs_diff,
            "max_abs_diff_allowed": bound,
            "rtol": self.rtol,
            "top1_agreement": agreement,
            "top1_agreement_required": tolerance.min_top1_agreement,
            "checks": self.checks,
        }


@torch.no_grad()
def _compare_causal_lm(model, session, manifest: dict, ids, mask, comparison: _Comparison) -> None:
    """Prefill, then steps with a past. With a windowed local cache (`cache.local_window`), local
    layers carry only the fewest past rows the sidecar allows, so that contract is checked too."""
    config: GPTNeoConfig = model.config
    cache = manifest["cache"]
    dtype = np.dtype(cache["dtype"])
    batch, length = ids.shape
    empty = np.zeros((batch, config.num_heads, 0, config.head_dim), dtype=dtype)
    ort_past = {name: empty for layer in cache["layers"] for name in (layer["past_key"], layer["past_value"])}
    local_window = cache.get("local_window")
    windowed = {layer["layer"] for layer in cache["layers"] if local_window and layer.get("window")}
    local_rows = 0  # past rows the local layers hold
    ref_past = None
    start = 0
    for step, size in enumerate((length - 4, 1, 3)):  # prefill (empty past), then decode with a past
        chunk, step_mask = ids[:, start : start + size], mask[:, : start + size]
        pos = positions(step_mask, size)
        feed = {"input_ids": chunk, "attention_mask": step_mask, "position_ids": pos, **ort_past}
        if local_window:
            feed[local_window["input"]] = step_mask[:, step_mask.shape[1] - (local_rows + size) :]
        row_limit = (manifest.get("optimization") or {}).get("multi_token_step_max_batch")
        by_rows = row_limit is not None and step > 0 and size > 1 and batch > row_limit
        outputs = _run_by_rows(session, feed) if by_rows else session.run(None, feed)
        results = dict(zip([o["name"] for o in manifest["outputs"]], outputs, strict=True))
        ref_logits, ref_past = model(
            torch.from_numpy(chunk), torch.from_numpy(step_mask), torch.from_numpy(pos), ref_past
        )
        keep = step_mask[:, -size:].astype(bool)
        comparison.add(f"step{step}.logits", ref_logits.numpy(), results["logits"], keep, top1=True)
        for layer, (ref_key, ref_value) in zip(cache["layers"], ref_past):
            rows = local_rows + size if layer["layer"] in windowed else step_mask.shape[1]
            visible = step_mask[:, -rows:].astype(bool)  # (B, rows): compare cache rows of real tokens only
            for ref, name in ((ref_key, layer["present_key"]), (ref_value, layer["present_value"])):
                expected = ref.float().numpy()[:, :, -rows:].transpose(0, 2, 1, 3)  # (B, rows, H, D)
                comparison.add(
                    f"step{step}.{name}", expected, results[name].transpose(0, 2, 1, 3), visible, False
                )
        if local_window:
            local_rows = min(local_rows + size, local_window["min_rows"])
        ort_past = {
            layer[past]: results[layer[present]][:, :, -local_rows:]
            if layer["layer"] in windowed
            else results[layer[present]]
            for layer in cache["layers"]
            for past, present in (("past_key", "present_key"), ("past_value", "present_value"))
        }
        start += size


def _run_by_rows(session, feed: dict[str, np.ndarray]) -> list[np.ndarray]:
    """One session run per batch row, outputs stacked: for graphs whose multi-token steps with a
    past take one row at a time (the sidecar's `multi_token_step_max_batch`)."""
    batch = feed["input_ids"].shape[0]
    rows = [session.run(None, {name: value[i : i + 1] for name, value in feed.items()}) for i in range(batch)]
    return [np.concatenate(parts, axis=0) for parts in zip(*rows, strict=True)]


@torch.no_grad()
def _compare_single_pass(model, session, manifest: dict, ids, mask, comparison: _Comparison) -> None:
    results = session.run(None, {"input_ids": ids, "attention_mask": mask})
    expected = model(torch.from_numpy(ids), torch.from_numpy(mask))
    expected = expected if isinstance(expected, tuple) else (expected,)
    keep = mask.astype(bool)
    top1 = manifest["task"] != "base"
    for spec, ref, actual in zip(manifest["outputs"], expected, results, strict=True):
        ref = ref.float().numpy()
        per_token = ref.ndim >= 2 and ref.shape[:2] == ids.shape
        if manifest["task"] == "question-answering":
            comparison.add(spec["name"], ref, actual, None, top1)  # (B, S): argmax over positions
        else:
            comparison.add(spec["name"], ref, actual, keep if per_token else None, top1)


EXACT_REFERENCE_MAX_PARAMETERS = 250_000_000  # a float64 copy of more would crowd memory


def _exact_reference(model: torch.nn.Module) -> torch.nn.Module | None:
    """The reference in float64 when it fits comfortably: the export is then judged against the
    exact math, not against PyTorch's own float32 rounding (which alone reaches ~1e-4 on trained
    weights). None for bigger models, which are compared in their own precision."""
    if sum(p.numel() for p in model.parameters()) > EXACT_REFERENCE_MAX_PARAMETERS:
        return None
    return copy.deepcopy(model).double()


def validate_export(model: torch.nn.Module, export_dir: Path, manifest: dict, tolerance: Tolerance) -> dict:
    """Run the saved export in ONNX Runtime (CPU) against `model`; write and return the report.

    Raises ParityError when an output is off beyond `tolerance`.
    """
    try:
        import onnxruntime as ort
    except ImportError as error:
        raise ImportError(
            "validation runs the export in onnxruntime: install gptneo-onnx[cpu] or pass validate=False"
        ) from error
    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(
        str(export_dir / manifest["graph"]["file"]), options, providers=["CPUExecutionProvider"]
    )
    ids, mask = validation_batch(model.config)
    exact = _exact_reference(model)
    if exact is None:
        tolerance = tolerance.against_float32_reference()
    model = exact or model
    comparison = _Comparison(tolerance.rtol)
    compare = _compare_causal_lm if manifest["task"] == "causal-lm" else _compare_single_pass
    compare(model, session, manifest, ids, mask, comparison)
    report = {
        "task": manifest["task"],
        "precision": manifest["precision"],
        "reference_precision": "float64" if exact is not None else "float32",
        "flavor": manifest["flavor"],
        "inputs": {
            "batch": int(ids.shape[0]),
            "total_length": int(ids.shape[1]),
            "left_padding": [0, int((mask[1] == 0).sum())],
        },
        **comparison.verdict(tolerance),
    }
    write_json(export_dir, "parity_report.json", report)
    if not report["passed"]:
        raise ParityError(
            f"export does not match the reference: max |diff| {report['max_abs_diff']:.3g} "
            f"(allowed {report['max_abs_diff_allowed']:.3g} + {tolerance.rtol:g} * |reference|), "
            f"top-1 agreement {report['top1_agreement']:.4f} "
            f"(required {tolerance.min_top1_agreement}); see parity_report.json in the export folder"
        )
    return report
