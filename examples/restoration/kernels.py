"""Blur kernels: synthetic Gaussian / motion kernels, the USRNet set for training, Levin's for testing.

Train/test split (so that no test kernel leaks into training):

* Training: ``kernels_12.mat`` (Zhang et al., USRNet, CVPR 2020: 8 Gaussian and 4 motion kernels)
  *without* its entries 8 and 9 (0-based), which are Levin's k8 and k7, plus synthetic kernels.
* Testing, motion: Levin's 8 camera-shake kernels (Levin, Weiss, Durand, Freeman, CVPR 2009) from
  ``levin09_kernels.npz``. Testing, Gaussian: :data:`GAUSSIAN_TEST`, four fixed anisotropic
  Gaussians that are not in ``kernels_12.mat``.

All kernels are float32, non-negative and sum to 1, in MATLAB orientation (the array is the PSF;
:func:`examples.restoration.degrade.circular_blur` convolves, it does not correlate).
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

__all__ = [
    "GAUSSIAN_TEST",
    "LEVIN_IN_KERNELS12",
    "gaussian_kernel",
    "kernel_pool",
    "load_kernel",
    "load_kernels12",
    "load_levin",
    "random_gaussian_kernel",
    "random_motion_kernel",
]

LEVIN_IN_KERNELS12 = (8, 9)
"""0-based entries of ``kernels_12.mat`` that are Levin's k8 and k7 (checked by a test)."""

GAUSSIAN_TEST = ((1.0, 1.0, 0.0), (2.4, 2.4, 0.0), (1.2, 2.8, 30.0), (1.8, 2.2, 110.0))
"""Gaussian test kernels as ``(sigma_1, sigma_2, angle in degrees)``, size 25x25."""


def _normalised(k: np.ndarray, what: str) -> Tensor:
    k = np.asarray(k, dtype=np.float64)
    if k.ndim == 2 and k.size and not np.isfinite(k).all():
        raise ValueError(f"{what}: a kernel must hold finite numbers; it has {int((~np.isfinite(k)).sum())} "
                         "NaN/Inf entries. Fix or replace the kernel file.")
    if k.ndim != 2 or k.size == 0 or k.min() < 0 or k.sum() <= 0:
        raise ValueError(f"{what}: a kernel must be a 2-D non-negative array with a positive sum, "
                         f"got shape {k.shape}, min {k.min():.3g}, sum {k.sum():.3g}.")
    return torch.from_numpy(k / k.sum()).float()


def gaussian_kernel(sigma1: float, sigma2: float, angle: float = 0.0, size: int = 25) -> Tensor:
    """Anisotropic Gaussian PSF with standard deviations ``sigma1, sigma2`` (pixels), the first
    axis rotated by ``angle`` degrees, sampled on an odd ``size x size`` grid centred on the
    middle pixel."""
    if size % 2 == 0 or size < 3 or min(sigma1, sigma2) <= 0:
        raise ValueError(f"gaussian_kernel needs an odd size >= 3 and positive sigmas, got size={size}, "
                         f"sigmas=({sigma1}, {sigma2}).")
    t = math.radians(angle)
    rot = np.array([[math.cos(t), -math.sin(t)], [math.sin(t), math.cos(t)]])
    cov = rot @ np.diag([sigma1**2, sigma2**2]) @ rot.T
    r = np.arange(size) - size // 2
    pts = np.stack(np.meshgrid(r, r, indexing="xy"), -1).astype(np.float64)  # (..., [x, y])
    q = np.einsum("...i,ij,...j->...", pts, np.linalg.inv(cov), pts)
    return _normalised(np.exp(-0.5 * q), "gaussian_kernel")


def random_gaussian_kernel(rng: np.random.Generator, size: int = 25) -> Tensor:
    """A Gaussian with sigmas uniform in [0.6, 3.2] and a uniform random angle."""
    s1, s2 = rng.uniform(0.6, 3.2, size=2)
    return gaussian_kernel(float(s1), float(s2), float(rng.uniform(0.0, 180.0)), size)


