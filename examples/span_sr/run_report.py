"""What a DSCLoRA run shows a person: ``metrics.jsonl``, JSON summaries, curves and pictures.

:class:`MetricsLog` appends one JSON record per line (and drops the records after the step a
resumed run starts from), :func:`plot_curves` draws the loss parts and validation PSNR with
matplotlib when it is installed, :func:`comparison_strip` puts bicubic, each model and HR side by
side, and :func:`write_png` writes it without Pillow.
"""

from __future__ import annotations

import json
import struct
import zlib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

__all__ = ["MetricsLog", "comparison_strip", "dump_json", "plot_curves", "write_png"]


def write_png(path: str | Path, img: np.ndarray) -> None:
    """Write a uint8 HxWx3 array as an 8-bit RGB PNG (no Pillow needed)."""
    if img.dtype != np.uint8 or img.ndim != 3 or img.shape[2] != 3:
        raise ValueError(f"write_png needs uint8 HxWx3, got {img.dtype} {img.shape}.")
    h, w = img.shape[:2]
    raw = b"".join(b"\x00" + img[y].tobytes() for y in range(h))

    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)

    png = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0))
    png += chunk(b"IDAT", zlib.compress(raw, 6)) + chunk(b"IEND", b"")
    Path(path).write_bytes(png)


def dump_json(path: Path, obj: Any) -> None:
    """Write ``obj`` as indented JSON."""
    path.write_text(json.dumps(obj, indent=2, default=str) + "\n")


class MetricsLog:
    """Append-only ``metrics.jsonl``; on resume, records after the resumed step are dropped."""

    def __init__(self, path: Path, *, truncate_after: int | None = None, enabled: bool = True) -> None:
        self.path, self.enabled = path, enabled
        if enabled and truncate_after is not None and path.is_file():
            keep = [line for line in path.read_text().splitlines()
                    if line.strip() and json.loads(line).get("step", 0) <= truncate_after]
            path.write_text("".join(line + "\n" for line in keep))

    def write(self, record: Mapping[str, Any]) -> None:
        """Append one JSON record (rank 0 only)."""
        if self.enabled:
            with open(self.path, "a") as fh:
                fh.write(json.dumps(dict(record)) + "\n")

    def read(self) -> list[dict[str, Any]]:
        """All records so far."""
        if not self.path.is_file():
            return []
        return [json.loads(line) for line in self.path.read_text().splitlines() if line.strip()]


def plot_curves(records: list[dict[str, Any]], path: Path) -> bool:
    """Loss parts and validation PSNR over steps as a PNG; returns False without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    train = [r for r in records if "loss" in r]
    val = [r for r in records if "val_psnr" in r]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    for key in ("loss", "rec", "out", "aff"):
        pts = [(r["step"], r[key]) for r in train if r.get(key)]
        if pts:
            ax1.plot(*zip(*pts), label=key)
    ax1.set(xlabel="step", ylabel="total (weighted) and unweighted parts", yscale="log", title="training loss")
    ax1.legend()
    if val:
        ax2.plot([r["step"] for r in val], [r["val_psnr"] for r in val], "o-", label="student")
    refs = next((r for r in records if "val_base" in r), None)
    if refs:
        ax2.axhline(refs["val_base"], color="gray", ls="--", label="base")
        ax2.axhline(refs["val_teacher"], color="green", ls=":", label="teacher")
    ax2.set(xlabel="step", ylabel="Y-PSNR (dB)", title="validation (held-out images)")
    ax2.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


def comparison_strip(lr: torch.Tensor, hr: np.ndarray, models: Mapping[str, nn.Module], *, crop: int = 40) -> np.ndarray:
    """Side by side: bicubic, each model, HR, on a ``crop``-pixel LR centre crop (x scale, uint8),
    each tile under a caption with its name (the model's key in ``models``)."""
    import torch.nn.functional as F

    from examples.span_sr.metrics import to_uint8

    scale = hr.shape[0] // lr.shape[-2]
    h, w = lr.shape[-2:]
    c = min(crop, h, w)
    top, left = (h - c) // 2, (w - c) // 2
    patch = lr[..., top:top + c, left:left + c]
    tiles = [to_uint8(F.interpolate(patch, scale_factor=scale, mode="bicubic", align_corners=False))]
    with torch.no_grad():
        for model in models.values():
            device = next(model.parameters()).device
            tiles.append(to_uint8(model(patch.to(device)).float().cpu()))
    tiles.append(np.ascontiguousarray(hr[top * scale:(top + c) * scale, left * scale:(left + c) * scale]))
    names = ["bicubic", *models, "HR"]
    tiles = [np.concatenate([_caption(name, t.shape[1]), t], axis=0) for name, t in zip(names, tiles)]
    gap = np.full((tiles[0].shape[0], 4, 3), 255, np.uint8)
    return np.concatenate([x for t in tiles for x in (t, gap)][:-1], axis=1)


CAPTION_HEIGHT = 14
"""Height in pixels of the white band with a tile's name above it in :func:`comparison_strip`."""


def _caption(text: str, width: int) -> np.ndarray:
    """A white ``CAPTION_HEIGHT x width`` band with ``text`` in black (Pillow's built-in font)."""
    from PIL import Image, ImageDraw

    band = Image.new("RGB", (width, CAPTION_HEIGHT), (255, 255, 255))
    ImageDraw.Draw(band).text((2, 1), text, fill=(0, 0, 0))
    return np.asarray(band, dtype=np.uint8)
