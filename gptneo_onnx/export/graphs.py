"""Assemble the GPT-Neo ONNX graph for a task from the reference model's weights."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from gptneo_onnx.config import GPTNeoConfig
from gptneo_onnx.contract import LOCAL_ATTENTION_MASK, cache_names
from gptneo_onnx.export import layers
from gptneo_onnx.export.graph_builder import GraphBuilder
from gptneo_onnx.export.optimized import transformer_body_fused
from gptneo_onnx.export.plan import ExportPlan

BATCH, SEQUENCE, PAST, TOTAL = (
    "batch_size",
    "sequence_length",
    "past_sequence_length",
    "total_sequence_length",
)
# A windowed local cache (see export/optimized.py) holds its own number of rows.
LOCAL_PAST, LOCAL_TOTAL = "local_past_sequence_length", "local_total_sequence_length"
NUMPY_DTYPES = {"float32": np.float32, "float16": np.float16}
# onnxruntime prepacks each lm_head slice and frees its mapped pages before the next, so the
# load-time peak holds one slice of the table, not a second copy of all of it.
LM_HEAD_SLICE_BYTES = 24 << 20
# causal-lm: an input with a default (an initializer of the same name): the lm_head runs on the
# last N positions only (0 = every position, the default, so Optimum's IO and behaviour stay).
NUM_LOGITS_TO_KEEP = "num_logits_to_keep"
INT64_MAX = np.iinfo(np.int64).max


@dataclass(frozen=True)
class IOSpec:
    """One graph input or output, as written into the sidecar."""

    name: str
    dtype: str
    shape: list


def numpy_weights(model: torch.nn.Module, dtype) -> dict[str, np.ndarray]:
    """The model's parameters as numpy, in the export precision (tied lm_head skipped)."""
    return {
        name: tensor.detach().to(torch.float32).numpy().astype(dtype, copy=False)
        for name, tensor in model.state_dict().items()
        if name != "lm_head.weight"
    }


def io_specs(config: GPTNeoConfig, plan: ExportPlan) -> tuple[list[IOSpec], list[IOSpec]]:
    """The graph's inputs and outputs for the plan's task: the export surface, declared as data.

    Layers with a windowed cache get their own cache length, and the graph the mask input for it."""
    task, precision = plan.task, plan.precision
    if plan.cached:
        inputs = [
            IOSpec("input_ids", "int64", [BATCH, SEQUENCE]),
            IOSpec("attention_mask", "int64", [BATCH, TOTAL]),
            IOSpec("position_ids", "int64", [BATCH, SEQUENCE]),
        ]
        if plan.windowed_local_cache:
            inputs.append(IOSpec(LOCAL_ATTENTION_MASK, "int64", [BATCH, LOCAL_TOTAL]))
        outputs = [IOSpec("logits", "float32", [BATCH, SEQUENCE, config.vocab_size])]
        for layer in plan.layers:
            past_length, total = (LOCAL_PAST, LOCAL_TOTAL) if layer.windowed_cache else (PAST, TOTAL)
            cache_shape = [BATCH, config.num_heads, past_length, config.head_dim]
            present_shape = [BATCH, config.num_heads, total, config.head_dim]
            names = cache_names(layer.layer)
            inputs += [
                IOSpec(names["past_key"], precision, cache_shape),
                IOSpec(names["past_value"], precision, cache_shape),
            ]
            outputs += [
                IOSpec(names["present_key"], precision, present_shape),
                IOSpec(names["present_value"], precision, present_shape),
            ]
        return inputs, outputs
    inputs = [
        IOSpec("input_ids", "int64", [BATCH, SEQUENCE]),
        IOSpec("attention_mask", "int64", [BATCH, SEQUENCE]),
    ]
    labels = config.num_labels
    outputs = {
        "base": [IOSpec("last_hidden_state", precision, [BATCH, SEQUENCE, config.hidden_size])],
        "sequence-classification": [IOSpec("logits", "float32", [BATCH, labels])],
        "token-classification": [IOSpec("logits", "float32", [BATCH, SEQUENCE, labels])],
        "question-answering": [
            IOSpec("start_logits", "float32", [BATCH, SEQUENCE]),
            IOSpec("end_logits", "float32", [BATCH, SEQUENCE]),
        ],
    }[task]
    return inputs, outputs


