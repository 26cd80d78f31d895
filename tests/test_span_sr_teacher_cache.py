"""Teacher-output cache and upcycled inputs (examples/span_sr/teacher_cache.py, data.py, dsclora.py, train.py).

Tiny random SPANs and crops of scikit-image photos: the key changes with each of its parts; an
interrupted build resumes and gives what an uninterrupted one gives; cached targets equal the live
teacher where the two must agree (whole-image patches, no augmentation), down to whole training
runs; upcycled batches have the share asked for on every rank; bad combinations are refused.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch

import convlora
from examples.span_sr import dsclora, train
from examples.span_sr.arch import SPAN
from examples.span_sr.config import LossConfig
from examples.span_sr.data import (
    ImageSet,
    PatchDataset,
    rank_batches,
    upcycle_region,
    upcycled_rows,
)
from examples.span_sr.teacher_cache import CacheSpec, TeacherCache, input_digest, weights_digest
from tests._span_helpers import tiny_run_inputs

pytestmark = pytest.mark.usefixtures("one_thread")
REPO = Path(__file__).resolve().parents[1]


def _span(width: int, seed: int) -> SPAN:
    torch.manual_seed(seed)
    return SPAN(feature_channels=width).eval()


def _spec(**kw: object) -> CacheSpec:
    fields = dict(teacher="t" * 64, architecture="SPAN:", compute="float32", dtype="float32", tile=0, pad=0, scale=4,
                  downscaler="matlab_bicubic_uint8", lr_mode="cache", kind="lr")
    fields.update(kw)
    return CacheSpec(**fields)  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def photos(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Five 64x64 training crops (LR 16x16: one patch is the whole image) and one validation crop."""
    crops = [(slice(70 * i, 70 * i + 64), slice(120, 184)) for i in range(5)]
    return tiny_run_inputs(tmp_path_factory.mktemp("photos"), crops, (slice(100, 164), slice(200, 264)),
                           _span(8, 0), _span(12, 1))


@pytest.fixture(scope="module")
def images(photos: dict[str, Path]) -> ImageSet:
    return ImageSet.load(sorted(str(p) for p in photos["train"].iterdir()), 4)


def test_key_changes_with_every_part_of_it() -> None:
    spec = _spec()
    image = np.zeros((6, 5, 3), np.uint8)
    folder = Path("cache")
    key = TeacherCache(folder, spec).key(image)
    assert TeacherCache(folder, _spec()).key(image.copy()) == key  # a function of the parts only
    changed = {"teacher": "u" * 64, "architecture": "SpandrelTeacher:CRAFT", "compute": "bfloat16",
               "dtype": "float16", "tile": 8, "scale": 2, "downscaler": "none", "kind": "upcycle", "version": 2}
    assert set(changed) | {"pad", "lr_mode"} == {f.name for f in dataclasses.fields(CacheSpec)}
    for name, value in changed.items():
        assert TeacherCache(folder, dataclasses.replace(spec, **{name: value})).key(image) != key, name
    tiled = _spec(tile=8, pad=4)
    assert TeacherCache(folder, dataclasses.replace(tiled, pad=5)).key(image) != TeacherCache(folder, tiled).key(image)
    assert _spec(pad=7) == spec  # no margin without tiles: 'whole image' is one key
    for other in (image + 1, image[:5], image.transpose(1, 0, 2), image.astype(np.uint16)):
        assert TeacherCache(folder, spec).key(np.ascontiguousarray(other)) != key
    assert input_digest(image) != input_digest(image[:, :4])
    # the weights digest sees every value
    a, b = _span(8, 0), _span(8, 0)
    assert weights_digest(a) == weights_digest(b)
    with torch.no_grad():
        b.conv_cat.bias[0] += 1e-7
    assert weights_digest(a) != weights_digest(b)
    with pytest.raises(ValueError, match="lr_mode 'cache'"):
        _spec(lr_mode="float")


class _Interrupt(Exception):
    pass


class _Counting(torch.nn.Module):
    """A teacher that counts its calls and can be told to fail at the n-th."""

    def __init__(self, net: SPAN, fail_at: int = 0) -> None:
        super().__init__()
        self.net, self.upscale, self.calls, self.fail_at = net, net.upscale, 0, fail_at

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        if self.calls == self.fail_at:
            raise _Interrupt
        return self.net(x)


