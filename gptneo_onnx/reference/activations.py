"""GPT-Neo's MLP activations in plain torch: each formula of contract.ACTIVATIONS written once."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F

from gptneo_onnx.contract import ACTIVATIONS

SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)


def gelu_erf(x: torch.Tensor) -> torch.Tensor:
    return 0.5 * x * (1.0 + torch.erf(x / math.sqrt(2.0)))


def gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    return 0.5 * x * (1.0 + torch.tanh(SQRT_2_OVER_PI * (x + 0.044715 * torch.pow(x, 3.0))))


def laplace(x: torch.Tensor, mu: float = 0.707107, sigma: float = 0.282095) -> torch.Tensor:
    return 0.5 * (1.0 + torch.erf((x - mu) / (sigma * math.sqrt(2.0))))


FORMULAS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "gelu_erf": gelu_erf,
    "gelu_erf_clipped_10": lambda x: torch.clamp(gelu_erf(x), -10.0, 10.0),
    "gelu_tanh": gelu_tanh,
    "laplace": laplace,
    "leaky_relu": lambda x: F.leaky_relu(x, 0.01),
    "identity": lambda x: x,
    "mish": lambda x: x * torch.tanh(F.softplus(x)),
    "quick_gelu": lambda x: x * torch.sigmoid(1.702 * x),
    "relu": F.relu,
    "relu_squared": lambda x: torch.square(F.relu(x)),
    "relu6": lambda x: torch.clamp(x, 0.0, 6.0),
    "sigmoid": torch.sigmoid,
    "silu": F.silu,
    "tanh": torch.tanh,
}
ACTIVATION_FUNCTIONS = {name: FORMULAS[formula] for name, formula in ACTIVATIONS.items()}
