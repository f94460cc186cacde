"""Parity validation: run an export in ONNX Runtime against the reference model.

The inputs exercise what matters for GPT-Neo: a batch of two with left padding, a total
length longer than the local window, a prefill with an empty past, and decode steps with a past.

The rule follows the model's own rounding (see `Tolerance`): the truth is the reference run in
float64, and each output may be as far from it as a few times the reference run in the export's
precision is, never less than a fixed floor. Rounding grows with the weights' scale, so a fixed
bound alone refuses good exports of trained checkpoints.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from gptneo_onnx.config import GPTNeoConfig
from gptneo_onnx.errors import ParityError
from gptneo_onnx.export.export_runs import cpu_session, run_causal_lm, run_single_pass
from gptneo_onnx.export.output_folder import write_json
from gptneo_onnx.export.reference_runs import computing_in, reference_causal_lm, reference_single_pass
from gptneo_onnx.export.sidecar import PARITY_REPORT, record_validation

__all__ = [
    "ParityError",
    "Tolerance",
    "parity_verdict",
    "validate_and_record",
    "validate_export",
    "validation_batch",
]


@dataclass(frozen=True)
class Tolerance:
    """|export - float64 reference| <= max(floor, rounding_factor x rounding) for every element of an
    output, where rounding is the largest |reference in `rounding_precision` - float64 reference| of
    that output (of all layers' cache rows, for a step's presents), and floor is
    `floor_atol + floor_rtol * |reference|` (for fp16, `floor_atol` times the largest |logit|).
    Top-1 must agree wherever the float64 top-1/top-2 margin exceeds the bound."""

    floor_atol: float
    floor_rtol: float = 0.0
    floor_relative_to_logit_range: bool = False
    rounding_precision: str | None = "float32"  # None: no rounding run (the floor alone)
    rounding_factor: float = 8.0
    # Past this fraction of an output's largest |value| the reference's rounding is no measure: a
    # model that chaotic in float32 (its own PyTorch run is as far off) fails instead of passing blind.
    rounding_cap: float = 0.01

    @classmethod
    def for_precision(cls, precision: str, quantization: str | None = None) -> Tolerance:
        if quantization:  # quality is judged by perplexity (quality_report.json)
            return cls(floor_atol=float("inf"), rounding_precision=None)
        if precision == "float16":
            # fp16 keeps ~3 decimal digits: at trained scale its own reference is often >10% off
            return cls(
                floor_atol=0.05,
                floor_relative_to_logit_range=True,
                rounding_precision="float16",
                rounding_cap=0.25,
            )
        return cls(floor_atol=1e-4, floor_rtol=1e-4)

    def describe(self) -> dict:
        """The rule as parity_report.json states it: what was allowed, and why."""
        floor = f"{self.floor_atol:g}" + (
            " x max |reference logit|" if self.floor_relative_to_logit_range else ""
        )
        floor += f" + {self.floor_rtol:g} x |reference|" if self.floor_rtol else ""
        rounding = (
            f"{self.rounding_factor:g} x the largest |{self.rounding_precision} reference - float64 "
            "reference| of that output (of all layers' presents, for a step's cache)"
            if self.rounding_precision
            else "none (not judged element by element)"
        )
        return {
            "reference_precision": "float64",
            "rounding_precision": self.rounding_precision,
            "rounding_factor": self.rounding_factor,
            "floor": floor,
            "rule": f"every element of an output: |export - float64 reference| <= max({floor}, {rounding}); "
            "top-1 must agree wherever the float64 top-1/top-2 margin exceeds that bound",
            "why": "rounding grows with the weights' scale: an export as close to the exact (float64) math "
            f"as the reference itself is in {self.rounding_precision or 'its precision'} passes, while real "
            "defects (masks, scales, positions, heads) move outputs far past the reference's own rounding",
        }


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


def causal_lm_steps(length: int) -> tuple[int, ...]:
    """Prefill (empty past), then a one-token and a three-token step with a past."""
    return (length - 4, 1, 3)


def _reference(model: torch.nn.Module, manifest: dict, ids: np.ndarray, mask: np.ndarray, dtype: torch.dtype):
    with computing_in(model, dtype):
        if manifest["task"] == "causal-lm":
            return reference_causal_lm(
                model, manifest["cache"], ids, mask, causal_lm_steps(ids.shape[1]), dtype
            )
        return reference_single_pass(model, manifest, ids, mask)


def reference_rounding(truth: dict, rounding_run: dict | None) -> tuple[dict[str, float], dict[str, float]]:
    """The largest |rounding run - float64 run| of each group of outputs, and the group's largest
    |value|. 0 (the floor alone) without a rounding run, or where it overflowed (an fp16 reference
    can): never an unbounded bound."""
    rounding: dict[str, float] = {}
    scale: dict[str, float] = {}
    for name, out in truth.items():
        deviation, values = 0.0, out.select(out.values)
        if rounding_run is not None and values.size:
            deviation = float(np.abs(out.select(rounding_run[name].values) - values).max())
        rounding[out.group] = max(rounding.get(out.group, 0.0), deviation if np.isfinite(deviation) else 0.0)
        scale[out.group] = max(scale.get(out.group, 0.0), float(np.abs(values).max()) if values.size else 0.0)
    return rounding, scale


def judge_output(
    name: str,
    truth,
    rounding: float,
    scale: float,
    actual: np.ndarray | None,
    tolerance: Tolerance,
    floor_atol: float,
):
    """One output's check: its bound, its worst difference, and top-1 where the truth decides it."""
    check: dict = {"output": name, "rounding_group": truth.group}
    if actual is None:
        return {**check, "passed": False, "reason": "the export does not produce this output"}
    actual = actual.transpose(0, 2, 1, 3) if truth.cache else actual
    if actual.shape != truth.values.shape:
        return {
            **check,
            "passed": False,
            "reason": f"shape {actual.shape}, the reference gives {truth.values.shape}",
        }
    expected, actual = truth.select(truth.values), truth.select(actual.astype(np.float64))
    if not np.isfinite(actual).all():
        return {**check, "passed": False, "reason": "the export produced NaN or Inf"}
    capped = tolerance.rounding_factor * rounding > tolerance.rounding_cap * scale
    rounding_bound = min(tolerance.rounding_factor * rounding, tolerance.rounding_cap * scale)
    allowed = np.maximum(floor_atol + tolerance.floor_rtol * np.abs(expected), rounding_bound)
    diff = np.abs(actual - expected)
    check.update(
        max_abs_diff=float(diff.max()) if diff.size else 0.0,
        reference_rounding=rounding,
        rounding_capped=bool(capped),
        max_allowed=float(allowed.max()) if allowed.size else 0.0,
        worst_ratio=float((diff / allowed).max()) if diff.size else 0.0,  # <= 1 passes
        passed=bool((diff <= allowed).all()),
    )
    if truth.top1 and expected.size:
        top = expected.argmax(-1)
        runner_up = np.partition(expected, -2, axis=-1)[..., -2] if expected.shape[-1] > 1 else -np.inf
        margin = np.take_along_axis(expected, top[..., None], -1)[..., 0] - runner_up
        decided = margin > np.take_along_axis(allowed, top[..., None], -1)[..., 0]
        same = actual.argmax(-1) == top
        flipped = decided & ~same
        check.update(
            top1_positions=int(top.size),
            top1_same=int(same.sum()),
            top1_decided=int(decided.sum()),
            top1_flipped=int(flipped.sum()),
        )
        check["passed"] = check["passed"] and not flipped.any()
    if not check["passed"]:
        check["reason"] = (
            "top-1 differs where the reference decides it"
            if diff.size and (diff <= allowed).all()
            else "differs beyond the bound"
        )
        if capped:
            check["reason"] += (
                f"; the {tolerance.rounding_precision} reference itself is {rounding / scale:.1%} of this "
                "output's range off the float64 run: the model is numerically unstable at this precision"
            )
    return check


