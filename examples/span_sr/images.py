"""Images of the SR tools: one reader, one writer, one folder listing; everything is uint8 HxWx3 RGB.

:func:`read_image` takes a path or a reference:

* an image file (PNG/JPEG/BMP/TIFF/WebP), decoded by Pillow with this rule:
  RGB unchanged; grayscale (``L``, ``1``) copied into R, G and B; 16-bit (``I;16``, 48-bit RGB)
  reduced to 8 bits by keeping the high byte (``v >> 8``, how Pillow decodes 16-bit RGB PNGs);
  alpha (``RGBA``, ``LA``, ``PA``) dropped with the colour values kept as stored (no compositing);
  palette (``P``) looked up, then as above; CMYK, YCbCr and other modes through ``convert("RGB")``;
* a pre-decoded ``.npy`` array (uint8 or uint16, HxW or HxWx{1,3,4}, same rule);
* a packed ``.u8.xz`` file (:func:`save_packed`: lossless, about 30% smaller than PNG, used to
  carry BSD200 + T91 to a GPU machine);
* ``skimage:NAME``, a photo bundled with scikit-image (the demo's data; :data:`SKIMAGE_PHOTOS`).

Anything that cannot be decoded raises a ``ValueError`` naming the file.
"""

from __future__ import annotations

import lzma
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from examples.span_sr.checkpoint import write_atomically

__all__ = ["IMAGE_EXTS", "SKIMAGE_PHOTOS", "list_images", "load_packed", "read_image", "save_packed", "write_image"]

IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp", ".npy", ".u8.xz")
"""File endings :func:`read_image` decodes (case-insensitive)."""

_PACK_MAGIC = b"U8XZ1"


def _is_image(path: Path) -> bool:
    return path.name.lower().endswith(IMAGE_EXTS)


def list_images(folder: str | Path, *, recursive: bool = False) -> list[Path]:
    """The image files in ``folder`` (its subfolders too with ``recursive``), sorted; hidden files skipped.

    Raises:
        FileNotFoundError: ``folder`` does not exist.
        ValueError: it holds files that are not images (named), or no image at all.
    """
    root = Path(folder)
    if not root.is_dir():
        what = "is a file, not a folder" if root.is_file() else "does not exist"
        raise FileNotFoundError(f"image folder {str(root)!r} {what}; check the path.")
    found = root.rglob("*") if recursive else root.iterdir()
    files = sorted(p for p in found if p.is_file() and not any(
        part.startswith(".") for part in p.relative_to(root).parts))
    others = [str(p) for p in files if not _is_image(p)]
    if others:
        raise ValueError(f"folder {str(root)!r} holds {len(others)} file(s) that are not images, e.g. "
                         f"{others[:3]}; move them out (images end in {', '.join(IMAGE_EXTS)}).")
    if not files:
        raise ValueError(f"folder {str(root)!r} holds no images ({', '.join(IMAGE_EXTS)}).")
    return files


def _pillow_to_rgb(img: Image.Image) -> np.ndarray:
    mode = img.mode
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        arr = np.asarray(img).astype(np.int64)
        if mode == "I" and arr.max(initial=0) <= 255:  # 8-bit data stored in a 32-bit mode
            gray = np.clip(arr, 0, 255).astype(np.uint8)
        else:
            gray = (np.clip(arr, 0, 65535) >> 8).astype(np.uint8)
        return np.repeat(gray[:, :, None], 3, axis=2)
    if mode == "F":
        raise ValueError("floating-point images (mode 'F') have no defined 8-bit range; convert first")
    if mode == "P":
        img = img.convert("RGBA") if "transparency" in img.info else img.convert("RGB")
        mode = img.mode
    if mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        img = img.convert("RGBA") if mode != "RGBA" else img
        return np.ascontiguousarray(np.asarray(img)[:, :, :3])
    if mode != "RGB":
        img = img.convert("RGB")
    return np.ascontiguousarray(np.asarray(img, dtype=np.uint8))


