"""Typed exceptions with actionable messages.

Every error convlora raises on bad input derives from [`ConvLoRAError`][convlora.errors.ConvLoRAError], which is also a
``ValueError`` so that generic ``except ValueError`` handlers keep working.
"""

from __future__ import annotations

__all__ = [
    "AdapterFormatError",
    "AdapterMismatchError",
    "ConvLoRAError",
    "FingerprintMismatchError",
    "MergeStateError",
    "StateDictError",
    "TargetError",
    "UnsupportedLayerError",
]


class ConvLoRAError(ValueError):
    """Base class of every error raised by convlora on bad input or bad state."""


class TargetError(ConvLoRAError):
    """A target/exclude pattern, predicate or selector matched nothing or something invalid."""


class UnsupportedLayerError(ConvLoRAError):
    """A selected layer cannot carry an exact adapter (the message names the layer and the reason)."""


class AdapterMismatchError(ConvLoRAError):
    """An adapter does not fit a model: missing or unexpected layers, wrong shapes or settings."""


class AdapterFormatError(ConvLoRAError):
    """A file is not a convlora adapter: not safetensors, truncated, or of another format version."""


class StateDictError(ConvLoRAError):
    """A file is not a readable state dict: unknown suffix, unreadable, or no dict of tensors."""


class FingerprintMismatchError(AdapterMismatchError):
    """The adapter was trained on different base weights than the model it is loaded into."""


class MergeStateError(ConvLoRAError):
    """An operation conflicts with the merge state (merging twice, switching while merged, ...)."""
