"""Fingerprints of base weights, so an adapter is never applied to the wrong base.

Two records of the targeted base weights go into an adapter file:

* ``fingerprint``: a SHA-256 over the layer names, shapes and values, the values rounded to
  bfloat16 first -- so an fp32 original and its bf16 copy share it.
* ``sketch``: per layer the weight's norm and a few seeded Gaussian random projections of it.

Two bases are the same when their fingerprints are equal, or when every projection agrees
within the rounding of the *coarser* of the two precisions involved (the weight's dtype when
the file was saved, recorded per layer as ``base_dtype``, and the weight's dtype now): the
tolerance is ``TOLERANCE_ULPS`` times the norm of that precision's rounding step (its ulp) over
the weight. So an fp16 or bf16 copy of the base is accepted, and between two float32 bases any
change larger than a few float32 roundings is caught (measured in ``benchmarks/fingerprint_threshold.py``:
a relative change of about 1e-6 of the weight norm between fp32 bases). Files without a
recorded ``base_dtype`` (written before it existed) keep the old fixed tolerance of
``LEGACY_TOLERANCE`` times the weight norm.

A random change ``delta`` moves each projection by a normal variable of standard deviation
``|delta|``, so it is detected when ``|delta|`` exceeds the tolerance by a small factor; a
change chosen to be orthogonal to the seeded projections would not be seen. The fingerprint is
a guard against mistakes (the wrong checkpoint, the EMA instead of the raw weights), not a
cryptographic guarantee against a crafted base.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Mapping

import torch
from torch import Tensor

__all__ = ["LEGACY_TOLERANCE", "TOLERANCE_ULPS", "base_mismatch", "dtype_name", "fingerprint",
           "sketch", "sketch_tolerance", "sketches_match"]

_PROJECTIONS = 4
LEGACY_TOLERANCE = 6e-3
"""Tolerance (of the weight norm) for files without ``base_dtype``: bf16 rounding moves a
projection by ~1.1e-3 of the norm (RMS)."""
TOLERANCE_ULPS = 2.0
"""Projection tolerance in norms of the coarser precision's ulp over the weight: rounding to it
moves a projection by ~0.29 of that norm (RMS), two roundings by ~0.41."""

_DTYPES = {"float64": torch.float64, "float32": torch.float32, "float16": torch.float16,
           "bfloat16": torch.bfloat16}


def dtype_name(dtype: torch.dtype) -> str:
    """``torch.float32`` -> ``"float32"`` (the names ``base_dtype`` records)."""
    return str(dtype).removeprefix("torch.")


def _values(w: Tensor) -> Tensor:
    return w.detach().to("cpu", torch.float32).contiguous()


def fingerprint(weights: Mapping[str, Tensor]) -> str:
    """SHA-256 hex digest over ``{layer: base weight}`` (order independent)."""
    h = hashlib.sha256()
    for name in sorted(weights):
        w = _values(weights[name]).to(torch.bfloat16).to(torch.float32)
        h.update(name.encode())
        h.update(str(tuple(w.shape)).encode())
        h.update(w.numpy().tobytes())
    return h.hexdigest()


def sketch(weights: Mapping[str, Tensor]) -> dict[str, list[float]]:
    """Per layer: ``[norm, p_1..p_k]`` with seeded Gaussian projections of the flattened weight."""
    out: dict[str, list[float]] = {}
    for name, w in weights.items():
        v = _values(w).flatten().double()
        gen = torch.Generator().manual_seed(len(v))
        proj = torch.randn(_PROJECTIONS, len(v), generator=gen, dtype=torch.float64)
        out[name] = [float(v.norm())] + [float(x) for x in proj @ v]
    return out


def _coarser(a: torch.dtype, b: torch.dtype) -> torch.dtype:
    return a if torch.finfo(a).eps >= torch.finfo(b).eps else b


def sketch_tolerance(weight: Tensor, recorded_dtype: str | None) -> float:
    """How far a projection of ``weight`` may move between two copies of the same base.

    Args:
        weight: The base weight as it is now.
        recorded_dtype: The weight's dtype when the adapter was saved (``None``: not recorded).

    Returns:
        ``TOLERANCE_ULPS`` times the norm of the coarser precision's ulp over the weight (float32
        at the finest, as the sketch is computed from float32 values); for an unrecorded dtype,
        ``LEGACY_TOLERANCE`` times the weight norm.
    """
    v = _values(weight).flatten()
    if recorded_dtype is None:
        return LEGACY_TOLERANCE * float(v.double().norm())
    now = weight.dtype if weight.dtype in _DTYPES.values() else torch.float32
    coarse = _coarser(_coarser(_DTYPES[recorded_dtype], now), torch.float32)
    q = v.to(coarse)
    ulp = (torch.nextafter(q, torch.full_like(q, math.inf)) - q).double()
    ulp = torch.where(torch.isfinite(ulp), ulp, torch.zeros_like(ulp))
    return TOLERANCE_ULPS * float(ulp.norm())


def sketches_match(a: Mapping[str, list[float]], b: Mapping[str, list[float]],
                   tolerance: Mapping[str, float] | None = None) -> bool:
    """True when both sketches cover the same layers and agree within the tolerance.

    Args:
        a: A sketch.
        b: Another sketch.
        tolerance: Per layer, the largest allowed difference of each entry; default
            ``LEGACY_TOLERANCE`` times ``a``'s norm.
    """
    if set(a) != set(b):
        return False
    for name in a:
        if len(a[name]) != len(b[name]):
            return False
        tol = tolerance[name] if tolerance is not None else LEGACY_TOLERANCE * max(a[name][0], 1e-12)
        if not all(abs(x - y) <= tol for x, y in zip(a[name], b[name])):  # NaN never matches
            return False
    return True


def base_mismatch(weights: Mapping[str, Tensor], recorded_fingerprint: str,
                  recorded_sketch: Mapping[str, list[float]],
                  recorded_dtypes: Mapping[str, str | None] | None = None) -> str | None:
    """Compare base weights with the fingerprint and sketch an adapter file recorded.

    Args:
        weights: ``{layer: base weight}`` as they are now.
        recorded_fingerprint: The file's ``base_fingerprint``.
        recorded_sketch: The file's ``base_sketch``.
        recorded_dtypes: Per layer the recorded ``base_dtype`` (missing or ``None``: not
            recorded, the legacy tolerance applies).

    Returns:
        ``None`` when they are the same base (equal fingerprints, or sketches that agree up to
        the rounding of the coarser precision); otherwise a short description for a message.
    """
    actual = fingerprint(weights)
    if actual == recorded_fingerprint:
        return None
    dtypes = recorded_dtypes or {}
    tolerance = {n: sketch_tolerance(w, dtypes.get(n)) for n, w in weights.items()}
    if sketches_match(sketch(weights), recorded_sketch, tolerance):
        return None
    return f"fingerprint mismatch: {actual[:16]} here, {str(recorded_fingerprint)[:16]} recorded"
