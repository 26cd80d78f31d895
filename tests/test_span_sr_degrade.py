"""MATLAB-exact bicubic: agreement with the benchmark's provided LR images, kernel properties,
and the differentiable float variant."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import requires_shared

from examples.span_sr.degrade import imresize_matlab, imresize_torch, modcrop, resize_weights
from examples.span_sr.images import list_images, read_image


@requires_shared
@pytest.mark.parametrize("bench", ["Set5", "Set14"])
def test_matches_provided_matlab_lr(shared_data, bench):
    root = shared_data / "sr_bench" / bench
    equal, total, worst = 0, 0, 0
    for hr_path in list_images(root / "HR"):
        hr = modcrop(read_image(hr_path), 4)
        lr = imresize_matlab(hr, 0.25)
        ref = read_image(root / "LR_bicubic" / "X4" / f"{hr_path.stem}x4.png")
        assert lr.shape == ref.shape == (hr.shape[0] // 4, hr.shape[1] // 4, 3)
        diff = np.abs(lr.astype(np.int16) - ref.astype(np.int16))
        equal += int((diff == 0).sum())
        total += diff.size
        worst = max(worst, int(diff.max()))
    assert equal / total >= 0.999
    assert worst <= 1


def test_weights_rows_sum_to_one_and_support_is_antialiased():
    w = resize_weights(40, 10, 0.25)
    np.testing.assert_allclose(w.sum(axis=1), 1.0, atol=1e-12)
    # shrinking by 4 stretches the 4-tap cubic to 16 taps (interior rows)
    assert (np.count_nonzero(w[4]) in (15, 16, 17)) and np.count_nonzero(w[4]) > 4
    # symmetric: the pixel grid is symmetric under flipping, so are the weights
    np.testing.assert_allclose(w[::-1, ::-1], w, atol=1e-12)


def test_constant_image_stays_constant_and_upscale_interpolates():
    img = np.full((13, 9, 3), 77, np.uint8)
    assert np.array_equal(imresize_matlab(img, 0.25), np.full((4, 3, 3), 77, np.uint8))
    ramp = np.tile(np.arange(0, 200, 10, dtype=np.uint8), (6, 1))
    up = imresize_matlab(ramp, 2)
    assert up.shape == (12, 40)
    # a linear ramp is reproduced by the cubic kernel away from the mirrored borders
    np.testing.assert_array_equal(np.diff(up[3, 4:-4].astype(int)) >= 4, True)


def test_torch_variant_matches_uint8_before_rounding_and_is_differentiable():
    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, (37, 29, 3), dtype=np.uint8)
    x = torch.from_numpy(img).permute(2, 0, 1)[None].double().requires_grad_(True)
    y = imresize_torch(x, 0.25)
    assert y.shape == (1, 3, 10, 8)
    ref = imresize_matlab(img, 0.25).astype(np.float64)
    # only the rounding between and after the passes separates the two
    assert np.abs(y[0].detach().permute(1, 2, 0).numpy() - ref).max() <= 1.5
    y.sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()
    # the float path equals the two matrix passes of the uint8 path without rounding
    w_h, w_w = resize_weights(37, 10, 0.25), resize_weights(29, 8, 0.25)
    expected = np.einsum("oh,hwc,pw->opc", w_h, img.astype(np.float64), w_w)
    np.testing.assert_allclose(y[0].detach().permute(1, 2, 0).numpy(), expected, atol=1e-9)


def test_grayscale_and_errors():
    gray = np.arange(64, dtype=np.uint8).reshape(8, 8)
    assert imresize_matlab(gray, 0.5).shape == (4, 4)
    with pytest.raises(ValueError, match="uint8"):
        imresize_matlab(gray.astype(np.float32), 0.5)
    with pytest.raises(ValueError, match="positive"):
        imresize_matlab(gray, -1)
    with pytest.raises(ValueError, match="float"):
        imresize_torch(torch.zeros(1, 3, 8, 8, dtype=torch.uint8), 0.5)
    assert modcrop(np.zeros((10, 11, 3)), 4).shape == (8, 8, 3)
