"""GPT-Neo's building blocks written as standard ONNX ops (the portable flavor).

Every function takes the GraphBuilder, input value names and numpy weights, and returns the
name of its output. Shapes: B batch, S new tokens, T total tokens, H heads, D head_dim, E hidden.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import numpy as np

from gptneo_onnx import contract
from gptneo_onnx.export.graph_builder import INT64_MAX, GraphBuilder
from gptneo_onnx.export.plan import LayerPlan

FLOAT32_MIN = float(np.finfo(np.float32).min)


def linear(g: GraphBuilder, x: str, weight: np.ndarray, bias: np.ndarray | None, name: str) -> str:
    """x @ weight.T + bias, with torch's (out, in) weight stored transposed as (in, out)."""
    out = g.op("MatMul", [x, g.weight(f"{name}.weight", weight.T)])
    if bias is not None:
        out = g.op("Add", [out, g.weight(f"{name}.bias", bias)])
    return out


def layer_norm(g: GraphBuilder, x: str, weight: np.ndarray, bias: np.ndarray, eps: float, name: str) -> str:
    scale, shift = g.weight(f"{name}.weight", weight), g.weight(f"{name}.bias", bias)
    return g.op("LayerNormalization", [x, scale, shift], axis=-1, epsilon=eps)


def _gelu_erf(g: GraphBuilder, x: str, dtype) -> str:
    inner = g.op("Erf", [g.op("Mul", [x, g.const(1 / math.sqrt(2.0), dtype)])])
    return g.op("Mul", [g.op("Mul", [x, g.const(0.5, dtype)]), g.op("Add", [inner, g.const(1.0, dtype)])])


def _gelu_tanh(g: GraphBuilder, x: str, dtype) -> str:
    cube = g.op("Mul", [g.op("Mul", [x, x]), x])
    inner = g.op("Add", [x, g.op("Mul", [cube, g.const(0.044715, dtype)])])
    tanh = g.op("Tanh", [g.op("Mul", [inner, g.const(math.sqrt(2.0 / math.pi), dtype)])])
    return g.op("Mul", [g.op("Mul", [x, g.const(0.5, dtype)]), g.op("Add", [tanh, g.const(1.0, dtype)])])


def _laplace(g: GraphBuilder, x: str, dtype) -> str:
    mu, sigma = 0.707107, 0.282095
    shifted = g.op("Div", [g.op("Sub", [x, g.const(mu, dtype)]), g.const(sigma * math.sqrt(2.0), dtype)])
    return g.op("Mul", [g.op("Add", [g.op("Erf", [shifted]), g.const(1.0, dtype)]), g.const(0.5, dtype)])


def _silu(g: GraphBuilder, x: str, dtype, beta: float = 1.0) -> str:
    scaled = x if beta == 1.0 else g.op("Mul", [x, g.const(beta, dtype)])
    return g.op("Mul", [x, g.op("Sigmoid", [scaled])])


FORMULAS = {  # contract.ACTIVATIONS' formulas as ONNX ops
    "gelu_erf": _gelu_erf,
    "gelu_erf_clipped_10": lambda g, x, t: g.op(
        "Clip", [_gelu_erf(g, x, t), g.const(-10.0, t), g.const(10.0, t)]
    ),
    "gelu_tanh": _gelu_tanh,
    "laplace": _laplace,
    "leaky_relu": lambda g, x, t: g.op("LeakyRelu", [x], alpha=0.01),
    "identity": lambda g, x, t: x,
    "mish": lambda g, x, t: g.op("Mul", [x, g.op("Tanh", [g.op("Softplus", [x])])]),
    "quick_gelu": lambda g, x, t: _silu(g, x, t, beta=1.702),
    "relu": lambda g, x, t: g.op("Relu", [x]),
    "relu_squared": lambda g, x, t: g.op("Mul", [g.op("Relu", [x]), g.op("Relu", [x])]),
    "relu6": lambda g, x, t: g.op("Clip", [x, g.const(0.0, t), g.const(6.0, t)]),
    "sigmoid": lambda g, x, t: g.op("Sigmoid", [x]),
    "silu": _silu,
    "tanh": lambda g, x, t: g.op("Tanh", [x]),
}
ACTIVATIONS = {name: FORMULAS[formula] for name, formula in contract.ACTIVATIONS.items()}


