"""The quality report: how close an export's next-token predictions are to float32's.

Parity validation holds float exports to the reference element by element; a quantized graph is
not meant to be that close, so it is judged here instead, by perplexity, top-1 agreement and the
KL divergence from float32 on held-out token windows (quality_report.json).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from gptneo_onnx.export.export_runs import cpu_session, prefill_logits

if TYPE_CHECKING:  # the runtime imports onnxruntime, which an export without validation does not need
    from gptneo_onnx.runtime.manifest import Manifest


def quality_report(export: str | Path | Manifest, windows: np.ndarray, reference) -> dict:
    """Perplexity and top-1 agreement of an export against fp32 on token `windows` (N, L).

    `export` is an export folder or its (already read) Manifest. `reference` is the fp32
    reference model (torch) or the folder of an fp32 export. Each window is one prefill; every
    position but the last predicts the next token.
    """
    windows = np.asarray(windows, dtype=np.int64)
    if windows.ndim != 2 or windows.shape[1] < 2:
        raise ValueError(f"windows must be (n, length >= 2) token ids, got shape {windows.shape}")
    from gptneo_onnx.runtime import Manifest, log_softmax
    from gptneo_onnx.runtime.manifest import read_manifest

    manifest = export if isinstance(export, Manifest) else read_manifest(export)
    session = cpu_session(manifest.graph_path, "the quality report")
    nll, reference_nll, same, kl, count = 0.0, 0.0, 0, 0.0, 0
    for row, expected in zip(windows, _reference_logits(reference, windows), strict=True):
        actual_logp = log_softmax(prefill_logits(session, manifest.raw, row[None])[0][:-1])
        expected_logp = log_softmax(expected[:-1].astype(np.float32))
        targets = row[1:]
        positions = np.arange(len(targets))
        nll -= float(actual_logp[positions, targets].sum())
        reference_nll -= float(expected_logp[positions, targets].sum())
        same += int((actual_logp.argmax(-1) == expected_logp.argmax(-1)).sum())
        kl += float((np.exp(expected_logp) * (expected_logp - actual_logp)).sum())
        count += len(targets)
    perplexity, reference_perplexity = float(np.exp(nll / count)), float(np.exp(reference_nll / count))
    return {
        "export": manifest.raw["quantization"] or {"method": None},
        "precision": manifest.raw["precision"],
        "flavor": manifest.raw["flavor"],
        "windows": int(windows.shape[0]),
        "window_length": int(windows.shape[1]),
        "predicted_tokens": count,
        "perplexity": perplexity,
        "reference_perplexity": reference_perplexity,
        "perplexity_ratio": perplexity / reference_perplexity,
        "top1_agreement": same / count,
        "mean_kl_divergence": kl / count,
    }


def _reference_logits(reference, windows: np.ndarray) -> Iterator[np.ndarray]:
    """fp32 reference logits per window: `reference` is a torch model or an fp32 export folder."""
    if isinstance(reference, (str, Path)):
        from gptneo_onnx.runtime.manifest import read_manifest

        manifest = read_manifest(reference)
        session = cpu_session(manifest.graph_path, "the quality report")
        for row in windows:
            yield prefill_logits(session, manifest.raw, row[None])[0]
        return
    import torch

    with torch.no_grad():
        for row in windows:
            ids = torch.from_numpy(np.ascontiguousarray(row[None]))
            logits = reference(ids, torch.ones_like(ids))
            logits = logits[0] if isinstance(logits, tuple) else logits
            yield logits[0].float().numpy()