def _array_to_rgb(arr: np.ndarray, ref: str) -> np.ndarray:
    if arr.ndim == 2:
        arr = arr[:, :, None]
    if arr.ndim != 3 or arr.shape[2] not in (1, 3, 4):
        raise ValueError(f"image {ref!r} has shape {arr.shape}; expected HxW, HxWx3 or HxWx4")
    if arr.dtype == np.uint16:
        arr = arr >> 8  # the high byte, as for 16-bit image files
    elif arr.dtype != np.uint8:
        raise ValueError(f"image {ref!r} has dtype {arr.dtype}; give 8- or 16-bit images")
    arr = arr.astype(np.uint8)
    if arr.shape[2] == 1:
        arr = np.repeat(arr, 3, axis=2)
    return np.ascontiguousarray(arr[:, :, :3])


SKIMAGE_PHOTOS = ("astronaut", "brick", "camera", "cat", "chelsea", "clock", "coffee", "coins", "colorwheel",
                  "grass", "gravel", "hubble_deep_field", "immunohistochemistry", "logo", "microaneurysms", "moon",
                  "page", "retina", "rocket", "text", "stereo_motorcycle_left", "stereo_motorcycle_right")
"""The names ``skimage:NAME`` accepts: images bundled with scikit-image (nothing is downloaded)."""


def _skimage(ref: str) -> np.ndarray:
    import skimage.data

    name = ref.split(":", 1)[1]
    if name not in SKIMAGE_PHOTOS:  # only these: skimage.data also holds downloaders (download_all, ...)
        raise ValueError(f"{ref!r}: scikit-image has no bundled image {name!r}; use one of {', '.join(SKIMAGE_PHOTOS)}.")
    pair = {"stereo_motorcycle_left": 0, "stereo_motorcycle_right": 1}
    fn = getattr(skimage.data, "stereo_motorcycle" if name in pair else name)
    return _array_to_rgb(np.asarray(fn()[pair[name]] if name in pair else fn()), ref)


def read_image(ref: str | Path) -> np.ndarray:
    """Decode an image file or ``skimage:NAME`` to uint8 HxWx3 RGB (the rule is in the module docstring).

    Raises:
        FileNotFoundError: the file does not exist.
        ValueError: it cannot be decoded as an image (the message names it).
    """
    if isinstance(ref, str) and ref.startswith("skimage:"):
        return _skimage(ref)
    path = Path(ref)
    if not path.is_file():
        raise FileNotFoundError(f"image file {str(path)!r} does not exist.")
    try:
        if path.name.lower().endswith(".u8.xz"):
            return load_packed(path)
        if path.suffix.lower() == ".npy":
            return _array_to_rgb(np.load(path, allow_pickle=False), str(path))
        with Image.open(path) as img:
            img.load()
            return _pillow_to_rgb(img)
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, EOFError, lzma.LZMAError) as err:
        raise ValueError(f"{str(path)!r} is not a readable image ({err}); pass PNG/JPEG/BMP/TIFF/WebP "
                         "files, or remove or replace this one.") from err


def write_image(path: str | Path, img: np.ndarray) -> None:
    """Write a uint8 HxWx3 (or HxW) array atomically; the format follows the suffix (PNG is lossless)."""
    if not isinstance(img, np.ndarray) or img.dtype != np.uint8 or img.ndim not in (2, 3):
        desc = f"{getattr(img, 'dtype', type(img).__name__)} {getattr(img, 'shape', '')}"
        raise ValueError(f"write_image needs a uint8 HxW or HxWx3 array, got {desc}.")
    path = Path(path)
    fmt = Image.registered_extensions().get(path.suffix.lower())
    if fmt is None:
        raise ValueError(f"write_image: {str(path)!r} has no image suffix Pillow writes; use .png (lossless).")
    write_atomically(path, lambda tmp: Image.fromarray(img).save(tmp, format=fmt))  # whole or not at all


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
        raise ValueError(f"{str(path)!r} is not a packed image (written by images.save_packed).")
    h, w = (int(v) for v in np.frombuffer(blob[5:13], dtype="<u4"))
    planes = np.frombuffer(lzma.decompress(blob[13:]), dtype=np.uint8).reshape(3, h, w)
    a = planes.transpose(1, 2, 0).astype(np.int64).cumsum(axis=0).cumsum(axis=1)
    a[..., 0] += a[..., 1]
    a[..., 2] += a[..., 1]
    return (a % 256).astype(np.uint8)
