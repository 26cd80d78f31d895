"""Image reading and writing for the SR tools: everything becomes ``uint8`` HxWx3 RGB.

Conversion rule (applied by :func:`read_image`):

* RGB: unchanged. Grayscale (``L``, ``1``): the gray value is copied into R, G and B.
* 16-bit (``I;16`` grayscale, 48-bit RGB): reduced to 8 bits by keeping the high byte
  (``v >> 8``), which is how Pillow decodes 16-bit RGB PNGs; grayscale is then copied to RGB.
* Alpha (``RGBA``, ``LA``, ``PA``): the alpha channel is dropped, colour values are kept as
  stored (no compositing onto a background).
* Palette (``P``): looked up in the palette, then as above.
* CMYK, YCbCr and other modes: converted with Pillow's ``convert("RGB")``.

Anything Pillow cannot identify raises a ``ValueError`` naming the file.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

__all__ = ["IMAGE_SUFFIXES", "list_images", "read_image", "to_rgb_uint8", "write_image"]

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")


def to_rgb_uint8(img: Image.Image) -> np.ndarray:
    """Convert a Pillow image to ``uint8`` HxWx3 with the module's documented rule."""
    mode = img.mode
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        arr = np.asarray(img).astype(np.int64)
        if mode == "I" and arr.max(initial=0) <= 255:  # 8-bit data stored in a 32-bit mode
            gray = np.clip(arr, 0, 255).astype(np.uint8)
        else:
            gray = (np.clip(arr, 0, 65535) >> 8).astype(np.uint8)
        return np.repeat(gray[:, :, None], 3, axis=2)
    if mode == "F":
        raise ValueError("floating-point images (mode 'F') have no defined 8-bit range; convert first.")
    if mode == "P":
        img = img.convert("RGBA") if "transparency" in img.info else img.convert("RGB")
        mode = img.mode
    if mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        img = img.convert("RGBA") if mode != "RGBA" else img
        return np.ascontiguousarray(np.asarray(img)[:, :, :3])
    if mode != "RGB":
        img = img.convert("RGB")
    return np.ascontiguousarray(np.asarray(img, dtype=np.uint8))


def read_image(path: str | Path) -> np.ndarray:
    """Read an image file as ``uint8`` HxWx3 RGB (see the module docstring for the rule).

    Raises:
        FileNotFoundError: when ``path`` does not exist.
        ValueError: when the file is not an image Pillow can decode.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"image file {str(path)!r} does not exist.")
    try:
        with Image.open(path) as img:
            img.load()
            return to_rgb_uint8(img)
    except (UnidentifiedImageError, OSError, SyntaxError) as err:
        raise ValueError(
            f"{str(path)!r} is not a readable image ({err}); pass PNG/JPEG/BMP/TIFF/WebP files."
        ) from err


def write_image(path: str | Path, img: np.ndarray) -> None:
    """Write a ``uint8`` HxWx3 (or HxW) array; the format follows the suffix (PNG is lossless)."""
    if not isinstance(img, np.ndarray) or img.dtype != np.uint8 or img.ndim not in (2, 3):
        desc = f"{getattr(img, 'dtype', type(img).__name__)} {getattr(img, 'shape', '')}"
        raise ValueError(f"write_image needs a uint8 HxW or HxWx3 array, got {desc}.")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(img).save(path)


def list_images(folder: str | Path, suffixes: Iterable[str] = IMAGE_SUFFIXES) -> list[Path]:
    """Image files directly inside ``folder``, sorted by name (hidden files skipped)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"image folder {str(folder)!r} does not exist.")
    allowed = {s.lower() for s in suffixes}
    return sorted(
        p for p in folder.iterdir()
        if p.is_file() and p.suffix.lower() in allowed and not p.name.startswith(".")
    )