def parity_verdict(model: torch.nn.Module, session, manifest: dict, tolerance: Tolerance) -> dict:
    """Compare `session` (a loaded export) with `model` on the validation batch; returns the verdict."""
    ids, mask = validation_batch(model.config)
    errors: list[str] = []
    actual: dict[str, np.ndarray] = {}
    if session is not None:
        produced = {output.name for output in session.get_outputs()}
        missing = [spec["name"] for spec in manifest["outputs"] if spec["name"] not in produced]
        if missing:
            errors.append(f"the graph lacks the output(s) {', '.join(missing)}")
        else:
            try:
                if manifest["task"] == "causal-lm":
                    actual = run_causal_lm(session, manifest, ids, mask, causal_lm_steps(ids.shape[1]))
                else:
                    actual = run_single_pass(session, ids, mask)
            except Exception as error:  # onnxruntime raises its own exception types from run()
                errors.append(f"the export failed to run in onnxruntime ({type(error).__name__}: {error})")
    truth = _reference(model, manifest, ids, mask, torch.float64)
    rounding_run = None
    if tolerance.rounding_precision is not None:
        rounding_run = _reference(model, manifest, ids, mask, getattr(torch, tolerance.rounding_precision))
    floor_atol = tolerance.floor_atol
    if tolerance.floor_relative_to_logit_range:
        logits = [out.select(out.values) for out in truth.values() if out.top1]
        floor_atol *= max([1.0] + [float(np.abs(x).max()) for x in logits if x.size])
    rounding, scale = reference_rounding(truth, rounding_run)
    checks = [
        judge_output(
            name, out, rounding[out.group], scale[out.group], actual.get(name), tolerance, floor_atol
        )
        for name, out in truth.items()
    ]
    positions = sum(check.get("top1_positions", 0) for check in checks)
    same = sum(check.get("top1_same", 0) for check in checks)
    decided = sum(check.get("top1_decided", 0) for check in checks)
    flipped = sum(check.get("top1_flipped", 0) for check in checks)
    failed = [check["output"] for check in checks if not check["passed"]]
    if errors:
        failed = []  # no output was produced; the error says why
    return {
        "passed": not errors and not failed,
        "errors": errors,
        "failed_outputs": failed,
        # None when no output could be measured (the errors say why)
        "max_abs_diff": max((c["max_abs_diff"] for c in checks if "max_abs_diff" in c), default=None),
        "max_abs_diff_allowed": max((check.get("max_allowed", 0.0) for check in checks), default=0.0),
        "top1_agreement": (decided - flipped) / decided if decided else 1.0,
        "top1_agreement_required": 1.0,
        "top1_decided_positions": decided,
        "top1_agreement_all_positions": same / positions if positions else 1.0,  # near-ties included
        **tolerance.describe(),
        "inputs": {
            "batch": int(ids.shape[0]),
            "total_length": int(ids.shape[1]),
            "left_padding": [int((row == 0).sum()) for row in mask],
        },
        "checks": checks,
    }


