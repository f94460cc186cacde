"""The optimized flavor: GPT-Neo's blocks on ONNX Runtime's fused contrib ops (com.microsoft).

- Attention: GroupQueryAttention with num_heads == kv_num_heads, `scale=1.0` (GPT-Neo does not
  scale scores) and `local_window_size=window` on local layers. GQA has no 2-D padding mask, so
  padding enters as `attention_bias` (B, 1, S, T), 0 or a large negative per key column; the
  causal and window masks are GQA's own. `seqlens_k` is each row's last real column: T - 1 for
  every row of a left-padded mask (padding counts as tokens, as in the portable graph), less for
  the shorter rows of a ragged batch (docs/sidecar.md, `cache.ragged_rows`). GQA's 17th input
  (per-row query lengths, onnxruntime >= 1.32) is left out so that the graph also loads on
  onnxruntime(-gpu) 1.31: a step of several tokens on top of a past then needs batch 1
  (`multi_token_step_max_batch`; prefill and one-token decoding take any batch). The same graph
  serves both cache modes: concat (past of length P, present of length P + S) and shared-buffer
  (past and present bound to one (B, H, C, D) buffer).
- LayerNorm: SkipLayerNormalization fuses each residual add (with the preceding linear's bias)
  and the next LayerNorm; the embedding sum feeds the first one.
- MLP: FastGelu (tanh GELU) or BiasGelu (erf GELU) with the c_fc bias folded in.

Where GQA can't serve (CPU needs head_dim % 8 == 0), attention falls back to the portable ops
inside the same graph: the export plan (export/plan.py) gives each layer its kernel and the
reason for a fallback, and `optimization_summary` writes them into the sidecar.

Local layers take their mask from `local_attention_mask` (see `plan.local_cache_window`), so a
runner may keep only their newest past rows; GQA on CPU reads every row it is given.
"""

from __future__ import annotations

import numpy as np

from gptneo_onnx import contract
from gptneo_onnx.config import GPTNeoConfig
from gptneo_onnx.contract import LOCAL_ATTENTION_MASK
from gptneo_onnx.export import layers
from gptneo_onnx.export.graph_builder import MS_DOMAIN, GraphBuilder
from gptneo_onnx.export.plan import FUSED_ATTENTION, PORTABLE_ATTENTION, ExportPlan

FUSED_GELU = {  # the two GELU formulas have fused com.microsoft kernels
    name: {"gelu_tanh": "FastGelu", "gelu_erf": "BiasGelu"}[formula]
    for name, formula in contract.ACTIVATIONS.items()
    if formula in ("gelu_tanh", "gelu_erf")
}
NEGATIVE = {np.dtype("float32"): float(np.finfo(np.float32).min), np.dtype("float16"): -65504.0}


def optimization_summary(config: GPTNeoConfig, plan: ExportPlan) -> dict:
    """The manifest's `optimization` object: which fused kernel each part of a block uses."""
    fused = plan.fused_attention
    return {
        "attention": FUSED_ATTENTION if fused else PORTABLE_ATTENTION,
        "attention_fallback_reason": plan.attention_fallback_reason,
        "layer_norm": "SkipLayerNormalization",
        "activation": FUSED_GELU.get(config.activation_function, f"portable {config.activation_function}"),
        "cache_modes": ["concat", "shared-buffer"] if fused else ["concat"],
        # GQA runs a multi-token step on top of a past one row at a time (see the module doc).
        "multi_token_step_max_batch": 1 if fused else None,
    }


def _skip_layer_norm(
    g: GraphBuilder, x: str, skip: str, weights, bias: np.ndarray | None, eps: float, name: str
):
    """LayerNorm(x + skip + bias); returns (normed, the sum) for the next residual."""
    inputs = [x, skip, g.weight(f"{name}.weight", weights[0]), g.weight(f"{name}.bias", weights[1])]
    if bias is not None:
        inputs.append(g.weight(f"{name}.residual_bias", bias))
    normed, total = g.unique("skipln"), g.unique("residual")
    g.op("SkipLayerNormalization", inputs, outputs=[normed, "", "", total], domain=MS_DOMAIN, epsilon=eps)
    return normed, total


