"""Training data pipeline of the DSCLoRA example (examples/span_sr/data.py)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from skimage import data as skdata

from examples.span_sr.data import (
    ImageSet,
    PatchDataset,
    image_refs,
    rank_batches,
    row_kinds,
    split_holdout,
    upcycled_rows,
)
from examples.span_sr.degrade import imresize_matlab
from examples.span_sr.images import load_packed, read_image, save_packed


@pytest.fixture()
def folder(tmp_path: Path) -> Path:
    """Four crops of a real photo (different sizes, one too small for a 64-pixel HR patch)."""
    img = skdata.astronaut()
    root = tmp_path / "hr"
    root.mkdir()
    for i, (h, w) in enumerate([(70, 90), (96, 66), (81, 77), (40, 120)]):
        Image.fromarray(img[30 * i:30 * i + h, 50:50 + w]).save(root / f"img{i}.png")
    return root


def test_packed_round_trip_is_lossless_and_smaller(tmp_path: Path) -> None:
    img = skdata.coffee()
    save_packed(tmp_path / "c.u8.xz", img)
    assert np.array_equal(load_packed(tmp_path / "c.u8.xz"), img)
    assert np.array_equal(read_image(str(tmp_path / "c.u8.xz")), img)
    Image.fromarray(img).save(tmp_path / "c.png")
    assert (tmp_path / "c.u8.xz").stat().st_size < (tmp_path / "c.png").stat().st_size
    with pytest.raises(ValueError, match="uint8 HxWx3"):
        save_packed(tmp_path / "bad.u8.xz", img.astype(np.float32))


def test_image_refs_errors(folder: Path, tmp_path: Path) -> None:
    assert [Path(r).name for r in image_refs([str(folder)])] == [f"img{i}.png" for i in range(4)]
    (folder / ".hidden").write_text("ignored")
    assert len(image_refs([str(folder)])) == 4
    with pytest.raises(FileNotFoundError, match="does not exist"):
        image_refs([str(tmp_path / "nope")])
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="holds no images"):
        image_refs([str(tmp_path / "empty")])
    (folder / "notes.txt").write_text("not an image")
    with pytest.raises(ValueError, match="not images"):
        image_refs([str(folder)])


def test_corrupt_image_is_named(tmp_path: Path) -> None:
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"\x89PNG but not really")
    with pytest.raises(ValueError, match="broken.png"):
        ImageSet.load([str(bad)], 4)


def test_skimage_sources_and_motorcycle_pair() -> None:
    left, right = read_image("skimage:stereo_motorcycle_left"), read_image("skimage:stereo_motorcycle_right")
    assert left.shape == right.shape and left.dtype == np.uint8 and not np.array_equal(left, right)
    with pytest.raises(ValueError, match="no bundled image"):
        read_image("skimage:no_such_picture")


def test_holdout_split_is_stable_and_disjoint() -> None:
    refs = [f"/a/{i:03d}.png" for i in range(50)]
    train, val = split_holdout(refs, 5)
    assert len(val) == 5 and not set(train) & set(val) and sorted(train + val) == refs
    shuffled = refs[::-1]
    assert sorted(split_holdout(shuffled, 5)[1]) == sorted(val)  # depends on names only
    with pytest.raises(ValueError, match="cannot hold out"):
        split_holdout(refs[:3], 3)


def test_small_images_skipped_with_warning_or_error(folder: Path) -> None:
    refs = image_refs([str(folder)])
    with pytest.warns(UserWarning, match="img3.png"):
        images = ImageSet.load(refs, 4, min_hr=64)
    assert [Path(r).name for r in images.refs] == ["img0.png", "img1.png", "img2.png"]
    with pytest.raises(ValueError, match="smaller than the 64x64 HR patch"):
        ImageSet.load(refs, 4, min_hr=64, small="error")


def test_cached_lr_is_matlab_bicubic_of_modcropped_hr(folder: Path, tmp_path: Path) -> None:
    refs = image_refs([str(folder)])[:2]
    first = ImageSet.load(refs, 4, cache_dir=tmp_path / "cache")
    assert len(list((tmp_path / "cache").glob("*.npy"))) == 4  # HR + LR per image
    again = ImageSet.load(refs, 4, cache_dir=tmp_path / "cache")  # read back from the cache
    for hr, lr, hr2, lr2 in zip(first.hr, first.lr, again.hr, again.lr):
        assert hr.shape[0] % 4 == 0 and hr.shape[1] % 4 == 0
        assert np.array_equal(lr, imresize_matlab(np.ascontiguousarray(hr), 0.25))
        assert np.array_equal(hr, hr2) and np.array_equal(lr, lr2)


def test_patches_are_a_pure_function_of_seed_and_index(folder: Path) -> None:
    images = ImageSet.load(image_refs([str(folder)]), 4, min_hr=32, small="skip")
    ds = PatchDataset(images, 8, seed=3)
    lr, hr = ds[17]
    assert lr.shape == (3, 8, 8) and hr.shape == (3, 32, 32) and lr.dtype == hr.dtype == torch.uint8
    fresh = PatchDataset(images, 8, seed=3)
    for k in (0, 17, 12345):
        a, b = ds[k], fresh[k]
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(ds[17][1], PatchDataset(images, 8, seed=4)[17][1])
    # the LR patch is the same crop/flip/rotation of the cached LR as the HR patch is of the HR
    for k in range(20):
        lr, hr = ds[k]
        down = imresize_matlab(np.ascontiguousarray(hr.permute(1, 2, 0).numpy()), 0.25)
        inner = (slice(2, -2), slice(2, -2))  # away from the patch border (bicubic support)
        diff = np.abs(down.astype(int) - lr.permute(1, 2, 0).numpy().astype(int))
        assert diff[inner].max() <= 1


def test_float_mode_makes_lr_on_the_fly(folder: Path) -> None:
    images = ImageSet.load(image_refs([str(folder)])[:3], 4, lr_mode="float")
    assert images.lr == [None, None, None]
    lr, hr = PatchDataset(images, 8, seed=0)[5]
    assert lr.dtype == torch.float32 and lr.shape == (3, 8, 8) and lr.min() >= 0 and lr.max() <= 1
    ref = imresize_matlab(np.ascontiguousarray(hr.permute(1, 2, 0).numpy()), 0.25).astype(np.float64) / 255
    err = np.abs(lr.permute(1, 2, 0).numpy() - ref)
    assert err.max() <= 1 / 255 and err.max() > 0  # MATLAB rounds after each pass, the float variant never


def test_rank_batches_shard_the_global_batch() -> None:
    one = list(rank_batches(3, 6, 8))
    two = [list(rank_batches(3, 6, 8, rank=r, world=2)) for r in range(2)]
    assert one[0] == list(range(24, 32))
    for step in range(3):
        assert two[0][step] + two[1][step] == one[step]
    with pytest.raises(ValueError, match="not divisible"):
        list(rank_batches(0, 1, 6, world=4))


def test_row_kinds_keep_the_real_rows_even_over_the_ranks() -> None:
    checked = 0
    for batch, up, only in ((16, 0.25, 0.25), (8, 0.125, 0.375), (12, 0.0, 0.5), (4, 0.0, 1.0), (6, 0.5, 0.0)):
        kinds = row_kinds(batch, up, only)
        assert kinds.count("upcycle") == round(up * batch) and kinds.count("teacher_only") == round(only * batch)
        free = batch - kinds.count("real")
        for world in (2, 4):
            if batch % world or free % world:
                continue
            local = batch // world
            assert [kinds[r * local:(r + 1) * local].count("real") for r in range(world)] == \
                [(batch - free) // world] * world
            checked += 1
        if not only:  # without teacher-only rows the pattern is the upcycled one
            assert [k == "upcycle" for k in kinds] == upcycled_rows(batch, up)
    assert checked >= 4
    with pytest.raises(ValueError, match="more than the batch's 8 rows"):
        row_kinds(8, 0.5, 0.625)


def test_teacher_only_rows_are_patches_of_their_images_without_an_hr(folder: Path, tmp_path: Path) -> None:
    images = ImageSet.load(image_refs([str(folder)])[:3], 4)
    other = tmp_path / "only"
    other.mkdir()
    coffee = skdata.coffee()
    for i in range(2):
        Image.fromarray(coffee[60 * i:60 * i + 64, 100:180]).save(other / f"c{i}.png")
    only = ImageSet.load(image_refs([str(other)]), 4)
    rng = np.random.default_rng(0)  # stand-ins for the teacher's SR of each whole LR: the rows crop them
    targets = [rng.random(h.shape, dtype=np.float32) for h in images.hr]
    only_targets = [rng.random(h.shape, dtype=np.float32) for h in only.hr]
    kw = dict(augment=False, targets=targets, batch=4)
    ds = PatchDataset(images, 8, 1, teacher_only=only, teacher_only_targets=only_targets, teacher_only_share=0.5, **kw)
    plain = PatchDataset(images, 8, 1, **kw)
    seen = set()
    for k in range(16):
        lr, hr, target, real = ds[k]
        assert lr.shape == (3, 8, 8) and hr.shape == target.shape == (3, 32, 32)
        if real:  # a real row is the row of the same index without teacher-only rows
            assert all(torch.equal(a, b) for a, b in zip(ds[k], plain[k]))
            continue
        assert not hr.any()  # no HR: the rec term skips the row
        hits = [(i, y, x) for i, a in enumerate(only.lr) for y in range(a.shape[0] - 7) for x in range(a.shape[1] - 7)
                if np.array_equal(a[y:y + 8, x:x + 8].transpose(2, 0, 1), lr.numpy())]
        assert hits
        i, y, x = hits[0]
        assert np.array_equal(target.numpy(), only_targets[i][4 * y:4 * y + 32, 4 * x:4 * x + 32].transpose(2, 0, 1))
        seen.add(i)
    assert sum(not bool(ds[k][3]) for k in range(16)) == 8 and seen == {0, 1}
    again = PatchDataset(images, 8, 1, teacher_only=only, teacher_only_targets=only_targets, teacher_only_share=0.5,
                         **kw)
    assert all(torch.equal(a, b) for k in (1, 3, 9) for a, b in zip(ds[k], again[k]))  # a function of (seed, k)
    # float mode: a teacher-only row's LR is made from its HR patch on the fly, like a real row's
    images_f, only_f = (ImageSet.load(s.refs, 4, lr_mode="float") for s in (images, only))
    ds_f = PatchDataset(images_f, 8, 1, augment=False, teacher_only=only_f, teacher_only_share=0.5, batch=4)
    lr_f, hr_f, target_f, real_f = ds_f[1]
    assert not real_f and not hr_f.any() and target_f.numel() == 0 and lr_f.dtype == torch.float32
    inner = (slice(None), slice(2, -2), slice(2, -2))  # away from the patch border (bicubic support)
    assert (lr_f[inner] - ds[1][0][inner].float() / 255).abs().max() <= 1 / 255
    with pytest.raises(ValueError, match="teacher-only images"):
        PatchDataset(images, 8, 1, teacher_only_share=0.5, batch=4)
    with pytest.raises(ValueError, match="or neither"):
        PatchDataset(images, 8, 1, targets=targets, teacher_only=only, teacher_only_share=0.5, batch=4)
    with pytest.raises(ValueError, match="scale and LR mode"):
        PatchDataset(images, 8, 1, teacher_only=only_f, teacher_only_share=0.5, batch=4)