def random_motion_kernel(rng: np.random.Generator, size: int = 25) -> Tensor:
    """A camera-shake-like PSF: a random trajectory with inertia, splatted bilinearly.

    The path (64 points, velocity perturbed by Gaussian steps) is centred on its mean and scaled
    so its extent is a random 30..95% of the kernel; each point spreads its unit mass over the
    four nearest pixels.
    """
    n = 64
    vel = np.array([math.cos(a := rng.uniform(0, 2 * math.pi)), math.sin(a)])
    pts = np.zeros((n, 2))
    for i in range(1, n):
        vel = vel + rng.normal(0.0, rng.uniform(0.2, 0.7), size=2)
        vel /= max(np.linalg.norm(vel), 1e-8)
        pts[i] = pts[i - 1] + vel
    pts -= pts.mean(0)
    extent = np.abs(pts).max()
    pts *= (size // 2 - 1) * rng.uniform(0.3, 0.95) / max(extent, 1e-8)
    pts += size // 2
    k = np.zeros((size, size))
    x0, y0 = np.floor(pts[:, 0]).astype(int), np.floor(pts[:, 1]).astype(int)
    fx, fy = pts[:, 0] - x0, pts[:, 1] - y0
    for dx, dy, w in ((0, 0, (1 - fx) * (1 - fy)), (1, 0, fx * (1 - fy)), (0, 1, (1 - fx) * fy),
                      (1, 1, fx * fy)):
        np.add.at(k, (y0 + dy, x0 + dx), w)
    return _normalised(k, "random_motion_kernel")


def load_kernels12(path: str | os.PathLike[str], *, drop_levin: bool = True) -> dict[str, list[Tensor]]:
    """The USRNet ``kernels_12.mat`` as ``{"gaussian": [8 kernels], "motion": [...]}``.

    Args:
        path: The ``.mat`` file (``scipy.io.loadmat(path)["kernels"][0]``).
        drop_levin: Leave out entries 8 and 9, which are Levin test kernels (keep this on for
            training; the motion list then has 2 kernels).
    """
    import scipy.io

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"kernel file {str(path)!r} does not exist (it is in "
                                "../shared/data/deblur/kernels/).")
    raw = scipy.io.loadmat(str(path))["kernels"][0]
    if len(raw) != 12:
        raise ValueError(f"{path}: expected 12 kernels, found {len(raw)}.")
    skip = set(LEVIN_IN_KERNELS12) if drop_levin else set()
    motion = [_normalised(raw[i], f"{path}[{i}]") for i in range(8, 12) if i not in skip]
    return {"gaussian": [_normalised(raw[i], f"{path}[{i}]") for i in range(8)], "motion": motion}


def load_kernel(path: str | os.PathLike[str]) -> Tensor:
    """One PSF from a ``.npy`` array or a grayscale image (PNG etc.), normalised to sum 1.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: not a 2-D non-negative array with a positive sum, or larger than 64x64.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"kernel file {str(path)!r} does not exist.")
    if path.suffix.lower() == ".npy":
        k = np.load(path, allow_pickle=False)
    else:
        from PIL import Image

        with Image.open(path) as im:
            k = np.asarray(im.convert("F"))
    if k.ndim != 2 or max(k.shape) > 64:
        raise ValueError(f"{path}: a blur kernel must be a 2-D array of at most 64x64, got shape {k.shape}.")
    return _normalised(k, str(path))


def load_levin(path: str | os.PathLike[str]) -> list[Tensor]:
    """Levin's 8 kernels ``k1 .. k8`` from ``levin09_kernels.npz`` (for testing only)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"kernel file {str(path)!r} does not exist (it is in "
                                "../shared/data/deblur/kernels/).")
    with np.load(path) as data:
        return [_normalised(data[f"k{i}"], f"{path}:k{i}") for i in range(1, 9)]


def kernel_pool(kind: str, n_synthetic: int, seed: int, kernels12: str | os.PathLike[str] | None = None,
                size: int = 25) -> Tensor:
    """Training kernels of one ``kind`` (``"gaussian"`` or ``"motion"``) as a ``(K, size, size)``
    tensor: the ``kernels_12.mat`` ones of that kind (without Levin's) when ``kernels12`` is given,
    followed by ``n_synthetic`` random ones drawn with ``seed``."""
    makers = {"gaussian": random_gaussian_kernel, "motion": random_motion_kernel}
    if kind not in makers:
        raise ValueError(f"kernel kind {kind!r} is not one of {sorted(makers)}.")
    rng = np.random.default_rng(seed)
    pool = load_kernels12(kernels12)[kind] if kernels12 is not None else []
    pool = [k for k in pool if k.shape == (size, size)]
    pool += [makers[kind](rng, size) for _ in range(n_synthetic)]
    if not pool:
        raise ValueError("kernel_pool(): no kernels; pass n_synthetic > 0 or a kernels_12.mat path.")
    return torch.stack(pool)