def _mlp_up(g: GraphBuilder, x: str, w: dict, activation: str, dtype, name: str) -> str:
    """c_fc then the activation, with the bias folded into FastGelu/BiasGelu when possible."""
    hidden = g.op("MatMul", [x, g.weight(f"{name}.c_fc.weight", w["mlp.c_fc.weight"].T)])
    bias = g.weight(f"{name}.c_fc.bias", w["mlp.c_fc.bias"])
    fused = FUSED_GELU.get(activation)
    if fused is not None:
        return g.op(fused, [hidden, bias], domain=MS_DOMAIN)
    return layers.ACTIVATIONS[activation](g, g.op("Add", [hidden, bias]), dtype)


class _GQAInputs:
    """The per-graph tensors every GroupQueryAttention node shares."""

    def __init__(self, g: GraphBuilder, input_ids: str, attention_mask: str, dtype):
        ids_shape = g.op("Shape", [input_ids])
        batch = g.op("Slice", [ids_shape, g.const([0]), g.const([1])])  # [B]
        query_length = g.op("Slice", [ids_shape, g.const([1]), g.const([2])])  # [S]
        total = g.op("Slice", [g.op("Shape", [attention_mask]), g.const([1]), g.const([2])])  # [T]
        total_i32 = g.op("Cast", [total], to=6)
        self.total_sequence_length = g.op("Squeeze", [total_i32, g.const([0])])  # scalar int32
        # seqlens_k (B,): each row's last real column, where its new tokens end. T - 1 for every
        # row of a left-padded mask, as before; a ragged batch (cache.ragged_rows) ends its
        # shorter rows early with zero columns, so GQA writes and reads only their own columns.
        mask_i32 = g.op("Cast", [attention_mask], to=6)
        last_real = g.op("ArgMax", [mask_i32], axis=1, keepdims=0, select_last_index=1)
        self.seqlens_k = g.op("Cast", [last_real], to=6)
        # attention_bias (B, 1, S, T): 0 for real keys, a large negative for padding.
        padding = g.op("Cast", [g.op("Unsqueeze", [attention_mask, g.const([1, 2])])], to=9)  # (B, 1, 1, T)
        column_bias = g.op("Where", [padding, g.const(0.0, dtype), g.const(NEGATIVE[np.dtype(dtype)], dtype)])
        full_shape = g.op("Concat", [batch, g.const([1]), query_length, total], axis=0)
        self.attention_bias = g.op("Expand", [column_bias, full_shape])


def _gqa(g: GraphBuilder, shared: _GQAInputs, qkv: str, past, config: GPTNeoConfig, window: int | None):
    """Packed QKV (B, S, 3E) -> context (B, S, E), present key, present value (B, H, T, D)."""
    past_key, past_value = past if past is not None else ("", "")
    inputs = [qkv, "", "", past_key, past_value, shared.seqlens_k, shared.total_sequence_length]
    inputs += ["", "", "", shared.attention_bias]
    return g.op(
        "GroupQueryAttention",
        inputs,
        outputs=3,
        domain=MS_DOMAIN,
        num_heads=config.num_heads,
        kv_num_heads=config.num_heads,
        scale=1.0,
        local_window_size=window if window is not None else -1,
    )


def _portable_attention(g, config, qkv, past, bias, dtype):
    query, key, value = g.op("Split", [qkv, g.const([config.hidden_size] * 3)], outputs=3, axis=-1)
    query, key, value = (
        layers.split_heads(g, t, config.num_heads, config.head_dim) for t in (query, key, value)
    )
    if past is not None:
        key = g.op("Concat", [past[0], key], axis=2)
        value = g.op("Concat", [past[1], value], axis=2)
    context = layers.attention_portable(g, query, key, value, bias, dtype)
    return layers.merge_heads(g, context, config.hidden_size), key, value


