"""Autocast off for the weight math: every method computes ``W'`` in the compute dtype.

Inside an autocast region the layer's convolution still autocasts ``W'``; building ``W'`` itself
(and the custom backward passes of DoRA and LoKr) with autocast off keeps it the same bits as a
merge outside the region.
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch
from torch import Tensor

__all__ = ["no_autocast"]


def no_autocast(t: Tensor) -> Any:
    """A context with autocast off for ``t``'s device (a no-op where autocast does not exist).

    Args:
        t: A tensor on the device whose autocast is turned off.

    Returns:
        A context manager.
    """
    device = t.device.type
    if torch.amp.is_autocast_available(device):
        return torch.autocast(device, enabled=False)
    return contextlib.nullcontext()
