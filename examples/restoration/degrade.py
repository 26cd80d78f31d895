"""Degradations made on the fly: Gaussian noise, circular blur + noise, and the task registry.

Conventions (those of the denoising/deblurring literature):

* Images are float in [0, 1]; a noise level ``sigma`` is given on the [0, 255] scale, so the
  noise added is ``sigma / 255 * N(0, 1)``. Nothing is clipped or quantised afterwards.
* Blur is a *circular* convolution (periodic boundary, computed with FFTs) with the PSF centred on
  its middle pixel ``(kh // 2, kw // 2)``, followed by Gaussian noise of sigma 2.55.
* Non-blind tasks (``Task.wiener``) then invert the blur with the *known* kernel by a regularised
  (Wiener/Tikhonov, gradient prior) deconvolution, :func:`wiener_deconv`; the network removes the
  ringing and amplified noise that remain, as in two-stage non-blind deblurring.
* Test sets use one generator per image (and kernel), seeded from their names with
  :func:`seeded_generator`, so every run sees the same noise.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = [
    "BLUR_NOISE_SIGMA",
    "TASKS",
    "Task",
    "add_noise",
    "circular_blur",
    "degrade",
    "get_task",
    "kernel_otf",
    "seeded_generator",
    "wiener_deconv",
]

BLUR_NOISE_SIGMA = 2.55
"""Noise added after blurring, on the [0, 255] scale (1% of the range)."""


@dataclass(frozen=True)
class Task:
    """One restoration task.

    Attributes:
        name: Short identifier (also the adapter name).
        kind: ``"noise"`` (Gaussian noise only) or ``"blur"`` (blur, then noise).
        sigma: Noise standard deviation on the [0, 255] scale.
        kernels: For blur tasks, the kernel family: ``"gaussian"`` or ``"motion"``.
        wiener: For non-blind blur tasks, the regularisation weight of :func:`wiener_deconv`
            applied with the true kernel after blurring; ``None`` (blind): the network gets the
            blurred image.
    """

    name: str
    kind: str
    sigma: float
    kernels: str | None = None
    wiener: float | None = None


TASKS: dict[str, Task] = {t.name: t for t in (
    Task("noise15", "noise", 15.0),
    Task("noise25", "noise", 25.0),
    Task("noise50", "noise", 50.0),
    Task("deblur_motion", "blur", BLUR_NOISE_SIGMA, "motion"),
    Task("deblur_gauss", "blur", BLUR_NOISE_SIGMA, "gaussian"),
    # lambda = 0.01: the best of {0.003, 0.01, 0.03, 0.1} for the network's input (training crops)
    Task("deblur_motion_nonblind", "blur", BLUR_NOISE_SIGMA, "motion", wiener=0.01),
)}


def get_task(name: str) -> Task:
    """The task called ``name``; raises ``ValueError`` listing the known ones."""
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; known tasks: {sorted(TASKS)}.")
    return TASKS[name]


def seeded_generator(*key: object) -> torch.Generator:
    """A CPU generator seeded from ``key`` (e.g. ``(seed, image_name, kernel_index)``) with CRC-32,
    which, unlike ``hash()``, is the same in every process."""
    text = "|".join(str(k) for k in key).encode()
    return torch.Generator().manual_seed(zlib.crc32(text))


def add_noise(x: Tensor, sigma: float, generator: torch.Generator | None = None) -> Tensor:
    """``x + sigma / 255 * N(0, 1)`` with the noise drawn on the CPU (reproducible on any device)."""
    if sigma < 0:
        raise ValueError(f"noise sigma must be >= 0 (on the [0, 255] scale), got {sigma}.")
    noise = torch.randn(x.shape, generator=generator, dtype=torch.float32)
    return x + noise.to(device=x.device, dtype=x.dtype) * (sigma / 255.0)


def kernel_otf(kernel: Tensor, height: int, width: int) -> Tensor:
    """Real FFT of the PSF zero-padded to ``height x width`` with its centre moved to ``(0, 0)``
    (MATLAB's ``psf2otf``). ``kernel`` is ``(kh, kw)`` or ``(N, kh, kw)``."""
    kh, kw = kernel.shape[-2:]
    if kh > height or kw > width:
        raise ValueError(f"kernel of {kh}x{kw} is larger than the {height}x{width} image; crop less.")
    pad = kernel.new_zeros((*kernel.shape[:-2], height, width))
    pad[..., :kh, :kw] = kernel
    pad = torch.roll(pad, shifts=(-(kh // 2), -(kw // 2)), dims=(-2, -1))
    return torch.fft.rfft2(pad)


def circular_blur(x: Tensor, kernel: Tensor) -> Tensor:
    """Circular convolution of every channel of ``x`` with ``kernel``.

    Args:
        x: ``(C, H, W)`` or ``(N, C, H, W)`` images.
        kernel: One PSF ``(kh, kw)`` for all images, or ``(N, kh, kw)``, one per image of the batch.

    Returns:
        ``y[c, i, j] = sum_{u, v} k[u, v] x[c, (i - u + kh // 2) mod H, (j - v + kw // 2) mod W]``.
    """
    h, w = x.shape[-2:]
    otf = _otf_batch(kernel, x)
    y = torch.fft.irfft2(torch.fft.rfft2(x.float()) * otf, s=(h, w))
    return y.to(x.dtype)


def _otf_batch(kernel: Tensor, x: Tensor) -> Tensor:
    """OTF of ``kernel`` for the images ``x``, broadcastable over their channels."""
    if kernel.dim() == 3 and (x.dim() != 4 or kernel.shape[0] != x.shape[0]):
        raise ValueError(f"{kernel.shape[0]} kernels for images of shape {tuple(x.shape)}; pass one "
                         "kernel (kh, kw) or one per image (N, kh, kw) with a (N, C, H, W) batch.")
    if kernel.dim() not in (2, 3) or x.dim() not in (3, 4):
        raise ValueError(f"blur kernels are (kh, kw) or (N, kh, kw) and images (C, H, W) or "
                         f"(N, C, H, W), got {tuple(kernel.shape)} and {tuple(x.shape)}.")
    otf = kernel_otf(kernel.to(device=x.device, dtype=torch.float32), *x.shape[-2:])
    return otf[:, None] if kernel.dim() == 3 else otf  # one kernel per image, shared by its channels


def wiener_deconv(y: Tensor, kernel: Tensor, lam: float) -> Tensor:
    """Regularised inverse of :func:`circular_blur` with a known kernel (gradient prior).

    ``x = F^-1[ conj(K) Y / (|K|^2 + lam (|D_h|^2 + |D_v|^2)) ]`` with ``K`` the kernel's OTF and
    ``D_h``, ``D_v`` those of horizontal and vertical finite differences. The prior leaves the
    mean (DC) untouched, unlike a constant ``lam``.

    Args:
        y: Blurred images ``(C, H, W)`` or ``(N, C, H, W)``.
        kernel: ``(kh, kw)`` or ``(N, kh, kw)``, as for :func:`circular_blur`.
        lam: Regularisation weight (> 0); larger is smoother.
    """
    if not lam > 0:
        raise ValueError(f"wiener_deconv needs lam > 0, got {lam}.")
    h, w = y.shape[-2:]
    otf = _otf_batch(kernel, y)
    diff = y.new_zeros((2, 3, 3), dtype=torch.float32)
    diff[0, 1, 1], diff[0, 1, 2], diff[1, 1, 1], diff[1, 2, 1] = 1.0, -1.0, 1.0, -1.0
    prior = kernel_otf(diff, h, w).abs().square().sum(0)
    x = torch.fft.irfft2(torch.fft.rfft2(y.float()) * otf.conj() / (otf.abs().square() + lam * prior),
                         s=(h, w))
    return x.to(y.dtype)


def degrade(x: Tensor, task: Task, generator: torch.Generator | None = None,
            kernel: Tensor | None = None) -> Tensor:
    """Apply ``task`` to clean images ``x`` in [0, 1] (blur tasks need ``kernel``)."""
    if task.kind == "blur":
        if kernel is None:
            raise ValueError(f"task {task.name!r} blurs; pass kernel= (see kernels.kernel_pool).")
        x = circular_blur(x, kernel)
    elif task.kind != "noise":
        raise ValueError(f"task {task.name!r} has kind {task.kind!r}; expected 'noise' or 'blur'.")
    y = add_noise(x, task.sigma, generator)
    if task.wiener is not None:
        if kernel is None:
            raise ValueError(f"task {task.name!r} is non-blind; pass the kernel it was blurred with.")
        y = wiener_deconv(y, kernel, task.wiener)
    return y
