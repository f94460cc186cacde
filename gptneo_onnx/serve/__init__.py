"""Serving on the public runtime API: the continuous-batching engine (and, on top, the HTTP layer).

Nothing outside this package imports it.
"""

from gptneo_onnx.serve.engine import (
    Draining,
    Engine,
    EngineLimits,
    EngineRequest,
    EngineStats,
    FinishEvent,
    QueueFull,
    RequestHandle,
    RequestTooLarge,
    TokenEvent,
)

__all__ = [
    "Draining",
    "Engine",
    "EngineLimits",
    "EngineRequest",
    "EngineStats",
    "FinishEvent",
    "QueueFull",
    "RequestHandle",
    "RequestTooLarge",
    "TokenEvent",
]
