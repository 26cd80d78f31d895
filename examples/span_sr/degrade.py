"""MATLAB-exact bicubic resizing, the degradation of the classic SR benchmarks.

MATLAB's ``imresize(img, 1/s, 'bicubic')`` (antialiasing on) is a separable resampling:

* the cubic kernel (Keys, a = -0.5); when shrinking by ``scale < 1`` the kernel is stretched,
  ``h(x) = scale * cubic(scale * x)``, and its support widens from 4 to ``4 / scale`` taps
  (antialiasing);
* output sample ``u`` (1-based) sits at input coordinate ``u / scale + 0.5 * (1 - 1 / scale)``;
* weights are normalised to sum to one; out-of-range taps are mirrored (symmetric padding,
  the edge pixel repeated);
* the dimension with the smaller scale goes first (height first when equal); for ``uint8``
  input each pass rounds half away from zero and clips to [0, 255].

:func:`imresize_matlab` does exactly that on ``uint8`` HxWxC arrays (float64 arithmetic);
:func:`imresize_torch` applies the same weights as dense matrices to float tensors, without
rounding, so it is differentiable and runs on any device (on-the-fly training pairs).
"""

from __future__ import annotations

import math
from functools import lru_cache

import numpy as np
import torch

__all__ = ["imresize_matlab", "imresize_torch", "modcrop", "resize_weights"]


def _cubic(x: np.ndarray) -> np.ndarray:
    ax = np.abs(x)
    ax2, ax3 = ax**2, ax**3
    return (1.5 * ax3 - 2.5 * ax2 + 1.0) * (ax <= 1) + (
        -0.5 * ax3 + 2.5 * ax2 - 4.0 * ax + 2.0
    ) * ((ax > 1) & (ax <= 2))


def _out_len(in_len: int, scale: float) -> int:
    return math.ceil(in_len * scale)


@lru_cache(maxsize=64)
def resize_weights(in_len: int, out_len: int, scale: float) -> np.ndarray:
    """Dense ``(out_len, in_len)`` float64 matrix of MATLAB's bicubic resampling along one axis.

    Row ``u`` holds the normalised kernel weights of output sample ``u``; mirrored taps are
    accumulated onto their in-range source pixel. The result is read-only (it is cached).
    """
    if in_len < 1 or out_len < 1 or scale <= 0:
        raise ValueError(f"bad resize: in_len={in_len}, out_len={out_len}, scale={scale}.")
    width = 4.0 / scale if scale < 1 else 4.0
    u = np.arange(1, out_len + 1, dtype=np.float64)
    x = u / scale + 0.5 * (1.0 - 1.0 / scale)
    left = np.floor(x - width / 2.0)
    taps = int(math.ceil(width)) + 2
    idx = left[:, None] + np.arange(taps)[None, :]  # 1-based source indices
    dist = x[:, None] - idx
    w = scale * _cubic(scale * dist) if scale < 1 else _cubic(dist)
    w = w / w.sum(axis=1, keepdims=True)
    # symmetric (mirror) padding of 1-based index i: 1..n, n..1, 1..n, ...
    period = np.concatenate([np.arange(in_len), np.arange(in_len - 1, -1, -1)])
    src = period[np.mod(idx.astype(np.int64) - 1, 2 * in_len)]
    mat = np.zeros((out_len, in_len), dtype=np.float64)
    np.add.at(mat, (np.repeat(np.arange(out_len), taps), src.ravel()), w.ravel())
    mat.setflags(write=False)
    return mat


def _check_scale(scale: float) -> float:
    if not isinstance(scale, (int, float)) or scale <= 0:
        raise ValueError(f"scale={scale!r} must be a positive number (e.g. 0.25 to shrink by 4).")
    return float(scale)


def _round_uint8(x: np.ndarray) -> np.ndarray:
    # MATLAB rounds half away from zero; values are >= 0 after clipping.
    return np.floor(np.clip(x, 0.0, 255.0) + 0.5).astype(np.uint8)


def imresize_matlab(img: np.ndarray, scale: float) -> np.ndarray:
    """Resize a ``uint8`` HxW or HxWxC image exactly like MATLAB ``imresize(img, scale, 'bicubic')``.

    Args:
        img: ``uint8`` array, HxW or HxWxC.
        scale: Resize factor (``0.25`` for x4 downscaling); output size is ``ceil(size * scale)``.

    Returns:
        ``uint8`` array with the same number of dimensions.
    """
    scale = _check_scale(scale)
    if not isinstance(img, np.ndarray) or img.dtype != np.uint8 or img.ndim not in (2, 3):
        desc = f"{getattr(img, 'dtype', type(img).__name__)} {getattr(img, 'shape', '')}"
        raise ValueError(f"imresize_matlab needs a uint8 HxW or HxWxC array, got {desc}.")
    x = img.astype(np.float64)
    squeeze = x.ndim == 2
    if squeeze:
        x = x[:, :, None]
    h, w = x.shape[:2]
    w_h = resize_weights(h, _out_len(h, scale), scale)
    x = _round_uint8(np.tensordot(w_h, x, axes=(1, 0))).astype(np.float64)  # (oh, w, c)
    w_w = resize_weights(w, _out_len(w, scale), scale)
    out = _round_uint8(np.tensordot(x, w_w, axes=(1, 1)).transpose(0, 2, 1))  # (oh, ow, c)
    return out[:, :, 0] if squeeze else out


def imresize_torch(x: torch.Tensor, scale: float) -> torch.Tensor:
    """Differentiable MATLAB-bicubic resize of a float ``(N, C, H, W)`` (or ``(C, H, W)``) tensor.

    Same weights as :func:`imresize_matlab`, but no rounding between passes or at the end, so
    on ``uint8``-valued input it differs from the MATLAB result by at most the rounding.
    """
    scale = _check_scale(scale)
    if not torch.is_floating_point(x) or x.dim() not in (3, 4):
        raise ValueError(
            f"imresize_torch needs a float (N, C, H, W) or (C, H, W) tensor, got {x.dtype} "
            f"{tuple(x.shape)}; convert with x.float() / 255."
        )
    h, w = x.shape[-2:]
    w_h = torch.from_numpy(np.array(resize_weights(h, _out_len(h, scale), scale)))
    w_w = torch.from_numpy(np.array(resize_weights(w, _out_len(w, scale), scale)))
    w_h = w_h.to(x.device, x.dtype)
    w_w = w_w.to(x.device, x.dtype)
    return w_h @ x @ w_w.T


def modcrop(img: np.ndarray, scale: int) -> np.ndarray:
    """Crop the bottom/right edges of an HxW[xC] image so both sides are multiples of ``scale``."""
    if scale < 1:
        raise ValueError(f"modcrop scale={scale} must be a positive integer.")
    h, w = img.shape[:2]
    return img[: h - h % scale, : w - w % scale]
