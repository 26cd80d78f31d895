"""Training data for DSCLoRA: HR image folders -> cached (LR, HR) arrays -> random patch batches.

* Sources: folders of images (png/jpg/bmp/tif/webp), pre-decoded ``.npy`` (uint8 HxWx3) or
  packed ``.u8.xz`` files (:func:`save_packed`, a lossless lzma format about 30% smaller than
  PNG, used to carry BSD200 + T91 to a GPU machine), or ``skimage:NAME`` for a photo bundled with
  scikit-image (the demo). Hidden files are ignored; any other file is an error.
* Every image is decoded once, mod-cropped to a multiple of the scale, and its LR made once with
  the MATLAB-exact bicubic (:func:`degrade.imresize_matlab`, ``lr_mode="cache"``, the default:
  the test sets' LR are made exactly so, uint8 rounding included, so training sees the test
  degradation). Both arrays are cached on disk (``.npy``) keyed by file path, size and mtime.
  ``lr_mode="float"`` instead downsizes each HR patch on the fly with the float variant
  (:func:`degrade.imresize_torch`, no rounding; borders of the patch are mirrored).
* :class:`PatchDataset` maps a *global sample index* ``k = step * global_batch + j`` to one
  augmented pair; its randomness (image, crop, flip, rot90) is a pure function of
  ``(seed, k)``, so resuming or changing the number of workers or DDP ranks reproduces exactly
  the same batches. :func:`rank_batches` shards each global batch by rank.
"""

from __future__ import annotations

import hashlib
import lzma
import os
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from examples.span_sr.degrade import imresize_matlab, imresize_torch, modcrop

__all__ = [
    "IMAGE_EXTS",
    "ImageSet",
    "PatchDataset",
    "list_images",
    "load_packed",
    "read_image",
    "rank_batches",
    "save_packed",
    "split_holdout",
]

IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")
_ARRAY_EXTS = (".npy", ".u8.xz")
_PACK_MAGIC = b"U8XZ1"


def _kind(path: Path) -> str | None:
    name = path.name.lower()
    if name.endswith(_ARRAY_EXTS):
        return "array"
    return "image" if name.endswith(IMAGE_EXTS) else None


def list_images(sources: Sequence[str]) -> list[str]:
    """Expand folders (recursively, sorted) and ``skimage:NAME`` entries into image references.

    Raises:
        FileNotFoundError: a folder does not exist.
        ValueError: a folder has no images, or holds files that are not images.
    """
    refs: list[str] = []
    for src in sources:
        if src.startswith("skimage:"):
            refs.append(src)
            continue
        root = Path(src)
        if root.is_file():
            if _kind(root) is None:
                raise ValueError(f"data source {src!r} is not an image ({', '.join(IMAGE_EXTS + _ARRAY_EXTS)}).")
            refs.append(str(root))
            continue
        if not root.is_dir():
            raise FileNotFoundError(f"data folder {src!r} does not exist; check --data.train / --data.val paths.")
        files = sorted(p for p in root.rglob("*") if p.is_file() and not any(part.startswith(".") for part in p.relative_to(root).parts))
        others = [str(p) for p in files if _kind(p) is None]
        if others:
            raise ValueError(f"data folder {src!r} holds {len(others)} non-image file(s), e.g. {others[:5]}; "
                             f"move them out (images: {', '.join(IMAGE_EXTS + _ARRAY_EXTS)}).")
        if not files:
            raise ValueError(f"data folder {src!r} holds no images; point --data.train at a folder of HR images.")
        refs.extend(str(p) for p in files)
    return refs


def split_holdout(refs: Sequence[str], n: int) -> tuple[list[str], list[str]]:
    """Split ``refs`` into ``(train, val)`` holding out ``n`` images chosen by a hash of their names.

    The choice depends on file names only (not on the seed or the order), so it is stable across
    runs and resumes. Raises ValueError if fewer than ``n + 1`` images are given.
    """
    if n < 0 or n >= len(refs):
        raise ValueError(f"cannot hold out {n} of {len(refs)} training images for validation; "
                         "lower --data.val_holdout or give --data.val folders.")
    ranked = sorted(refs, key=lambda r: hashlib.sha256(Path(r).name.encode()).hexdigest())
    val = set(ranked[:n])
    return [r for r in refs if r not in val], [r for r in refs if r in val]


def save_packed(path: str | Path, img: np.ndarray) -> None:
    """Write a uint8 HxWx3 image losslessly: G-subtracted colours, 2-D delta filter, lzma."""
    if img.dtype != np.uint8 or img.ndim != 3 or img.shape[2] != 3:
        raise ValueError(f"save_packed needs a uint8 HxWx3 array, got {img.dtype} {img.shape}.")
    a = img.astype(np.int16)
    a[..., 0] -= a[..., 1]
    a[..., 2] -= a[..., 1]
    a = np.diff(np.diff(a, axis=1, prepend=0), axis=0, prepend=0)
    planes = np.ascontiguousarray((a % 256).astype(np.uint8).transpose(2, 0, 1))
    header = _PACK_MAGIC + np.array(img.shape[:2], dtype="<u4").tobytes()
    Path(path).write_bytes(header + lzma.compress(planes.tobytes(), preset=9))


