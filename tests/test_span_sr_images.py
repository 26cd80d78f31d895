"""Image IO conversion rules: grayscale, RGBA, palette, 16-bit; clear errors for non-images."""

from __future__ import annotations

import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from examples.span_sr.images import list_images, read_image, write_image


def _write_png16(path, arr: np.ndarray) -> None:
    """Minimal 16-bit PNG encoder (Pillow cannot write 48-bit RGB)."""
    h, w, c = arr.shape
    color_type = {1: 0, 3: 2, 4: 6}[c]
    raw = b"".join(b"\x00" + arr[y].astype(">u2").tobytes() for y in range(h))

    def chunk(tag: bytes, data: bytes) -> bytes:
        crc = zlib.crc32(tag + data) & 0xFFFFFFFF
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", crc)

    header = struct.pack(">IIBBBBB", w, h, 16, color_type, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header)
                     + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))


def test_rgb_roundtrip(tmp_path):
    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, (7, 5, 3), dtype=np.uint8)
    write_image(tmp_path / "sub" / "a.png", img)
    back = read_image(tmp_path / "sub" / "a.png")
    assert back.dtype == np.uint8 and np.array_equal(back, img)


def test_grayscale_rgba_palette(tmp_path):
    gray = np.arange(35, dtype=np.uint8).reshape(7, 5)
    Image.fromarray(gray, "L").save(tmp_path / "g.png")
    assert np.array_equal(read_image(tmp_path / "g.png"), np.repeat(gray[:, :, None], 3, 2))

    rgba = np.random.default_rng(1).integers(0, 256, (4, 6, 4), dtype=np.uint8)
    Image.fromarray(rgba, "RGBA").save(tmp_path / "a.png")
    assert np.array_equal(read_image(tmp_path / "a.png"), rgba[:, :, :3])  # alpha dropped

    pal = Image.new("P", (3, 2))
    pal.putpalette([10, 20, 30, 200, 100, 0] + [0] * 762)
    pal.putdata([0, 1, 1, 0, 1, 0])
    pal.save(tmp_path / "p.png")
    out = read_image(tmp_path / "p.png")
    assert out.shape == (2, 3, 3)
    assert out[0, 0].tolist() == [10, 20, 30] and out[0, 1].tolist() == [200, 100, 0]


def test_16bit_keeps_high_byte(tmp_path):
    rng = np.random.default_rng(2)
    rgb16 = rng.integers(0, 65536, (5, 7, 3))
    _write_png16(tmp_path / "rgb16.png", rgb16)
    assert np.array_equal(read_image(tmp_path / "rgb16.png"), (rgb16 >> 8).astype(np.uint8))
    gray16 = rng.integers(0, 65536, (5, 7, 1))
    _write_png16(tmp_path / "g16.png", gray16)
    out = read_image(tmp_path / "g16.png")
    assert np.array_equal(out, np.repeat((gray16 >> 8).astype(np.uint8), 3, 2))


def test_non_images_are_rejected_clearly(tmp_path):
    bad = tmp_path / "notes.png"
    bad.write_text("not an image")
    with pytest.raises(ValueError, match="notes.png.*not a readable image"):
        read_image(bad)
    with pytest.raises(FileNotFoundError, match="missing.png"):
        read_image(tmp_path / "missing.png")
    with pytest.raises(ValueError, match="uint8"):
        write_image(tmp_path / "x.png", np.zeros((4, 4, 3), np.float32))


def test_list_images_sorts_skips_hidden_and_names_other_files(tmp_path):
    for name in ("b.png", "a.JPG", ".hidden.png", "x.npy"):
        (tmp_path / name).write_bytes(b"")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "c.png").write_bytes(b"")
    assert [p.name for p in list_images(tmp_path)] == ["a.JPG", "b.png", "x.npy"]
    assert [p.name for p in list_images(tmp_path, recursive=True)] == ["a.JPG", "b.png", "c.png", "x.npy"]
    (tmp_path / "notes.txt").write_text("not an image")
    with pytest.raises(ValueError, match="notes.txt"):
        list_images(tmp_path)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        list_images(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="holds no images"):
        list_images(tmp_path / "empty")