def transformer_body(
    g: GraphBuilder,
    config: GPTNeoConfig,
    plan: ExportPlan,
    weights: dict[str, np.ndarray],
    dtype,
    input_ids: str,
    attention_mask: str,
    position_ids: str,
    past: list[tuple[str, str]] | None,
) -> tuple[str, list[tuple[str, str]]]:
    """Embeddings, the blocks and the final norm. Returns hidden (B, S, E) and per-layer K/V.

    Layers with a windowed cache (see the plan) take their mask from `local_attention_mask`."""
    query_length = g.op("Slice", [g.op("Shape", [input_ids]), g.const([1]), g.const([2])])  # [S]
    biases = layers.attention_biases(g, plan.layers, attention_mask, LOCAL_ATTENTION_MASK, query_length)

    tokens = g.op(
        "Gather", [g.weight("transformer.wte.weight", weights["transformer.wte.weight"]), input_ids]
    )
    positions = g.op(
        "Gather", [g.weight("transformer.wpe.weight", weights["transformer.wpe.weight"]), position_ids]
    )
    hidden = g.op("Add", [tokens, positions])
    presents = []
    for i in range(config.num_layers):
        p = f"transformer.h.{i}."
        w = {key[len(p) :]: value for key, value in weights.items() if key.startswith(p)}
        normed = layers.layer_norm(
            g, hidden, w["ln_1.weight"], w["ln_1.bias"], config.layer_norm_epsilon, f"{p}ln_1"
        )
        qkv_weight = np.concatenate(
            [w["attn.q_proj.weight"], w["attn.k_proj.weight"], w["attn.v_proj.weight"]]
        )
        qkv = layers.linear(g, normed, qkv_weight, None, f"{p}attn.qkv_proj")
        query, key, value = g.op("Split", [qkv, g.const([config.hidden_size] * 3)], outputs=3, axis=-1)
        query, key, value = (
            layers.split_heads(g, t, config.num_heads, config.head_dim) for t in (query, key, value)
        )
        if past is not None:
            key = g.op("Concat", [past[i][0], key], axis=2)
            value = g.op("Concat", [past[i][1], value], axis=2)
        presents.append((key, value))
        context = layers.attention_portable(g, query, key, value, biases[config.layer_window(i)], dtype)
        attn_out = layers.linear(
            g,
            layers.merge_heads(g, context, config.hidden_size),
            w["attn.out_proj.weight"],
            w["attn.out_proj.bias"],
            f"{p}attn.out_proj",
        )
        hidden = g.op("Add", [hidden, attn_out])
        normed = layers.layer_norm(
            g, hidden, w["ln_2.weight"], w["ln_2.bias"], config.layer_norm_epsilon, f"{p}ln_2"
        )
        hidden = g.op("Add", [hidden, layers.mlp(g, normed, w, config.activation_function, dtype, f"{p}mlp")])
    final = weights["transformer.ln_f.weight"], weights["transformer.ln_f.bias"]
    return layers.layer_norm(g, hidden, *final, config.layer_norm_epsilon, "transformer.ln_f"), presents


def to_float32(g: GraphBuilder, value: str, dtype) -> str:
    return value if np.dtype(dtype) == np.float32 else g.op("Cast", [value], to=1)