def load_packed(path: str | Path) -> np.ndarray:
    """Read a file written by :func:`save_packed` back into the exact uint8 HxWx3 array."""
    blob = Path(path).read_bytes()
    if not blob.startswith(_PACK_MAGIC):
        raise ValueError(f"{str(path)!r} is not a packed image (written by data.save_packed).")
    h, w = (int(v) for v in np.frombuffer(blob[5:13], dtype="<u4"))
    planes = np.frombuffer(lzma.decompress(blob[13:]), dtype=np.uint8).reshape(3, h, w)
    a = planes.transpose(1, 2, 0).astype(np.int64).cumsum(axis=0).cumsum(axis=1)
    a[..., 0] += a[..., 1]
    a[..., 2] += a[..., 1]
    return (a % 256).astype(np.uint8)


def _to_rgb_uint8(arr: np.ndarray, ref: str) -> np.ndarray:
    if arr.ndim == 2:
        arr = arr[:, :, None]
    if arr.ndim != 3 or arr.shape[2] not in (1, 3, 4):
        raise ValueError(f"image {ref!r} has shape {arr.shape}; expected HxW, HxWx3 or HxWx4.")
    if arr.dtype == np.uint16:
        arr = arr >> 8  # 16-bit -> 8-bit keeps the high byte, as image_io.read_image does
    elif arr.dtype != np.uint8:
        raise ValueError(f"image {ref!r} has dtype {arr.dtype}; give 8- or 16-bit images.")
    arr = arr.astype(np.uint8)
    if arr.shape[2] == 1:
        arr = np.repeat(arr, 3, axis=2)
    return np.ascontiguousarray(arr[:, :, :3])  # RGBA: alpha dropped (the colour channels are kept as stored)


def read_image(ref: str) -> np.ndarray:
    """Decode one reference to a uint8 HxWx3 RGB array (image files by :func:`image_io.read_image`'s rule).

    Raises:
        ValueError: the file cannot be decoded as an image (the message names it).
    """
    if ref.startswith("skimage:"):
        import skimage.data

        name = ref.split(":", 1)[1]
        pair = {"stereo_motorcycle_left": 0, "stereo_motorcycle_right": 1}
        fn = getattr(skimage.data, "stereo_motorcycle" if name in pair else name, None)
        if fn is None:
            raise ValueError(f"{ref!r}: scikit-image has no bundled image {name!r}.")
        return _to_rgb_uint8(np.asarray(fn()[pair[name]] if name in pair else fn()), ref)
    path = Path(ref)
    try:
        if path.name.lower().endswith(".u8.xz"):
            return load_packed(path)
        if path.suffix.lower() == ".npy":
            return _to_rgb_uint8(np.load(path, allow_pickle=False), ref)
        from examples.span_sr.image_io import read_image as read_image_file  # needs Pillow

        return read_image_file(path)
    except (OSError, ValueError, EOFError) as err:
        raise ValueError(f"cannot read image {ref!r}: {err}. Remove or replace the file.") from err


def _cache_key(ref: str, scale: int, lr_mode: str) -> str:
    if ref.startswith("skimage:"):
        stamp = ref
    else:
        st = Path(ref).stat()
        stamp = f"{Path(ref).resolve()}|{st.st_size}|{st.st_mtime_ns}"
    return hashlib.sha256(f"v1|{stamp}|x{scale}|{lr_mode}".encode()).hexdigest()[:24]


def _atomic_save(path: Path, arr: np.ndarray) -> None:
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as fh:
        np.save(fh, arr)
    os.replace(tmp, path)


