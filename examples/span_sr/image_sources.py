"""Image sources of the SR training data: list them, hold some out, decode each to uint8 RGB.

A source is a folder of images (png/jpg/bmp/tif/webp), pre-decoded ``.npy`` (uint8 HxWx3) or
packed ``.u8.xz`` files (:func:`save_packed`, a lossless lzma format about 30% smaller than
PNG, used to carry BSD200 + T91 to a GPU machine), or ``skimage:NAME`` for a photo bundled with
scikit-image (the demo). Hidden files are ignored; any other file is an error.
"""

from __future__ import annotations

import hashlib
import lzma
from collections.abc import Sequence
from pathlib import Path

import numpy as np

__all__ = ["IMAGE_EXTS", "list_images", "load_packed", "read_image", "save_packed", "split_holdout"]

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