def test_interrupted_build_resumes_and_equals_an_uninterrupted_one(images: ImageSet, tmp_path: Path) -> None:
    lrs = [np.asarray(a) for a in images.lr]
    net = _span(12, 1)
    spec = _spec(teacher=weights_digest(net))
    fresh = TeacherCache(tmp_path / "fresh", spec)
    assert fresh.build(_Counting(net), lrs, progress=False) == len(lrs)
    broken = TeacherCache(tmp_path / "resumed", spec)
    with pytest.raises(_Interrupt):
        broken.build(_Counting(net, fail_at=3), lrs, progress=False)
    assert len(broken.missing(lrs)) == len(lrs) - 2
    assert not list(broken.root.glob(".*.tmp"))  # no half-written entry
    again = _Counting(net)
    assert broken.build(again, lrs, progress=False) == len(lrs) - 2 and again.calls == len(lrs) - 2
    assert broken.build(again, lrs, progress=False) == 0 and again.calls == len(lrs) - 2
    for a, b in zip(fresh.read(lrs), broken.read(lrs)):
        assert np.array_equal(a, b)
    assert json.loads((broken.root / "spec.json").read_text()) == dataclasses.asdict(spec)
    # two ranks build disjoint halves
    split = TeacherCache(tmp_path / "split", spec)
    assert [split.build(net, lrs, rank=r, world=2, progress=False) for r in (0, 1)] == [3, 2]
    assert split.missing(lrs) == []


def test_cached_targets_equal_the_live_teacher_on_whole_image_patches(images: ImageSet, tmp_path: Path) -> None:
    teacher, student = _span(12, 1), dsclora.build_student(_span(8, 0))
    lrs = [np.asarray(a) for a in images.lr]
    # float32 round-off of another batch size (1e-5 of the output's range; random SPANs give |SR| ~ 5),
    # plus for float16 half a step (2^-11 of the value)
    for dtype, rtol in (("float32", 0.0), ("float16", 2.0**-11)):
        cache = TeacherCache(tmp_path, _spec(teacher=weights_digest(teacher), dtype=dtype))
        cache.build(teacher, lrs, progress=False)
        ds = PatchDataset(images, 16, seed=0, augment=False, targets=cache.read(lrs))
        lr, hr, target, real = (torch.stack(t) for t in zip(*(ds[k] for k in range(6))))
        assert real.all() and lr.shape == (6, 3, 16, 16)
        with torch.no_grad():
            live = teacher(lr.float() / 255)
        assert ((target - live).abs() <= 1e-5 * live.abs().max() + rtol * live.abs()).all(), dtype
    # a tiled build (margin = SPAN's receptive-field radius) gives the whole-image entries to round-off
    whole = TeacherCache(tmp_path, _spec(teacher=weights_digest(teacher)))
    tiled = TeacherCache(tmp_path, _spec(teacher=weights_digest(teacher), tile=8, pad=21))
    tiled.build(teacher, lrs, progress=False)
    for a, b in zip(whole.read(lrs), tiled.read(lrs)):
        assert np.abs(a - b).max() <= 1e-5 * np.abs(a).max()
    # the loss: cached equals live on these batches (float32 targets), for each pixel loss
    cache = TeacherCache(tmp_path, _spec(teacher=weights_digest(teacher)))
    ds = PatchDataset(images, 16, seed=0, augment=False, targets=cache.read(lrs))
    lr, hr, target, _ = (torch.stack(t) for t in zip(*(ds[k] for k in range(4))))
    x, y = lr.float() / 255, hr.float() / 255
    totals = {}
    for pixel in ("l1", "mse"):
        loss = LossConfig(pixel=pixel)
        cached = dsclora.make_loss(student, teacher, loss, None, 0.0, cached=True)
        live_loss = dsclora.make_loss(student, teacher, loss, None, 0.0)
        a, pa, _ = cached(x, y, step=0, target=target)
        b, pb, _ = live_loss(x, y, step=0)
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6)
        assert pa.keys() == pb.keys()
        totals[pixel] = float(a)
    assert totals["l1"] != totals["mse"]
    with pytest.raises(ValueError, match="w_aff"):
        dsclora.make_loss(student, teacher, loss, None, 0.1, cached=True)