@dataclass
class ImageSet:
    """Decoded, mod-cropped HR images and their MATLAB-bicubic LR (``None`` in float mode)."""

    refs: list[str]
    hr: list[np.ndarray]
    lr: list[np.ndarray | None]
    scale: int

    @classmethod
    def load(cls, refs: Sequence[str], scale: int, *, lr_mode: str = "cache", cache_dir: str | Path | None = None,
             min_hr: int = 0, small: str = "skip", max_side: int = 0) -> ImageSet:
        """Decode ``refs`` once (or read them from ``cache_dir``) and make their LR.

        Args:
            min_hr: Images whose mod-cropped sides are below this are skipped with a warning
                (``small="skip"``) or rejected (``small="error"``).
            max_side: Centre-crop HR to at most this side before making the LR (validation).
        """
        if lr_mode not in ("cache", "float"):
            raise ValueError(f"lr_mode={lr_mode!r}; use 'cache' (MATLAB uint8 LR made once) or 'float'.")
        if small not in ("skip", "error"):
            raise ValueError(f"small={small!r}; use 'skip' or 'error'.")
        cache = Path(cache_dir) if cache_dir else None
        if cache is not None:
            cache.mkdir(parents=True, exist_ok=True)
        keep, hrs, lrs, tiny = [], [], [], []
        for ref in refs:
            key = _cache_key(ref, scale, lr_mode) + (f"_c{max_side}" if max_side else "")
            hr_file = cache / f"{key}.hr.npy" if cache else None
            lr_file = cache / f"{key}.lr.npy" if cache else None
            hr: np.ndarray
            lr: np.ndarray | None
            if hr_file is not None and lr_file is not None and hr_file.exists() and (lr_mode == "float" or lr_file.exists()):
                hr = np.load(hr_file, mmap_mode="r")
                lr = np.load(lr_file, mmap_mode="r") if lr_mode == "cache" else None
            else:
                hr = modcrop(read_image(ref), scale)
                if max_side:
                    hr = _center_crop(hr, max_side - max_side % scale)
                lr = imresize_matlab(np.ascontiguousarray(hr), 1.0 / scale) if lr_mode == "cache" else None
                if hr_file is not None and lr_file is not None:
                    _atomic_save(hr_file, hr)
                    if lr is not None:
                        _atomic_save(lr_file, lr)
            if min(hr.shape[:2]) < min_hr:
                tiny.append(f"{ref} ({hr.shape[1]}x{hr.shape[0]})")
                continue
            keep.append(ref)
            hrs.append(hr)
            lrs.append(lr)
        if tiny:
            msg = (f"{len(tiny)} image(s) smaller than the {min_hr}x{min_hr} HR patch: {tiny[:10]}"
                   + (" ..." if len(tiny) > 10 else ""))
            if small == "error" or not keep:
                raise ValueError(msg + "; lower --data.patch or remove them.")
            warnings.warn(msg + "; skipped.", stacklevel=2)
        return cls(keep, hrs, lrs, scale)


def _center_crop(img: np.ndarray, side: int) -> np.ndarray:
    h, w = img.shape[:2]
    top, left = max(0, (h - side) // 2), max(0, (w - side) // 2)
    return img[top:top + side, left:left + side]


class PatchDataset(torch.utils.data.Dataset):
    """Global sample index -> ``(lr, hr)`` CHW patch pair; randomness is a function of ``(seed, index)``.

    ``lr`` is uint8 in cache mode and float32 in [0, 1] in float mode; ``hr`` is uint8.
    The index ``k = step * global_batch + j`` names the step and the sample within it.
    """

    def __init__(self, images: ImageSet, patch: int, seed: int) -> None:
        self.images, self.patch, self.seed = images, patch, seed

    def __len__(self) -> int:
        return 2**62

    def __getitem__(self, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        rng = np.random.default_rng([self.seed, int(k)])
        n = len(self.images.hr)
        i = int(rng.integers(n))
        s, p = self.images.scale, self.patch
        hr_img = self.images.hr[i]
        h, w = hr_img.shape[0] // s, hr_img.shape[1] // s
        y, x = int(rng.integers(h - p + 1)), int(rng.integers(w - p + 1))
        flip_h, flip_v, transpose = (bool(b) for b in rng.integers(2, size=3))
        hr = np.asarray(hr_img[y * s:(y + p) * s, x * s:(x + p) * s])
        lr_img = self.images.lr[i]
        if lr_img is not None:
            lr = np.asarray(lr_img[y:y + p, x:x + p])
        else:
            lr = None
        def aug(a: np.ndarray) -> np.ndarray:
            if flip_h:
                a = a[:, ::-1]
            if flip_v:
                a = a[::-1]
            if transpose:
                a = a.transpose(1, 0, 2)
            return np.ascontiguousarray(a.transpose(2, 0, 1))
        hr_t = torch.from_numpy(aug(hr))
        if lr is None:
            lr_t = imresize_torch(hr_t.float()[None] / 255.0, 1.0 / s)[0].clamp_(0, 1)
        else:
            lr_t = torch.from_numpy(aug(lr))
        return lr_t, hr_t


def rank_batches(start_step: int, steps: int, global_batch: int, rank: int = 0,
                 world: int = 1) -> Iterator[list[int]]:
    """Yield, for each step in ``[start_step, steps)``, this rank's slice of the global batch indices."""
    if global_batch % world:
        raise ValueError(f"global batch {global_batch} is not divisible by {world} processes; "
                         "choose --data.batch as a multiple of the number of ranks.")
    local = global_batch // world
    for step in range(start_step, steps):
        base = step * global_batch + rank * local
        yield list(range(base, base + local))
