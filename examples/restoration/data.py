"""Clean images for training and testing: packaged sample photos, image folders, random patches.

Images are kept in memory as ``uint8`` ``(3, H, W)`` tensors and turned into float [0, 1] batches
only when sampled. Reading and writing files goes through :mod:`examples.span_sr.images`.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from examples.span_sr.images import SKIMAGE_PHOTOS, list_images, read_image

__all__ = [
    "SAMPLE_TEST",
    "SAMPLE_TRAIN",
    "PatchSampler",
    "center_crop",
    "folder_images",
    "sample_photos",
    "eval_images",
]

SAMPLE_TRAIN = ("astronaut", "coffee", "rocket", "motorcycle")
"""scikit-image's bundled colour photos used for the no-download demo training."""
SAMPLE_TEST = ("chelsea",)
"""The bundled photo the demo evaluates on (never trained on)."""


def _chw(arr: np.ndarray) -> Tensor:
    return torch.from_numpy(np.array(arr[..., :3], dtype=np.uint8)).permute(2, 0, 1).contiguous()


def sample_photos(names: Sequence[str]) -> dict[str, Tensor]:
    """Colour photos shipped inside scikit-image (no download), as ``uint8 (3, H, W)``."""
    import skimage.data

    loaders = {"motorcycle": lambda: skimage.data.stereo_motorcycle()[0]}
    out = {}
    for name in names:
        bundled = name in SKIMAGE_PHOTOS and not name.startswith("stereo_")  # never downloaders (download_all)
        loader = loaders.get(name) or (getattr(skimage.data, name) if bundled else None)
        if loader is None:
            raise ValueError(f"{name!r} is not a scikit-image sample photo; try {SAMPLE_TRAIN} "
                             f"(or one of {', '.join(n for n in SKIMAGE_PHOTOS if not n.startswith('stereo_'))}).")
        out[name] = _chw(loader())
    return out


def folder_images(folders: Sequence[str | os.PathLike[str]], limit: int | None = None) -> dict[str, Tensor]:
    """All images directly in ``folders`` (sorted by name, at most ``limit`` in all)."""
    paths = [p for folder in folders for p in list_images(Path(folder))]
    if not paths:
        raise ValueError(f"no images found in {[str(f) for f in folders]}.")
    return {f"{p.parent.name}/{p.stem}": _chw(read_image(p)) for p in paths[:limit]}


def center_crop(img: Tensor, size: int | None) -> Tensor:
    """The central ``size x size`` region of a ``(C, H, W)`` image (``None``: unchanged)."""
    if size is None:
        return img
    h, w = img.shape[-2:]
    if size > min(h, w):
        raise ValueError(f"crop {size} is larger than the {h}x{w} image.")
    top, left = (h - size) // 2, (w - size) // 2
    return img[..., top:top + size, left:left + size]


def eval_images(folder: str | os.PathLike[str], count: int | None = None,
                crop: int | None = None) -> dict[str, Tensor]:
    """A deterministic test subset: ``count`` images evenly spaced over the sorted folder
    (``None``: all), each centre-cropped to ``crop`` (``None``: full size)."""
    paths = list_images(Path(folder))
    if not paths:
        raise ValueError(f"no test images in {str(folder)!r}.")
    if count is not None and count < len(paths):
        paths = [paths[int(i)] for i in np.linspace(0, len(paths) - 1, count).round()]
    return {p.stem: center_crop(_chw(read_image(p)), crop) for p in paths}


class PatchSampler:
    """Random square patches from in-memory images, with random flips and transposes.

    Args:
        images: ``uint8 (3, H, W)`` tensors, each at least ``patch`` pixels on both sides.
        patch: Patch size in pixels.
        generator: Source of randomness (seed it for a reproducible stream).
    """

    def __init__(self, images: Sequence[Tensor], patch: int, generator: torch.Generator) -> None:
        small = [tuple(im.shape) for im in images if min(im.shape[-2:]) < patch]
        if not images or small:
            raise ValueError(f"PatchSampler needs images of at least {patch}x{patch}; got "
                             f"{len(images)} images, too small: {small[:5]}.")
        self.images, self.patch, self.generator = list(images), patch, generator

    def _randint(self, high: int) -> int:
        return int(torch.randint(high, (1,), generator=self.generator))

    def sample(self, batch: int) -> Tensor:
        """A float32 ``(batch, 3, patch, patch)`` tensor in [0, 1]."""
        p, out = self.patch, []
        for _ in range(batch):
            img = self.images[self._randint(len(self.images))]
            top, left = self._randint(img.shape[1] - p + 1), self._randint(img.shape[2] - p + 1)
            crop = img[:, top:top + p, left:left + p]
            mode = self._randint(8)
            if mode & 1:
                crop = crop.flip(-1)
            if mode & 2:
                crop = crop.flip(-2)
            if mode & 4:
                crop = crop.transpose(-1, -2)
            out.append(crop)
        return torch.stack(out).float().div_(255.0)
