"""Fingerprints of base weights, so an adapter is never applied to the wrong base.

``fingerprint`` is a SHA-256 over the layer names, shapes and values of the targeted base
weights, the values taken in float32 on the CPU after rounding to bfloat16 -- so an fp32, bf16 or
fp16 copy of the same base shares it (fp16's double rounding can rarely break that tie; the
``sketch`` comparison below catches those cases). ``sketch`` stores a few seeded random
projections per layer; two bases whose sketches agree within a small tolerance of the weight
norm are the same base up to low-precision rounding.
"""

from __future__ import annotations

import hashlib

import torch
from torch import Tensor

__all__ = ["base_mismatch", "fingerprint", "sketch", "sketches_match"]

_PROJECTIONS = 4
_TOLERANCE = 6e-3  # of the weight norm; bf16 rounding moves a projection by ~1.1e-3 of it (RMS)


def _values(w: Tensor) -> Tensor:
    return w.detach().to("cpu", torch.float32).contiguous()


def fingerprint(weights: dict[str, Tensor]) -> str:
    """SHA-256 hex digest over ``{layer: base weight}`` (order independent)."""
    h = hashlib.sha256()
    for name in sorted(weights):
        w = _values(weights[name]).to(torch.bfloat16).to(torch.float32)
        h.update(name.encode())
        h.update(str(tuple(w.shape)).encode())
        h.update(w.numpy().tobytes())
    return h.hexdigest()


def sketch(weights: dict[str, Tensor]) -> dict[str, list[float]]:
    """Per layer: ``[norm, p_1..p_k]`` with seeded Gaussian projections of the flattened weight."""
    out: dict[str, list[float]] = {}
    for name, w in weights.items():
        v = _values(w).flatten().double()
        gen = torch.Generator().manual_seed(len(v))
        proj = torch.randn(_PROJECTIONS, len(v), generator=gen, dtype=torch.float64)
        out[name] = [float(v.norm())] + [float(x) for x in proj @ v]
    return out


def sketches_match(a: dict[str, list[float]], b: dict[str, list[float]]) -> bool:
    """True when both sketches cover the same layers and agree within the tolerance."""
    if set(a) != set(b):
        return False
    for name in a:
        norm = max(a[name][0], 1e-12)
        if any(abs(x - y) > _TOLERANCE * norm for x, y in zip(a[name], b[name])):
            return False
    return True


def base_mismatch(weights: dict[str, Tensor], recorded_fingerprint: str,
                  recorded_sketch: dict[str, list[float]]) -> str | None:
    """Compare base weights with the fingerprint and sketch an adapter file recorded.

    Returns:
        ``None`` when they are the same base (equal fingerprints, or sketches that agree up to
        low-precision rounding); otherwise a short description of the mismatch for a message.
    """
    actual = fingerprint(weights)
    if actual == recorded_fingerprint or sketches_match(sketch(weights), recorded_sketch):
        return None
    return f"fingerprint mismatch: {actual[:16]} here, {str(recorded_fingerprint)[:16]} recorded"
