"""The export's side of validation and of the quality report: a saved graph run in ONNX Runtime
(CPU) on token ids, fed from its sidecar. The reference's side is export/reference_runs.py.

These runs feed the graph directly rather than through `gptneo_onnx.runtime`, so that what is
checked is the graph and its sidecar, not the runtime's handling of them.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from gptneo_onnx.contract import position_ids_from_mask


def cpu_session(graph_path: Path, purpose: str, skip_hint: str = ""):
    """An onnxruntime CPU session on the graph; its own log lines muted (errors still raise)."""
    try:
        import onnxruntime as ort
    except ImportError as error:
        raise ImportError(
            f"{purpose} runs the export in onnxruntime: install gptneo-onnx[cpu]{skip_hint}"
        ) from error
    options = ort.SessionOptions()
    options.log_severity_level = 3
    return ort.InferenceSession(str(graph_path), options, providers=["CPUExecutionProvider"])


def run_causal_lm(
    session, manifest: dict, ids: np.ndarray, mask: np.ndarray, steps: tuple[int, ...]
) -> dict[str, np.ndarray]:
    """Every output of each step (`steps`: new tokens per step), named `step{i}.{output}`. With a
    windowed local cache (`cache.local_window`), local layers carry only the fewest past rows the
    sidecar allows, so that contract is checked too."""
    cache = manifest["cache"]
    model = manifest["model"]
    batch = ids.shape[0]
    empty = np.zeros((batch, model["num_heads"], 0, model["head_dim"]), dtype=np.dtype(cache["dtype"]))
    past = {name: empty for layer in cache["layers"] for name in (layer["past_key"], layer["past_value"])}
    local_window = cache.get("local_window")
    windowed = {layer["layer"] for layer in cache["layers"] if local_window and layer.get("window")}
    row_limit = (manifest.get("optimization") or {}).get("multi_token_step_max_batch")
    names = [output.name for output in session.get_outputs()]
    local_rows, start, outputs = 0, 0, {}
    for step, size in enumerate(steps):
        chunk, step_mask = ids[:, start : start + size], mask[:, : start + size]
        feed = {
            "input_ids": chunk,
            "attention_mask": step_mask,
            "position_ids": position_ids_from_mask(step_mask, size),
        }
        feed.update(past)
        if local_window:
            feed[local_window["input"]] = step_mask[:, step_mask.shape[1] - (local_rows + size) :]
        by_rows = row_limit is not None and step > 0 and size > 1 and batch > row_limit
        results = dict(zip(names, _run_by_rows(session, feed) if by_rows else session.run(None, feed)))
        outputs.update({f"step{step}.{name}": value for name, value in results.items()})
        if local_window:
            local_rows = min(local_rows + size, local_window["min_rows"])
        past = {
            layer[past_name]: results[layer[present]][:, :, -local_rows:]
            if layer["layer"] in windowed
            else results[layer[present]]
            for layer in cache["layers"]
            for past_name, present in (("past_key", "present_key"), ("past_value", "present_value"))
        }
        start += size
    return outputs


def prefill_logits(session, manifest: dict, ids: np.ndarray) -> np.ndarray:
    """Logits (B, S, V) in float32 of one prefill of unpadded `ids` with an empty cache."""
    outputs = run_causal_lm(session, manifest, ids, np.ones_like(ids), (ids.shape[1],))
    return outputs["step0.logits"].astype(np.float32)


def run_single_pass(session, ids: np.ndarray, mask: np.ndarray) -> dict[str, np.ndarray]:
    """The outputs of a head without a cache, by name."""
    names = [output.name for output in session.get_outputs()]
    return dict(zip(names, session.run(None, {"input_ids": ids, "attention_mask": mask})))


def _run_by_rows(session, feed: dict[str, np.ndarray]) -> list[np.ndarray]:
    """One session run per batch row, outputs stacked: for graphs whose multi-token steps with a
    past take one row at a time (the sidecar's `multi_token_step_max_batch`)."""
    batch = feed["input_ids"].shape[0]
    rows = [session.run(None, {name: value[i : i + 1] for name, value in feed.items()}) for i in range(batch)]
    return [np.concatenate(parts, axis=0) for parts in zip(*rows, strict=True)]
