"""The teacher-output cache: a cached-teacher step against a plain L1 step and a live-teacher step, and build times.

    python benchmarks/bench_teacher_cache.py                 # CPU, the CPU recipe's batch (16 x 32x32 LR)
    python benchmarks/bench_teacher_cache.py --quick         # smoke run (tiny shapes, random SPANs)

For each teacher (span_ch28, and CRAFT through spandrel when it is installed), on the
span_tiny_ch26 DSCLoRA student (Adam on the adapters), one full optimizer step of the same batch:

* ``plain L1``: student forward and backward with L1(SR, HR) only (no teacher);
* ``cached teacher``: 0.2 L1(SR, HR) + 0.8 L1(SR, T) with T the crop of the cached teacher SR
  (``examples.span_sr.dsclora.DSCLoRALoss(cached=True)``; the float16 targets moved to float32);
* ``live teacher``: the same loss with the teacher run on the batch (``convlora.distill.Distiller``).

The cases are interleaved round by round; ratios are per round against ``plain L1``. The batch is
cut from the first training images of ../shared/data/train/sr with their cached targets; the
time to cut it (``PatchDataset``, in the loader's workers during training) is reported per batch
with and without targets.

Build time: the cache is built for ``--build-images`` images spread over all the training
images (every n-th, sorted), timed, and extrapolated to all of them by their LR pixel count (a
teacher's cost is linear in pixels); the same for the upcycle regions (``data.upcycle_side``).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks._timing import (  # noqa: E402
    Stats,
    add_common_args,
    fmt_ms,
    fmt_ratio,
    load_note,
    markdown_table,
    ratio_stats,
    set_threads,
    time_interleaved,
)
from examples.span_sr import dsclora  # noqa: E402
from examples.span_sr.arch import SPAN, load_span  # noqa: E402
from examples.span_sr.config import LossConfig  # noqa: E402
from examples.span_sr.data import ImageSet, PatchDataset, image_refs, to_float, upcycle_region  # noqa: E402
from examples.span_sr.teacher import load_teacher  # noqa: E402
from examples.span_sr.teacher_cache import CacheSpec, TeacherCache, weights_digest  # noqa: E402

SHARED = REPO.parent / "shared" / "data"
WEIGHTS = SHARED / "weights"
TRAIN = SHARED / "train" / "sr"


def _spec(teacher: torch.nn.Module, kind: str) -> CacheSpec:
    return CacheSpec(teacher=weights_digest(teacher), architecture=type(teacher).__name__, compute="float32",
                     dtype="float32", tile=0, pad=0, scale=4, downscaler="matlab_bicubic_uint8" if kind == "lr" else "none",
                     lr_mode="cache", kind=kind)


def _teachers(quick: bool) -> dict[str, torch.nn.Module]:
    if quick or not (WEIGHTS / "span_ch28.pth").is_file():
        torch.manual_seed(1)
        return {"span (random, width 12)": SPAN(feature_channels=12).eval().requires_grad_(False)}
    out: dict[str, torch.nn.Module] = {"span_ch28": load_teacher(WEIGHTS / "span_ch28.pth", 4)}
    try:
        out["CRAFT"] = load_teacher(WEIGHTS / "craft_x4.pth", 4)
    except ImportError as err:
        print(f"note: CRAFT skipped: {err}")
    return out


def _lr_pixels(refs: list[str]) -> int:
    from PIL import Image

    total = 0
    for ref in refs:
        with Image.open(ref) as im:
            w, h = im.size
        total += (h // 4) * (w // 4)
    return total


def _step_rows(name: str, teacher: torch.nn.Module, base: SPAN, images: ImageSet, targets: list[np.ndarray],
               args: argparse.Namespace, device: torch.device) -> list[list[str]]:
    """The step table's rows of one teacher: plain L1, cached and live steps of the same batch, interleaved."""
    rows: list[list[str]] = []
    ds = PatchDataset(images, args.patch, 0, targets=targets)
    plain_ds = PatchDataset(images, args.patch, 0)
    items = [ds[k] for k in range(args.batch)]
    lr, hr, target = (torch.stack([it[j] for it in items]) for j in range(3))
    student = dsclora.build_student(base).to(device)
    params = [p for p in student.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=1e-9)
    teacher = teacher.to(device)
    cached = dsclora.make_loss(student, teacher, LossConfig(), None, 0.0, cached=True)
    live = dsclora.make_loss(student, teacher, LossConfig(), None, 0.0)

    def step_plain() -> None:
        x, y = to_float(lr, device), to_float(hr, device)
        loss = F.l1_loss(student(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    def step_cached() -> None:
        x, y, t = to_float(lr, device), to_float(hr, device), to_float(target, device)
        loss, _, _ = cached(x, y, step=0, target=t)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    def step_live() -> None:
        x, y = to_float(lr, device), to_float(hr, device)
        loss, _, _ = live(x, y, step=0)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    times = time_interleaved({"plain L1": step_plain, "cached teacher": step_cached,
                              "live teacher": step_live,
                              "batch cut (no targets)": lambda: [plain_ds[k] for k in range(args.batch)],
                              "batch cut (with targets)": lambda: [ds[k] for k in range(args.batch)]},
                             repeats=args.repeats, warmup=args.warmup, device=device)
    for case in ("plain L1", "cached teacher", "live teacher"):
        rows.append([name, case, fmt_ms(Stats.of(times[case])),
                     fmt_ratio(ratio_stats(times, case, "plain L1"))])
    for case in ("batch cut (no targets)", "batch cut (with targets)"):
        rows.append([name, case, fmt_ms(Stats.of(times[case])), ""])
    return rows


def _precision_row(name: str, base: SPAN, images: ImageSet, half: list[np.ndarray], exact: list[np.ndarray],
                   args: argparse.Namespace) -> list[str]:
    """How far float16 entries are from float32 ones, and what that does to the out-term and its gradient."""
    err = np.concatenate([(h.astype(np.float32) - e).ravel() for h, e in zip(half, exact)])
    student = dsclora.build_student(base)
    result = []
    for targets in (half, exact):
        ds = PatchDataset(images, args.patch, 0, targets=targets)
        items = [ds[k] for k in range(args.batch)]
        lr, target = torch.stack([it[0] for it in items]), torch.stack([it[2] for it in items])
        student.zero_grad()
        loss = F.l1_loss(student(lr.float() / 255), target)
        loss.backward()
        grad = torch.cat([p.grad.ravel() for p in student.parameters() if p.grad is not None])
        result.append((loss.item(), grad))
    (l16, g16), (l32, g32) = result
    return [name, f"{np.abs(err).max():.2g}", f"{np.abs(err).mean():.2g}", f"{err.mean():.1g}",
            f"{abs(l16 - l32) / l32:.1g}", f"{F.cosine_similarity(g16, g32, dim=0).item():.6f}"]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(ap, repeats=20, warmup=2)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--patch", type=int, default=32, help="LR patch side (default 32, the CPU recipe's)")
    ap.add_argument("--build-images", type=int, default=10, help="images the build is timed on (default 10)")
    ap.add_argument("--upcycle-side", type=int, default=128)
    args = ap.parse_args()
    set_threads(args.threads)
    device = torch.device(args.device)
    if args.quick:
        args.batch, args.patch, args.repeats, args.warmup, args.build_images = 4, 12, 2, 1, 2
    quick_data = args.quick or not TRAIN.is_dir()
    if quick_data:
        refs = ["skimage:astronaut", "skimage:coffee", "skimage:chelsea"]
        all_lr = sum(a.shape[0] * a.shape[1] for a in ImageSet.load(refs, 4).lr if a is not None)
    else:
        refs = image_refs([str(p) for p in sorted(TRAIN.iterdir()) if p.is_dir()])
        all_lr = _lr_pixels(refs)
    every = max(1, len(refs) // args.build_images)
    sample = refs[::every][: args.build_images]
    images = ImageSet.load(sample, 4)
    lrs = [np.asarray(a) for a in images.lr]
    regions = [upcycle_region(np.asarray(h), args.upcycle_side) for h in images.hr]
    sample_lr = sum(a.shape[0] * a.shape[1] for a in lrs)
    region_px = sum(r.shape[0] * r.shape[1] for r in regions)
    all_regions = len(refs) * args.upcycle_side ** 2 if args.upcycle_side else 16 * all_lr
    print(f"# bench_teacher_cache: {load_note()}, threads {args.threads}, torch {torch.__version__}")
    print(f"training images: {len(refs)} ({all_lr / 1e6:.1f} M LR pixels); build timed on {len(sample)} of them "
          f"(every {every}-th, {sample_lr / 1e6:.2f} M LR pixels) and extrapolated by pixel count\n")

    base = load_span(WEIGHTS / "span_tiny_ch26.pth") if not args.quick and (WEIGHTS / "span_tiny_ch26.pth").is_file() \
        else SPAN(feature_channels=8)
    rows, build_rows, precision_rows = [], [], []
    with tempfile.TemporaryDirectory() as tmp:
        for name, teacher in _teachers(args.quick).items():
            cache = TeacherCache(tmp, _spec(teacher, "lr"))
            t0 = time.perf_counter()
            cache.build(teacher, lrs, device=device, progress=False)
            t_lr = time.perf_counter() - t0
            up = TeacherCache(tmp, _spec(teacher, "upcycle"))
            t0 = time.perf_counter()
            up.build(teacher, regions, device=device, progress=False)
            t_up = time.perf_counter() - t0
            build_rows.append([name, f"{t_lr:.1f} s", f"{t_lr / sample_lr * 1e6:.2f} s/MP",
                               f"{t_lr / sample_lr * all_lr / 60:.1f} min",
                               f"{t_up / region_px * all_regions / 60:.1f} min"])

            exact = [np.asarray(a) for a in cache.read(lrs)]
            half = [a.astype(np.float16) for a in exact]  # what a float16 cache stores (the same forward, rounded)
            rows += _step_rows(name, teacher, base, images, half, args, device)
            precision_rows.append(_precision_row(name, base, images, half, exact, args))
            teacher.cpu()
    print(f"## one optimizer step, batch {args.batch} x {args.patch}x{args.patch} LR, {args.repeats} interleaved rounds"
          "\n(median [q1, q3]; ratio per round against plain L1)\n")
    print(markdown_table(["teacher", "step", "time (ms)", "ratio vs plain L1"], rows))
    print(f"\n## float16 against float32 cache entries ({len(sample)} images; batch {args.batch} x {args.patch}x{args.patch}"
          " for the loss and its gradient on the adapters)\n")
    print(markdown_table(["teacher", "max abs error", "mean abs error", "mean signed error", "L1(SR, T) rel. diff",
                          "gradient cosine"], precision_rows))
    print(f"\n## cache build on {device} (float32 forward)\n")
    print(markdown_table(["teacher", f"{len(sample)} images (measured)", "per M LR pixels",
                          f"all {len(refs)} images (extrapolated)",
                          f"upcycle regions {args.upcycle_side}px, all images (extrapolated)"], build_rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
