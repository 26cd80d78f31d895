"""Degradations of the restoration example: circular blur, noise, seeds, kernels and the train/test split."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from examples.restoration.degrade import (
    add_noise,
    circular_blur,
    degrade,
    get_task,
    kernel_otf,
    seeded_generator,
    wiener_deconv,
)
from examples.restoration.evaluate import degraded_cases
from examples.restoration.kernels import (
    GAUSSIAN_TEST,
    LEVIN_IN_KERNELS12,
    gaussian_kernel,
    kernel_pool,
    load_kernels12,
    load_levin,
    random_gaussian_kernel,
    random_motion_kernel,
)

FFT_TOL: dict[str, Any] = {"rtol": 0, "atol": 1e-5}  # float32 FFT round-off on values in [0, 1]


def direct_circular(x: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """y[i, j] = sum_{u, v} k[u, v] x[i - u + kh // 2, j - v + kw // 2] (indices mod H, W), in float64."""
    kh, kw = k.shape
    y = torch.zeros_like(x, dtype=torch.float64)
    for u in range(kh):
        for v in range(kw):
            y += float(k[u, v]) * torch.roll(x.double(), shifts=(u - kh // 2, v - kw // 2), dims=(-2, -1))
    return y


@pytest.mark.parametrize("kshape", [(5, 5), (7, 3), (4, 6), (1, 1)])
@pytest.mark.parametrize("hw", [(16, 16), (13, 20)])
def test_circular_blur_equals_direct_sum(kshape: tuple[int, int], hw: tuple[int, int]) -> None:
    g = torch.Generator().manual_seed(1)
    x = torch.rand(3, *hw, generator=g)
    k = torch.rand(*kshape, generator=g)
    k /= k.sum()
    torch.testing.assert_close(circular_blur(x, k).double(), direct_circular(x, k), **FFT_TOL)


def test_circular_blur_equals_conv2d_with_circular_padding() -> None:
    g = torch.Generator().manual_seed(2)
    x = torch.rand(2, 3, 24, 24, generator=g)
    k = torch.rand(7, 7, generator=g)
    k /= k.sum()
    # Convolution = correlation with the flipped kernel; circular padding gives the periodic boundary.
    ref = F.conv2d(F.pad(x.reshape(6, 1, 24, 24), (3, 3, 3, 3), mode="circular"), k.flip(0, 1)[None, None])
    torch.testing.assert_close(circular_blur(x, k), ref.reshape(2, 3, 24, 24), **FFT_TOL)


def test_circular_blur_one_kernel_per_image() -> None:
    g = torch.Generator().manual_seed(3)
    x = torch.rand(3, 3, 20, 20, generator=g)
    ks = torch.stack([random_motion_kernel(np.random.default_rng(i), 9) for i in range(3)])
    y = circular_blur(x, ks)
    for i in range(3):
        torch.testing.assert_close(y[i], circular_blur(x[i], ks[i]), **FFT_TOL)
    assert not torch.allclose(y[0], circular_blur(x[0], ks[1]), atol=1e-3)


def test_delta_kernel_is_identity_and_shift_is_a_roll() -> None:
    x = torch.rand(3, 10, 12, generator=torch.Generator().manual_seed(4))
    delta = torch.zeros(5, 5)
    delta[2, 2] = 1
    torch.testing.assert_close(circular_blur(x, delta), x, **FFT_TOL)
    shift = torch.zeros(5, 5)
    shift[2, 4] = 1  # PSF mass 2 px right of centre moves the image 2 px right
    torch.testing.assert_close(circular_blur(x, shift), torch.roll(x, 2, dims=-1), **FFT_TOL)


def test_blur_errors_name_the_shapes() -> None:
    with pytest.raises(ValueError, match="larger than"):
        kernel_otf(torch.ones(9, 9), 8, 8)
    with pytest.raises(ValueError, match="one per image"):
        circular_blur(torch.rand(2, 3, 8, 8), torch.ones(3, 3, 3) / 9)


def test_noise_level_scale_and_no_clipping() -> None:
    x = torch.full((3, 128, 128), 0.5)
    y = add_noise(x, 25.0, seeded_generator(0, "a"))
    assert abs(float((y - x).std()) * 255 - 25.0) < 0.5
    edge = add_noise(torch.zeros(3, 32, 32), 15.0, seeded_generator(0, "b"))
    assert edge.min() < 0 and (edge < 0).float().mean() > 0.4  # negative values kept, not clipped
    with pytest.raises(ValueError, match=">= 0"):
        add_noise(x, -1.0)


def test_seeded_noise_is_reproducible_and_key_dependent() -> None:
    x = torch.rand(3, 16, 16, generator=torch.Generator().manual_seed(5))
    task = get_task("noise50")
    a = degrade(x, task, seeded_generator(0, "noise50", "img1"))
    b = degrade(x, task, seeded_generator(0, "noise50", "img1"))
    c = degrade(x, task, seeded_generator(0, "noise50", "img2"))
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_test_sets_are_reproducible() -> None:
    imgs = {"a": torch.randint(0, 256, (3, 32, 32), dtype=torch.uint8), "b": torch.zeros(3, 32, 32, dtype=torch.uint8)}
    kernels = [gaussian_kernel(*spec, size=9) for spec in GAUSSIAN_TEST]
    task = get_task("deblur_gauss")
    first, second = degraded_cases(task, imgs, kernels, 0), degraded_cases(task, imgs, kernels, 0)
    assert [c[0] for c in first] == [f"{n}/k{i}" for n in "ab" for i in range(1, 5)]
    for (_, c1, d1), (_, c2, d2) in zip(first, second):
        assert torch.equal(c1, c2) and torch.equal(d1, d2)
    blurred = circular_blur(first[0][1], kernels[0])
    assert abs(float((first[0][2] - blurred).std()) * 255 - 2.55) < 0.3  # blur, then sigma 2.55 noise


def test_blur_task_needs_a_kernel_and_unknown_tasks_are_named() -> None:
    with pytest.raises(ValueError, match="kernel="):
        degrade(torch.rand(3, 8, 8), get_task("deblur_motion"))
    with pytest.raises(ValueError, match="known tasks"):
        get_task("noise30")


def test_gaussian_kernel_moments() -> None:
    k = gaussian_kernel(1.5, 1.5, 0.0, size=25).double()
    assert abs(float(k.sum()) - 1) < 1e-6 and torch.equal(k, k.flip(0)) and torch.equal(k, k.T)
    r = torch.arange(25, dtype=torch.float64) - 12
    assert abs(float((k.sum(0) * r**2).sum()) - 1.5**2) < 1e-3
    aniso = gaussian_kernel(1.0, 3.0, 0.0).double()  # first axis (x) narrow, y wide
    assert float((aniso.sum(0) * r**2).sum()) < float((aniso.sum(1) * r**2).sum())
    with pytest.raises(ValueError, match="odd size"):
        gaussian_kernel(1.0, 1.0, size=4)


def test_random_kernels_are_valid_psfs_and_seeded() -> None:
    for make in (random_gaussian_kernel, random_motion_kernel):
        ks = [make(np.random.default_rng(7), 25) for _ in range(2)]
        assert torch.equal(ks[0], ks[1])
        for k in [*ks, make(np.random.default_rng(8), 25)]:
            assert k.shape == (25, 25) and float(k.min()) >= 0 and abs(float(k.sum()) - 1) < 1e-5
    pool = kernel_pool("motion", 4, seed=3)
    assert pool.shape == (4, 25, 25) and torch.equal(pool, kernel_pool("motion", 4, seed=3))
    with pytest.raises(ValueError, match="not one of"):
        kernel_pool("disk", 1, 0)


def _same_up_to_placement(a: torch.Tensor, b: torch.Tensor) -> bool:
    """True when ``b`` equals ``a`` zero-padded and shifted somewhere inside it (or vice versa)."""
    if a.shape[0] > b.shape[0]:
        a, b = b, a
    n, m = a.shape[0], b.shape[0]
    return any(torch.allclose(F.pad(a, (dx, m - n - dx, dy, m - n - dy)), b, atol=1e-6)
               for dy in range(m - n + 1) for dx in range(m - n + 1))


def test_training_kernels_never_contain_levin_test_kernels(shared_data) -> None:
    kdir = shared_data / "deblur" / "kernels"
    levin = load_levin(kdir / "levin09_kernels.npz")
    assert len(levin) == 8 and all(abs(float(k.sum()) - 1) < 1e-5 for k in levin)
    full = load_kernels12(kdir / "kernels_12.mat", drop_levin=False)["motion"]
    dropped = [full[i - 8] for i in LEVIN_IN_KERNELS12]
    assert all(any(_same_up_to_placement(d, lk) for lk in levin) for d in dropped)
    train = load_kernels12(kdir / "kernels_12.mat")
    assert len(train["gaussian"]) == 8 and len(train["motion"]) == 2
    for k in [*train["gaussian"], *train["motion"], *kernel_pool("motion", 20, 0, kdir / "kernels_12.mat")]:
        assert not any(_same_up_to_placement(k, lk) for lk in levin)
    for spec in GAUSSIAN_TEST:  # the Gaussian test kernels are not training kernels either
        assert all(float((gaussian_kernel(*spec) - g).abs().max()) > 1e-3 for g in train["gaussian"])


def test_wiener_inverts_a_blur_whose_otf_has_no_zeros() -> None:
    x = torch.rand(3, 32, 40, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    k = gaussian_kernel(0.7, 0.7, size=7).double()
    assert float(kernel_otf(k, 32, 40).abs().min()) > 0.01  # invertible without help
    back = wiener_deconv(circular_blur(x, k), k, 1e-9)
    torch.testing.assert_close(back, x, rtol=0, atol=1e-4)  # float32 FFTs, gain up to 1/0.03
    assert float((wiener_deconv(circular_blur(x, k), k, 1.0) - x).abs().max()) > 1e-2  # lam matters


def test_wiener_keeps_the_mean_and_takes_one_kernel_per_image() -> None:
    k = random_motion_kernel(np.random.default_rng(0), 25)
    flat = torch.full((3, 48, 48), 0.37)
    torch.testing.assert_close(wiener_deconv(flat, k, 0.5), flat, **FFT_TOL)  # gradient prior: DC untouched
    y = torch.rand(2, 3, 48, 48, generator=torch.Generator().manual_seed(1))
    ks = torch.stack([k, gaussian_kernel(1.5, 1.5)])
    both = wiener_deconv(y, ks, 0.01)
    for i in range(2):
        torch.testing.assert_close(both[i], wiener_deconv(y[i], ks[i], 0.01), **FFT_TOL)
    with pytest.raises(ValueError, match="lam > 0"):
        wiener_deconv(y, ks, 0.0)


def test_nonblind_task_is_the_blind_degradation_then_wiener() -> None:
    x = torch.rand(1, 3, 40, 40, generator=torch.Generator().manual_seed(2))
    k = random_motion_kernel(np.random.default_rng(3), 25)[None]
    blind, nonblind = get_task("deblur_motion"), get_task("deblur_motion_nonblind")
    y = degrade(x, blind, seeded_generator("a"), k)
    torch.testing.assert_close(degrade(x, nonblind, seeded_generator("a"), k),
                               wiener_deconv(y, k, nonblind.wiener or 0.0), **FFT_TOL)
    with pytest.raises(ValueError, match="pass the kernel|blurs; pass kernel"):
        degrade(x, nonblind, seeded_generator("a"))


def test_load_kernel_normalises_and_rejects_bad_files(tmp_path) -> None:
    from PIL import Image

    from examples.restoration.kernels import load_kernel

    k = np.zeros((5, 7))
    k[2, 1:6] = 2.0
    np.save(tmp_path / "k.npy", k)
    torch.testing.assert_close(load_kernel(tmp_path / "k.npy"), torch.from_numpy(k / 10).float())
    Image.fromarray((k * 100).astype(np.uint8)).save(tmp_path / "k.png")
    torch.testing.assert_close(load_kernel(tmp_path / "k.png"), torch.from_numpy(k / 10).float())
    for bad, match in ((np.ones((3, 3, 3)), "2-D"), (np.ones((80, 80)), "at most 64x64"),
                       (-np.ones((3, 3)), "non-negative")):
        np.save(tmp_path / "bad.npy", bad)
        with pytest.raises(ValueError, match=match):
            load_kernel(tmp_path / "bad.npy")
    with pytest.raises(FileNotFoundError):
        load_kernel(tmp_path / "missing.npy")
