"""Image-quality metrics with the conventions of the SR literature and the NTIRE challenge.

* :func:`psnr_y` / :func:`ssim_y`: on the luma channel (ITU-R BT.601,
  ``Y = 16 + 65.481 R + 128.553 G + 24.966 B`` for RGB in [0, 1], so Y is in [16, 235]),
  computed in float64 from the ``uint8`` RGB (Y is *not* rounded), with ``border`` pixels
  cropped on each side. This is the papers' (and BasicSR's) convention.
* :func:`psnr_rgb`: over the three RGB channels with the same border, the NTIRE ESR convention.

All functions take ``uint8`` HxWx3 (or HxW) arrays; convert a model output with
:func:`to_uint8` (clamp to [0, 1], scale, round) first.
SSIM uses an 11x11 Gaussian window (sigma 1.5) over the valid region, ``K1 = 0.01``,
``K2 = 0.03``, data range 255, i.e. scikit-image's ``structural_similarity(...,
gaussian_weights=True, sigma=1.5, use_sample_covariance=False, data_range=255)``.
"""

from __future__ import annotations

import math

import numpy as np
import torch

__all__ = ["psnr_rgb", "psnr_y", "rgb_to_y", "ssim", "ssim_y", "to_uint8"]

_Y_COEFFS = np.array([65.481, 128.553, 24.966]) / 255.0


def to_uint8(x: torch.Tensor) -> np.ndarray:
    """Convert a ``(3, H, W)`` or ``(1, 3, H, W)`` float tensor in [0, 1] to ``uint8`` HxWx3.

    Values are clamped to [0, 1], scaled by 255 and rounded (half to even, as ``torch.round``).
    """
    if x.dim() == 4:
        if x.shape[0] != 1:
            raise ValueError(f"to_uint8 takes one image, got a batch of shape {tuple(x.shape)}.")
        x = x[0]
    if x.dim() != 3:
        raise ValueError(f"to_uint8 needs a (3, H, W) tensor, got shape {tuple(x.shape)}.")
    y = (x.detach().float().clamp(0, 1) * 255.0).round().to(torch.uint8)
    return y.permute(1, 2, 0).cpu().numpy()


def _check_pair(a: np.ndarray, b: np.ndarray, border: int) -> None:
    for name, arr in (("sr", a), ("hr", b)):
        if not isinstance(arr, np.ndarray) or arr.dtype != np.uint8:
            raise ValueError(
                f"{name} must be a uint8 numpy array, got {getattr(arr, 'dtype', type(arr))}; "
                "round model output with metrics.to_uint8 first."
            )
    if a.shape != b.shape:
        raise ValueError(f"sr shape {a.shape} differs from hr shape {b.shape}; modcrop the HR.")
    if border < 0 or 2 * border >= min(a.shape[:2]):
        raise ValueError(f"border={border} is negative or too large for images of {a.shape[:2]}.")


def rgb_to_y(img: np.ndarray) -> np.ndarray:
    """BT.601 luma in [16, 235] (float64) of a ``uint8`` HxWx3 image; HxW input is returned as float."""
    x = img.astype(np.float64)
    if x.ndim == 2:
        return x
    return x @ _Y_COEFFS + 16.0


def _crop(x: np.ndarray, border: int) -> np.ndarray:
    return x[border : x.shape[0] - border, border : x.shape[1] - border] if border else x


def _psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a - b) ** 2))
    return math.inf if mse == 0 else 10.0 * math.log10(255.0**2 / mse)


def psnr_y(sr: np.ndarray, hr: np.ndarray, border: int = 4) -> float:
    """Y-channel PSNR in dB (``inf`` for identical images)."""
    _check_pair(sr, hr, border)
    return _psnr(_crop(rgb_to_y(sr), border), _crop(rgb_to_y(hr), border))


def psnr_rgb(sr: np.ndarray, hr: np.ndarray, border: int = 4) -> float:
    """PSNR in dB over all RGB channels, ``border`` pixels cropped (NTIRE convention)."""
    _check_pair(sr, hr, border)
    return _psnr(_crop(sr.astype(np.float64), border), _crop(hr.astype(np.float64), border))


def _gaussian_1d(size: int = 11, sigma: float = 1.5) -> np.ndarray:
    r = np.arange(size, dtype=np.float64) - (size - 1) / 2
    g = np.exp(-(r**2) / (2 * sigma**2))
    return g / g.sum()


def _filter_valid(x: np.ndarray, g: np.ndarray) -> np.ndarray:
    """Separable 'valid' correlation of a 2-D array with the 1-D kernel ``g`` on both axes."""
    k = len(g)
    rows = np.lib.stride_tricks.sliding_window_view(x, k, axis=0) @ g
    return np.lib.stride_tricks.sliding_window_view(rows, k, axis=1) @ g


def ssim(a: np.ndarray, b: np.ndarray, data_range: float = 255.0) -> float:
    """Mean SSIM of two float 2-D arrays (Gaussian 11x11, sigma 1.5, valid region)."""
    if a.shape != b.shape or a.ndim != 2 or min(a.shape) < 11:
        raise ValueError(f"ssim needs two equal 2-D arrays of at least 11x11, got {a.shape}, {b.shape}.")
    g = _gaussian_1d()
    a, b = a.astype(np.float64), b.astype(np.float64)
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    mu_a, mu_b = _filter_valid(a, g), _filter_valid(b, g)
    var_a = _filter_valid(a * a, g) - mu_a**2
    var_b = _filter_valid(b * b, g) - mu_b**2
    cov = _filter_valid(a * b, g) - mu_a * mu_b
    num = (2 * mu_a * mu_b + c1) * (2 * cov + c2)
    den = (mu_a**2 + mu_b**2 + c1) * (var_a + var_b + c2)
    return float(np.mean(num / den))


def ssim_y(sr: np.ndarray, hr: np.ndarray, border: int = 4) -> float:
    """Y-channel SSIM with ``border`` pixels cropped."""
    _check_pair(sr, hr, border)
    return ssim(_crop(rgb_to_y(sr), border), _crop(rgb_to_y(hr), border))
