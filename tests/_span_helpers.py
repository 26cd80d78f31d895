"""Helpers shared by the SPAN tests (not a test module): a small seeded SPAN, the photo folders
of a tiny training run."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch

from examples.span_sr.arch import SPAN


def small_span(width: int = 8, cat: int | None = None, scale: int = 4, seed: int = 0) -> SPAN:
    """A seeded deploy-form SPAN in eval mode whose outputs stay about 1 on inputs in [0, 1]."""
    torch.manual_seed(seed)
    m = SPAN(feature_channels=width, conv_cat_channels=cat, upscale=scale).eval()
    with torch.no_grad():  # default init on a 0..255 input gives outputs ~1e3; keep them ~1
        for p in m.parameters():
            p.mul_(0.4)
    return m


def tiny_run_inputs(root: Path, crops: Sequence[tuple[slice, slice]], val: tuple[slice, slice],
                    base: SPAN, teacher: SPAN) -> dict[str, Path]:
    """What a tiny training run reads, under ``root``: ``train/im<i>.png`` (the ``crops`` of
    scikit-image's astronaut), ``val/v0.png`` (the ``val`` crop of its coffee) and the ``base``
    and ``teacher`` weights (``base.pth``, ``teacher.pth``); their paths by name, and ``root``."""
    from PIL import Image
    from skimage import data as skdata

    (root / "train").mkdir()
    (root / "val").mkdir()
    astronaut = skdata.astronaut()
    for i, crop in enumerate(crops):
        Image.fromarray(astronaut[crop]).save(root / "train" / f"im{i}.png")
    Image.fromarray(skdata.coffee()[val]).save(root / "val" / "v0.png")
    torch.save(base.state_dict(), root / "base.pth")
    torch.save(teacher.state_dict(), root / "teacher.pth")
    return {"root": root, "train": root / "train", "val": root / "val", "base": root / "base.pth",
            "teacher": root / "teacher.pth"}