def mlp(g: GraphBuilder, x: str, weights: dict, activation: str, dtype, name: str) -> str:
    hidden = linear(g, x, weights["mlp.c_fc.weight"], weights["mlp.c_fc.bias"], f"{name}.c_fc")
    hidden = ACTIVATIONS[activation](g, hidden, dtype)
    return linear(g, hidden, weights["mlp.c_proj.weight"], weights["mlp.c_proj.bias"], f"{name}.c_proj")


def split_heads(g: GraphBuilder, x: str, num_heads: int, head_dim: int) -> str:
    """(B, S, E) -> (B, H, S, D)"""
    shaped = g.op("Reshape", [x, g.const([0, 0, num_heads, head_dim])])
    return g.op("Transpose", [shaped], perm=[0, 2, 1, 3])


def merge_heads(g: GraphBuilder, x: str, hidden_size: int) -> str:
    """(B, H, S, D) -> (B, S, E)"""
    return g.op("Reshape", [g.op("Transpose", [x], perm=[0, 2, 1, 3]), g.const([0, 0, hidden_size])])


def attention_portable(g: GraphBuilder, query: str, key: str, value: str, bias: str, dtype) -> str:
    """softmax(q k^T + bias) v, unscaled, with scores and softmax in float32. All (B, H, *, D)."""
    if np.dtype(dtype) != np.float32:
        query = g.op("Cast", [query], to=1)
        key = g.op("Cast", [key], to=1)
    scores = g.op("MatMul", [query, g.op("Transpose", [key], perm=[0, 1, 3, 2])])  # (B, H, S, T)
    probs = g.op("Softmax", [g.op("Add", [scores, bias])], axis=-1)
    if np.dtype(dtype) != np.float32:
        probs = g.op("Cast", [probs], to=10)
    return g.op("MatMul", [probs, value])


def positions_from_mask(g: GraphBuilder, attention_mask: str, query_length: str) -> str:
    """cumsum(mask) - 1 clipped at 0, for the last `query_length` columns. (B, S) int64"""
    cumulative = g.op("CumSum", [attention_mask, g.const(1)])
    positions = g.op("Max", [g.op("Sub", [cumulative, g.const(1)]), g.const(0)])
    return g.op("Slice", [positions, g.op("Neg", [query_length]), g.const([INT64_MAX]), g.const([1])])


def attention_biases(
    g: GraphBuilder, layers: Iterable[LayerPlan], attention_mask: str, local_mask: str, query_length: str
) -> dict[int | None, str]:
    """The additive bias per window size of `layers`; a layer with a windowed cache reads `local_mask`."""
    masks = {layer.window: local_mask if layer.windowed_cache else attention_mask for layer in layers}
    return {w: attention_bias(g, masks[w], query_length, w) for w in sorted(masks, key=lambda w: w or 0)}


def attention_bias(g: GraphBuilder, attention_mask: str, query_length: str, window: int | None) -> str:
    """Additive float32 mask (B, 1, S, T): 0 where visible, float32 min elsewhere.

    Query i (index T-S..T-1) sees key j when j is not padding, j <= i, and i - j < window.
    """
    total_length = g.op("Gather", [g.op("Shape", [attention_mask]), g.const(1)], axis=0)
    start = g.op("Sub", [total_length, g.op("Squeeze", [query_length])])
    query_index = g.op("Range", [start, total_length, g.const(1)])  # (S,)
    key_index = g.op("Range", [g.const(0), total_length, g.const(1)])  # (T,)
    distance = g.op(
        "Sub", [g.op("Unsqueeze", [query_index, g.const([1])]), g.op("Unsqueeze", [key_index, g.const([0])])]
    )  # (S, T)
    visible = g.op("GreaterOrEqual", [distance, g.const(0)])
    if window is not None:
        visible = g.op("And", [visible, g.op("Less", [distance, g.const(window)])])
    not_padding = g.op("Cast", [g.op("Unsqueeze", [attention_mask, g.const([1, 2])])], to=9)  # (B, 1, 1, T)
    visible = g.op("And", [g.op("Unsqueeze", [visible, g.const([0, 1])]), not_padding])
    return g.op("Where", [visible, g.const(0.0, np.float32), g.const(FLOAT32_MIN, np.float32)])