def transformer_body_fused(
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
    """Same contract as `graphs.transformer_body`, built on fused kernels; each layer's attention
    runs the kernel the plan gives it, and layers with a windowed cache read `local_attention_mask`."""
    eps = config.layer_norm_epsilon
    fused = [layer for layer in plan.layers if layer.attention == FUSED_ATTENTION]
    portable = [layer for layer in plan.layers if layer.attention != FUSED_ATTENTION]
    if fused:
        shared = _GQAInputs(g, input_ids, attention_mask, dtype)
        windowed = any(layer.windowed_cache for layer in fused)
        local = _GQAInputs(g, input_ids, LOCAL_ATTENTION_MASK, dtype) if windowed else shared
    if portable:
        query_length = g.op("Slice", [g.op("Shape", [input_ids]), g.const([1]), g.const([2])])
        biases = layers.attention_biases(g, portable, attention_mask, LOCAL_ATTENTION_MASK, query_length)
    tokens = g.op(
        "Gather", [g.weight("transformer.wte.weight", weights["transformer.wte.weight"]), input_ids]
    )
    positions = g.op(
        "Gather", [g.weight("transformer.wpe.weight", weights["transformer.wpe.weight"]), position_ids]
    )

    def block_weights(i: int) -> dict[str, np.ndarray]:
        prefix = f"transformer.h.{i}."
        return {key[len(prefix) :]: value for key, value in weights.items() if key.startswith(prefix)}

    first = block_weights(0)
    normed, hidden = _skip_layer_norm(
        g, tokens, positions, (first["ln_1.weight"], first["ln_1.bias"]), None, eps, "transformer.h.0.ln_1"
    )
    presents = []
    for i in range(config.num_layers):
        p, w = f"transformer.h.{i}.", block_weights(i)
        qkv_weight = np.concatenate(
            [w["attn.q_proj.weight"], w["attn.k_proj.weight"], w["attn.v_proj.weight"]]
        )
        qkv = g.op("MatMul", [normed, g.weight(f"{p}attn.qkv_proj.weight", qkv_weight.T)])
        layer_past = past[i] if past is not None else None
        layer = plan.layers[i]
        if layer.attention == FUSED_ATTENTION:
            inputs = local if layer.windowed_cache else shared
            context, key, value = _gqa(g, inputs, qkv, layer_past, config, layer.window)
        else:
            context, key, value = _portable_attention(g, config, qkv, layer_past, biases[layer.window], dtype)
        presents.append((key, value))
        attn_out = g.op(
            "MatMul", [context, g.weight(f"{p}attn.out_proj.weight", w["attn.out_proj.weight"].T)]
        )
        normed, hidden = _skip_layer_norm(
            g, attn_out, hidden, (w["ln_2.weight"], w["ln_2.bias"]), w["attn.out_proj.bias"], eps, f"{p}ln_2"
        )
        up = _mlp_up(g, normed, w, config.activation_function, dtype, f"{p}mlp")
        mlp_out = g.op("MatMul", [up, g.weight(f"{p}mlp.c_proj.weight", w["mlp.c_proj.weight"].T)])
        if i + 1 < config.num_layers:
            following = block_weights(i + 1)
            norm, norm_name = (
                (following["ln_1.weight"], following["ln_1.bias"]),
                f"transformer.h.{i + 1}.ln_1",
            )
        else:
            norm = (weights["transformer.ln_f.weight"], weights["transformer.ln_f.bias"])
            norm_name = "transformer.ln_f"
        normed, hidden = _skip_layer_norm(g, mlp_out, hidden, norm, w["mlp.c_proj.bias"], eps, norm_name)
    return normed, presents
