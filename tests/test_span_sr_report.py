"""comparison_strip: tiles in order, each under a caption with its name and Y-PSNR on the crop."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from examples.span_sr.degrade import imresize_matlab
from examples.span_sr.metrics import to_uint8
from examples.span_sr.report import CAPTION_HEIGHT, comparison_strip


class _Nearest(nn.Module):
    def __init__(self, scale: int) -> None:
        super().__init__()
        self.scale = scale
        self.gain = nn.Parameter(torch.ones(()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.gain * F.interpolate(x, scale_factor=self.scale, mode="nearest")


def test_tiles_are_captioned_and_in_order() -> None:
    scale, c = 2, 12
    lr = (np.random.default_rng(1).random((16, 20, 3)) * 255).astype(np.uint8)
    hr = (np.random.default_rng(0).random((32, 40, 3)) * 255).astype(np.uint8)
    strip = comparison_strip(lr, hr, {"base": _Nearest(scale), "student": _Nearest(scale)}, crop=c)
    side = c * scale
    assert strip.shape == (CAPTION_HEIGHT + side, 4 * side + 3 * 4, 3)
    tiles = [strip[:, i * (side + 4):i * (side + 4) + side] for i in range(4)]
    captions = [t[:CAPTION_HEIGHT] for t in tiles]
    for cap in captions:
        assert (cap < 128).any() and (cap == 255).mean() > 0.5  # dark text on white
    assert not np.array_equal(captions[1], captions[2])  # "base" and "student" differ
    top, left = (16 - c) // 2, (20 - c) // 2
    patch = lr[top:top + c, left:left + c]
    np.testing.assert_array_equal(tiles[0][CAPTION_HEIGHT:], imresize_matlab(np.ascontiguousarray(patch), scale))
    x = torch.from_numpy(patch.copy()).permute(2, 0, 1)[None].float() / 255
    np.testing.assert_array_equal(tiles[1][CAPTION_HEIGHT:], to_uint8(F.interpolate(x, scale_factor=2)))
    np.testing.assert_array_equal(tiles[3][CAPTION_HEIGHT:], hr[top * 2:(top + c) * 2, left * 2:(left + c) * 2])
