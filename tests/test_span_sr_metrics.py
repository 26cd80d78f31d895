"""PSNR/SSIM conventions: hand-computed cases and scikit-image's SSIM."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from skimage.metrics import structural_similarity

from examples.span_sr.metrics import psnr_rgb, psnr_y, rgb_to_y, ssim, ssim_y, to_uint8


def test_y_channel_bt601():
    px = np.array([[[255, 255, 255], [0, 0, 0], [255, 0, 0]]], np.uint8)
    np.testing.assert_allclose(rgb_to_y(px)[0], [16 + 65.481 + 128.553 + 24.966, 16.0, 16 + 65.481])


def test_psnr_hand_computed():
    hr = np.full((20, 20, 3), 100, np.uint8)
    sr = hr.copy()
    sr[4:-4, 4:-4, 0] += 10  # the whole interior, R channel only
    # RGB: MSE over 3 channels = 100 / 3
    assert psnr_rgb(sr, hr) == pytest.approx(10 * math.log10(255**2 / (100 / 3)), abs=1e-12)
    # Y: difference 65.481/255*10 on every interior pixel
    dy = 65.481 / 255 * 10
    assert psnr_y(sr, hr) == pytest.approx(10 * math.log10(255**2 / dy**2), abs=1e-12)
    # the border is excluded: a change only in the 4-pixel frame is invisible
    framed = hr.copy()
    framed[:4] = 0
    assert psnr_y(framed, hr) == math.inf
    assert psnr_y(framed, hr, border=0) < 30


def test_ssim_matches_skimage_gaussian():
    rng = np.random.default_rng(0)
    hr = rng.integers(0, 256, (48, 40, 3), dtype=np.uint8)
    noise = rng.normal(0, 12, hr.shape)
    sr = np.clip(hr + noise, 0, 255).astype(np.uint8)
    y_sr, y_hr = rgb_to_y(sr)[4:-4, 4:-4], rgb_to_y(hr)[4:-4, 4:-4]
    ref = structural_similarity(
        y_sr, y_hr, gaussian_weights=True, sigma=1.5, use_sample_covariance=False, data_range=255
    )
    assert ssim_y(sr, hr) == pytest.approx(ref, abs=1e-10)
    assert ssim(y_hr, y_hr) == pytest.approx(1.0, abs=1e-12)
    assert 0 < ssim_y(sr, hr) < 1


def test_to_uint8_clamps_and_rounds():
    x = torch.tensor([-0.2, 0.0, 0.5 / 255, 1.49 / 255, 1.0, 1.7]).view(1, 1, 1, 6).expand(1, 3, 1, 6)
    np.testing.assert_array_equal(to_uint8(x)[0, :, 0], [0, 0, 0, 1, 255, 255])
    with pytest.raises(ValueError, match="batch"):
        to_uint8(torch.zeros(2, 3, 4, 4))


def test_metric_input_errors():
    a = np.zeros((16, 16, 3), np.uint8)
    with pytest.raises(ValueError, match="uint8"):
        psnr_y(a.astype(np.float32), a)
    with pytest.raises(ValueError, match="modcrop"):
        psnr_y(a, np.zeros((12, 16, 3), np.uint8))
    with pytest.raises(ValueError, match="border=9"):
        psnr_rgb(a, a, border=9)