def head_outputs(
    g: GraphBuilder, config: GPTNeoConfig, task: str, weights, hidden: str, input_ids: str, dtype
) -> list[str]:
    """The task head on the final hidden state; logits leave the graph in float32."""
    if task == "causal-lm":
        # Only the last `num_logits_to_keep` positions (0: all) reach the lm_head: (B, S, E) -> (B, K, E).
        # Slice starts at -K, clamped to the sequence; -0 is 0, every position.
        start = g.op("Neg", [g.op("Reshape", [NUM_LOGITS_TO_KEEP, g.const([1])])])
        hidden = g.op("Slice", [hidden, start, g.const([INT64_MAX]), g.const([1])])
        # lm_head is tied to wte: reuse the embedding table, stored once. (B, K, E) -> (B, K, V)
        # With external data it is read through slices of its rows (see GraphBuilder.row_views).
        flat = g.op("Reshape", [hidden, g.const([-1, config.hidden_size])])
        slices = g.row_views("transformer.wte.weight", LM_HEAD_SLICE_BYTES)
        parts = [g.op("Gemm", [flat, table], transB=1) for table in slices]
        logits = parts[0] if len(parts) == 1 else g.op("Concat", parts, axis=-1)
        kept = g.op("Slice", [g.op("Shape", [hidden]), g.const([0]), g.const([2])])  # [B, K]
        shape = g.op("Concat", [kept, g.const([config.vocab_size])], axis=0)
        return [to_float32(g, g.op("Reshape", [logits, shape]), dtype)]
    if task == "base":
        return [hidden]
    if task == "token-classification":
        return [
            to_float32(
                g,
                layers.linear(
                    g, hidden, weights["classifier.weight"], weights["classifier.bias"], "classifier"
                ),
                dtype,
            )
        ]
    if task == "question-answering":
        both = layers.linear(
            g, hidden, weights["qa_outputs.weight"], weights["qa_outputs.bias"], "qa_outputs"
        )
        start, end = g.op("Split", [to_float32(g, both, dtype), g.const([1, 1])], outputs=2, axis=-1)
        return [g.op("Squeeze", [start, g.const([-1])]), g.op("Squeeze", [end, g.const([-1])])]
    # sequence-classification: score every token, keep the last non-pad one per row
    scores = to_float32(
        g, layers.linear(g, hidden, weights["score.weight"], None, "score"), dtype
    )  # (B, S, L)
    length = g.op("Gather", [g.op("Shape", [input_ids]), g.const(1)], axis=0)
    index = g.op("Range", [g.const(0), length, g.const(1)])  # (S,)
    if config.pad_token_id is not None:
        not_pad = g.op(
            "Cast", [g.op("Not", [g.op("Equal", [input_ids, g.const(config.pad_token_id)])])], to=7
        )
        index = g.op("Mul", [index, not_pad])  # (B, S)
    else:
        index = g.op("Expand", [index, g.op("Shape", [input_ids])])
    # The largest non-pad index is its own position (0 for a row of padding only), as transformers'
    # argmax; ReduceMax, since tract types ArgMax over a symbolic axis as a dimension, not int64.
    last = g.op("ReduceMax", [index], axes=[1], keepdims=1)  # (B, 1)
    gather_index = g.op(
        "Expand",
        [
            g.op("Unsqueeze", [last, g.const([2])]),
            g.op("Concat", [g.op("Shape", [last]), g.const([config.num_labels])], axis=0),
        ],
    )
    return [g.op("Squeeze", [g.op("GatherElements", [scores, gather_index], axis=1), g.const([1])])]


def build_graph(model: torch.nn.Module, plan: ExportPlan) -> tuple[GraphBuilder, list[IOSpec], list[IOSpec]]:
    """The graph the plan describes, from the reference model `model`: `portable`, or `optimized`
    (fused ops). With the plan's lm_head row views (external data), the tied lm_head reads the
    embedding table through row slices that alias it."""
    config: GPTNeoConfig = model.config
    dtype = NUMPY_DTYPES[plan.precision]
    weights = numpy_weights(model, dtype)
    inputs, outputs = io_specs(config, plan)
    g = GraphBuilder(f"gptneo_{plan.task.replace('-', '_')}", external_data=plan.lm_head_row_views)
    for spec in inputs:
        g.add_input(spec.name, spec.dtype, spec.shape)
    past = None
    if plan.cached:
        # Listed after the initializer-free inputs: a runtime that does not know it leaves it out.
        g.add_input(NUM_LOGITS_TO_KEEP, np.int64, [])
        g.weights[NUM_LOGITS_TO_KEEP] = np.array(0, np.int64)  # rank 0 (`weight` makes arrays 1-D)
        position_ids = "position_ids"
        past = [(cache_names(i)["past_key"], cache_names(i)["past_value"]) for i in range(config.num_layers)]
    else:
        query_length = g.op("Slice", [g.op("Shape", ["input_ids"]), g.const([1]), g.const([2])])
        position_ids = layers.positions_from_mask(g, "attention_mask", query_length)
    body = transformer_body_fused if plan.flavor == "optimized" else transformer_body
    hidden, presents = body(
        g, config, plan, weights, dtype, "input_ids", "attention_mask", position_ids, past
    )
    values = head_outputs(g, config, plan.task, weights, hidden, "input_ids", dtype)
    if plan.cached:
        values += [tensor for pair in presents for tensor in pair]
    for spec, value in zip(outputs, values, strict=True):
        g.add_output(value, spec.name, spec.dtype, spec.shape)
    return g, inputs, outputs
