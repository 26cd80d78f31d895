"""Helpers shared by the SPAN fast-path tests (not a test module)."""

from __future__ import annotations

import torch

from examples.span_sr.arch import SPAN


def small_span(width: int = 8, cat: int | None = None, scale: int = 4, seed: int = 0) -> SPAN:
    """A seeded deploy-form SPAN in eval mode whose outputs stay about 1 on inputs in [0, 1]."""
    torch.manual_seed(seed)
    m = SPAN(feature_channels=width, conv_cat_channels=cat, upscale=scale).eval()
    with torch.no_grad():  # default init on a 0..255 input gives outputs ~1e3; keep them ~1
        for p in m.parameters():
            p.mul_(0.4)
    return m
