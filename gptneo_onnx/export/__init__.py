"""The exporter: reference GPT-Neo to validated ONNX graphs (needs the `export` extra)."""

from gptneo_onnx.export.api import ExportResult, export
from gptneo_onnx.export.plan import ExportPlan, plan_export
from gptneo_onnx.export.validate import ParityError

__all__ = ["ExportPlan", "ExportResult", "ParityError", "export", "plan_export"]
