"""What a user passed: whether it is a plain finite number, and how an error message shows it."""

from __future__ import annotations

import math
from typing import TypeGuard

__all__ = ["is_number", "short_repr"]


def is_number(value: object) -> TypeGuard[int | float]:
    """Whether ``value`` is a finite ``int`` or ``float`` (``bool`` is not a number here)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def short_repr(value: object, limit: int = 120) -> str:
    """``repr(value)`` for an error message: at most ``limit`` characters, ending ``...`` when cut."""
    text = repr(value)
    return text if len(text) <= limit else text[:limit - 3] + "..."