def _args(photos: dict[str, Path], out: Path, *extra: str) -> list[str]:
    return ["--config", str(REPO / "examples/span_sr/configs/demo.yaml"), "--out", str(out),
            "--data.train", str(photos["train"]), "--data.val", str(photos["val"]),
            "--data.cache_dir", str(out.parent / "cache"), "--data.patch", "16", "--data.batch", "4",
            "--data.workers", "0", "--base", str(photos["base"]), "--teacher", str(photos["teacher"]),
            "--demo.enabled", "false", "--train.steps", "4", "--train.warmup", "1", "--train.lr", "1e-3",
            "--train.log_every", "1", "--train.val_every", "0", "--train.ckpt_every", "0",
            "--train.progress", "false", "--train.threads", "1", "--loss.w_aff", "0", "--data.augment", "false",
            *extra]


def _rows(run: Path) -> list[dict[str, float]]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [{k: r[k] for k in ("step", "loss", "rec", "out")} for r in rows if "loss" in r]


def test_cached_run_equals_live_run(photos: dict[str, Path], tmp_path: Path) -> None:
    """Whole-image patches, no augmentation: a cached-teacher run trains like a live-teacher run."""
    live, cached = tmp_path / "live", tmp_path / "cached"
    assert train.main(_args(photos, live)) == 0
    assert train.main(_args(photos, cached, "--teacher_cache.enabled", "true", "--teacher_cache.dtype",
                            "float32")) == 0
    a, b = _rows(live), _rows(cached)
    assert [r["step"] for r in a] == [r["step"] for r in b] == [1, 2, 3, 4]
    for ra, rb in zip(a, b):
        for k in ("loss", "rec", "out"):
            assert rb[k] == pytest.approx(ra[k], rel=1e-5, abs=1e-7), (ra["step"], k)
    wa, wb = convlora.read_adapter(live / "adapter.safetensors")[0], convlora.read_adapter(cached / "adapter.safetensors")[0]
    for key in wa:
        torch.testing.assert_close(wb[key], wa[key], atol=1e-5, rtol=1e-4)
    prov = json.loads((cached / "provenance.json").read_text())
    assert set(prov["teacher_cache"]) == {"lr"}
    # a second cached run finds every entry built
    again = tmp_path / "again"
    assert train.main(_args(photos, again, "--teacher_cache.enabled", "true", "--teacher_cache.dtype",
                            "float32", "--teacher_cache.dir", prov["teacher_cache"]["lr"]["folder"] + "/..")) == 0
    assert _rows(again) == b


def test_upcycled_batches_have_the_share_asked_for(images: ImageSet, tmp_path: Path) -> None:
    for batch, share in ((8, 0.25), (16, 0.5), (6, 1 / 3), (4, 1.0)):
        rows = upcycled_rows(batch, share)
        assert sum(rows) == round(share * batch)
    teacher = _span(12, 1)
    regions = [upcycle_region(np.asarray(hr), 40) for hr in images.hr]
    assert all(r.shape == (40, 40, 3) for r in regions)
    cache = TeacherCache(tmp_path, _spec(teacher=weights_digest(teacher), kind="upcycle", downscaler="none"))
    cache.build(teacher, regions, progress=False)
    lr_cache = TeacherCache(tmp_path, _spec(teacher=weights_digest(teacher)))
    lr_cache.build(teacher, [np.asarray(a) for a in images.lr], progress=False)
    ds = PatchDataset(images, 8, seed=5, targets=lr_cache.read([np.asarray(a) for a in images.lr]), upcycle=regions,
                      upcycle_targets=cache.read(regions), share=0.25, batch=8)
    for world in (1, 2):
        for rank in range(world):
            for ks in rank_batches(0, 3, 8, rank, world):
                items = [ds[k] for k in ks]
                up = [not bool(it[3]) for it in items]
                assert sum(up) == 2 // world
                for (lr, hr, target, real) in items:
                    assert lr.dtype == hr.dtype == torch.uint8 and target.shape == hr.shape == (3, 32, 32)
                    assert lr.shape == (3, 8, 8)
                    if not real:
                        assert not hr.any()  # no HR: the rec term skips the row
    # an upcycled input is an LR-sized crop of an HR region, and its target is the crop of that region's SR
    k = next(k for k in range(64) if not bool(ds[k][3]))
    plain = PatchDataset(images, 8, seed=5, augment=False, targets=ds.targets, upcycle=regions,
                         upcycle_targets=ds.upcycle_targets, share=0.25, batch=8)
    lr, _, target, real = plain[k]
    assert not real
    hits = [(i, y, x) for i, r in enumerate(regions) for y in range(33) for x in range(33)
            if np.array_equal(r[y:y + 8, x:x + 8].transpose(2, 0, 1), lr.numpy())]
    assert hits
    i, y, x = hits[0]
    expected = np.asarray(ds.upcycle_targets[i])[y * 4:(y + 8) * 4, x * 4:(x + 8) * 4].transpose(2, 0, 1)
    assert np.array_equal(target.numpy(), expected)
    # the real rows of a batch with upcycled rows are the rows of the same indices without them
    base_ds = PatchDataset(images, 8, seed=5)
    for kk in range(8):
        if bool(ds[kk][3]):
            assert torch.equal(ds[kk][1], base_ds[kk][1])


