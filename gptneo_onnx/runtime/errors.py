"""The runtime's exceptions: each names what was wrong, the limit, and what to do."""

from __future__ import annotations


class RuntimeModelError(Exception):
    """Base class for every error the thin runtime raises on purpose."""


class ExportFolderError(RuntimeModelError):
    """The export folder is missing, incomplete, tampered with, or not what was asked for."""


class ProviderError(RuntimeModelError):
    """An execution provider that is unknown, unavailable, or not the one that actually runs."""


class InputError(RuntimeModelError, ValueError):
    """Bad user input: empty prompt, token id outside the vocabulary, sequence too long, ..."""


class GenerationConfigError(RuntimeModelError, ValueError):
    """Invalid decoding parameters (temperature, top_p, top_k, num_beams, ...)."""


class NumericalError(RuntimeModelError):
    """The graph produced NaN or Inf values."""


class UnvalidatedExportWarning(UserWarning):
    """The export was made without validation (`--no-validate`): nothing compared it with PyTorch."""