def validate_export(model: torch.nn.Module, export_dir: Path, manifest: dict, tolerance: Tolerance) -> dict:
    """Run the saved export in ONNX Runtime (CPU) against `model`; write and return the report.

    The report is written whatever fails. Raises ParityError, which carries the report, when the
    export fails to load or run, or an output is off beyond `tolerance`.
    """
    graph_path = export_dir / manifest["graph"]["file"]
    session, load_error = None, None
    try:
        session = cpu_session(graph_path, "validation", " or pass validate=False")
    except ImportError:  # no onnxruntime: the install's to fix, not a fault of the graph
        raise
    except Exception as error:  # onnxruntime's own exception types: an invalid or unloadable graph
        load_error = f"onnxruntime could not load the graph ({type(error).__name__}: {error})"
    verdict = parity_verdict(model, session, manifest, tolerance)
    if load_error:
        verdict.update(passed=False, errors=[load_error, *verdict["errors"]], failed_outputs=[])
    report = {
        "task": manifest["task"],
        "precision": manifest["precision"],
        "flavor": manifest["flavor"],
        **verdict,
    }
    path = write_json(export_dir, PARITY_REPORT, report)
    if not report["passed"]:
        raise ParityError(_failure_summary(report), path, report)
    return report


def validate_and_record(model: torch.nn.Module, export_dir: Path, manifest: dict) -> dict:
    """The one validation step of `export` and `verify`: validate the export against `model` with
    the tolerance its precision and quantization call for, write parity_report.json, and record the
    outcome in the sidecar (a failed export stops loading). Returns the report; raises ParityError
    (carrying it) once the failure is recorded."""
    method = (manifest.get("quantization") or {}).get("method")
    tolerance = Tolerance.for_precision(manifest["precision"], method)
    try:
        report = validate_export(model, export_dir, manifest, tolerance)
    except ParityError as error:
        record_validation(export_dir, manifest, error.parity_report)
        raise
    record_validation(export_dir, manifest, report)
    return report


def _failure_summary(report: dict) -> str:
    if report["errors"]:
        return f"the export could not be validated: {report['errors'][0]}"
    failed = [check for check in report["checks"] if not check["passed"]]
    worst = failed[0]
    detail = worst["reason"]
    if "max_abs_diff" in worst:
        detail += f": max |diff| {worst['max_abs_diff']:.3g}, {worst['worst_ratio']:.3g} times its bound"
        if worst.get("top1_flipped"):
            detail += (
                f", top-1 flipped at {worst['top1_flipped']} of {worst['top1_decided']} decided positions"
            )
    off = f"{len(failed)} output(s) off, first {worst['output']}"
    return f"export does not match the reference: {off} ({detail})"