def test_colour_inversion_is_undone_on_the_cached_target(images: ImageSet, tmp_path: Path) -> None:
    teacher = _span(12, 1)
    lrs = [np.asarray(a) for a in images.lr]
    cache = TeacherCache(tmp_path, _spec(teacher=weights_digest(teacher)))
    cache.build(teacher, lrs, progress=False)
    plain = PatchDataset(images, 8, seed=2, targets=cache.read(lrs))
    inverted = PatchDataset(images, 8, seed=2, targets=cache.read(lrs), invert=1.0)
    for k in range(4):
        a, b = plain[k], inverted[k]
        assert torch.equal(b[0], 255 - a[0]) and torch.equal(b[1], 255 - a[1])
        torch.testing.assert_close(b[2], 1.0 - a[2])


def test_upcycled_training_runs_live_and_cached(photos: dict[str, Path], tmp_path: Path) -> None:
    for name, extra in (("live", ()), ("cached", ("--teacher_cache.enabled", "true"))):
        run = tmp_path / name
        assert train.main(_args(photos, run, "--data.patch", "8", "--data.upcycle_share", "0.5",
                                "--data.upcycle_side", "32", "--data.augment", "true", *extra)) == 0
        rows = _rows(run)
        assert len(rows) == 4 and all(np.isfinite(r["loss"]) for r in rows)
    prov = json.loads((tmp_path / "cached" / "provenance.json").read_text())
    assert set(prov["teacher_cache"]) == {"lr", "upcycle"}


@pytest.mark.parametrize(("extra", "match"), [
    (("--teacher_cache.enabled", "true", "--data.lr_mode", "float"), "lr_mode 'cache'"),
    (("--teacher_cache.enabled", "true", "--loss.w_aff", "0.1"), "features at every step"),
    (("--data.upcycle_share", "0.1"), "is no row"),
    (("--data.upcycle_share", "0.5", "--data.upcycle_side", "8"), "smaller than the 16x16"),
    (("--data.upcycle_share", "1.5"), r"data.upcycle_share.*out of range.*<= 1"),
    (("--teacher_cache.tile", "-1"), r"teacher_cache.tile.*out of range"),
    (("--teacher_cache.dtype", "uint8"), "not one of"),
])
def test_bad_settings_are_refused_before_the_run_folder(photos: dict[str, Path], tmp_path: Path,
                                                        extra: tuple[str, ...], match: str) -> None:
    run = tmp_path / "run"
    with pytest.raises(ValueError, match=match):
        train.main(_args(photos, run, *extra))
    assert not run.exists()


def test_upcycled_rows_must_split_evenly_over_the_ranks() -> None:
    from examples.span_sr.config import load_config

    cfg = load_config(None, {"data.batch": "8", "data.upcycle_share": "0.375"})  # 3 rows of 8
    train.distill_checks(cfg, 1)
    with pytest.raises(ValueError, match="not divisible by 2 processes"):
        train.distill_checks(cfg, 2)
    cfg.data.upcycle_share = 0.25  # 2 rows: one per rank
    train.distill_checks(cfg, 2)
    assert [sum(upcycled_rows(8, 0.25)[r * 4:(r + 1) * 4]) for r in range(2)] == [1, 1]
