"""Training data for DSCLoRA: image sources -> cached (LR, HR) arrays -> random patch batches.

* Sources (:func:`image_refs`): folders of images (searched recursively), single files, or
  ``skimage:NAME`` photos; decoded by :func:`examples.span_sr.images.read_image`.
  :func:`split_holdout` keeps some training images aside for validation, chosen by name.
* :class:`ImageSet`: every image is decoded once, mod-cropped to a multiple of the scale, and its
  LR made once with the MATLAB-exact bicubic (:func:`degrade.imresize_matlab`, ``lr_mode="cache"``,
  the default: the test sets' LR are made exactly so, uint8 rounding included, so training sees the
  test degradation). Both arrays are cached on disk (``.npy``) keyed by file path, size and mtime.
  ``lr_mode="float"`` instead downsizes each HR patch on the fly with the float variant
  (:func:`degrade.imresize_torch`, no rounding; borders of the patch are mirrored).
* :class:`PatchDataset` maps a *global sample index* ``k = step * global_batch + j`` to one
  augmented pair; its randomness (image, crop, flip, rot90) is a pure function of
  ``(seed, k)``, so resuming or changing the number of workers or DDP ranks reproduces exactly
  the same batches. :func:`rank_batches` shards each global batch by rank.
* Rows without an HR term (:func:`row_kinds`): a fixed count of each global batch can be
  *upcycled* (LR-sized crops of the HR images fed as inputs, ``data.upcycle_share``) or
  *teacher-only* (patches of images that are used as inputs only, labelled by the teacher alone:
  ``data.teacher_only`` folders, e.g. lossy JPEGs whose HR has artefacts, ``data.teacher_only_share``).
"""

from __future__ import annotations

import hashlib
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from examples.span_sr.checkpoint import write_atomically
from examples.span_sr.degrade import imresize_matlab, imresize_torch, modcrop
from examples.span_sr.images import SKIMAGE_PHOTOS, list_images, read_image

__all__ = [
    "ImageSet",
    "PatchDataset",
    "image_refs",
    "rank_batches",
    "row_kinds",
    "split_holdout",
    "to_float",
    "upcycle_region",
    "upcycled_rows",
]


def image_refs(sources: Sequence[str]) -> list[str]:
    """Expand folders (recursively, sorted), image files and ``skimage:NAME`` entries into image references.

    Raises:
        FileNotFoundError: a source does not exist.
        ValueError: a folder holds no images, or files that are not images; a ``skimage:NAME``
            that is not one of ``images.SKIMAGE_PHOTOS``.
    """
    refs: list[str] = []
    for src in sources:
        if src.startswith("skimage:") and src.split(":", 1)[1] not in SKIMAGE_PHOTOS:
            raise ValueError(f"data source {src!r}: scikit-image has no bundled image of that name; use one of "
                             f"{', '.join('skimage:' + n for n in SKIMAGE_PHOTOS)}.")
        if src.startswith("skimage:") or Path(src).is_file():
            refs.append(src)
        elif not Path(src).exists():
            raise FileNotFoundError(f"data folder {src!r} does not exist; check --data.train / --data.val / "
                                    "--data.test (docs/data.md lists the data sets and where to get them).")
        else:
            refs.extend(str(p) for p in list_images(src, recursive=True))
    return refs


def split_holdout(refs: Sequence[str], n: int) -> tuple[list[str], list[str]]:
    """Split ``refs`` into ``(train, val)`` holding out ``n`` images chosen by a hash of their names.

    The choice depends on file names only (not on the seed or the order), so it is stable across
    runs and resumes. Raises ValueError if fewer than ``n + 1`` images are given.
    """
    if n < 0 or n >= len(refs):
        raise ValueError(f"cannot hold out {n} of {len(refs)} training images for validation; "
                         "lower --data.val_holdout or give --data.val folders.")
    ranked = sorted(refs, key=lambda r: hashlib.sha256(Path(r).name.encode()).hexdigest())
    val = set(ranked[:n])
    return [r for r in refs if r not in val], [r for r in refs if r in val]


def to_float(x: torch.Tensor, device: torch.device) -> torch.Tensor:
    """uint8 (or float) CHW batch -> float32 in [0, 1] on ``device`` (uint8 travels, floats are made there)."""
    x = x.to(device, non_blocking=True)
    return x.float().div_(255.0) if x.dtype == torch.uint8 else x.float()


def _cache_key(ref: str, scale: int, lr_mode: str) -> str:
    if ref.startswith("skimage:"):
        stamp = ref
    else:
        st = Path(ref).stat()
        stamp = f"{Path(ref).resolve()}|{st.st_size}|{st.st_mtime_ns}"
    return hashlib.sha256(f"v1|{stamp}|x{scale}|{lr_mode}".encode()).hexdigest()[:24]


def _save_npy(path: Path, arr: np.ndarray) -> None:
    def write(tmp: str) -> None:
        with open(tmp, "wb") as fh:
            np.save(fh, arr)

    write_atomically(path, write)


@dataclass
class ImageSet:
    """Decoded, mod-cropped HR images and their MATLAB-bicubic LR (``None`` in float mode)."""

    refs: list[str]
    hr: list[np.ndarray]
    lr: list[np.ndarray | None]
    scale: int

    @classmethod
    def load(cls, refs: Sequence[str], scale: int, *, lr_mode: str = "cache", cache_dir: str | Path | None = None,
             min_hr: int = 0, small: str = "skip", max_side: int = 0) -> ImageSet:
        """Decode ``refs`` once (or read them from ``cache_dir``) and make their LR.

        Args:
            min_hr: Images whose mod-cropped sides are below this are skipped with a warning
                (``small="skip"``) or rejected (``small="error"``).
            max_side: Centre-crop HR to at most this side before making the LR (validation).
        """
        if lr_mode not in ("cache", "float"):
            raise ValueError(f"lr_mode={lr_mode!r}; use 'cache' (MATLAB uint8 LR made once) or 'float'.")
        if small not in ("skip", "error"):
            raise ValueError(f"small={small!r}; use 'skip' or 'error'.")
        cache = Path(cache_dir) if cache_dir else None
        if cache is not None:
            cache.mkdir(parents=True, exist_ok=True)
        keep, hrs, lrs, tiny = [], [], [], []
        for ref in refs:
            key = _cache_key(ref, scale, lr_mode) + (f"_c{max_side}" if max_side else "")
            hr_file = cache / f"{key}.hr.npy" if cache else None
            lr_file = cache / f"{key}.lr.npy" if cache else None
            hr: np.ndarray
            lr: np.ndarray | None
            if hr_file is not None and lr_file is not None and hr_file.exists() and (lr_mode == "float" or lr_file.exists()):
                hr = np.load(hr_file, mmap_mode="r")
                lr = np.load(lr_file, mmap_mode="r") if lr_mode == "cache" else None
            else:
                hr = modcrop(read_image(ref), scale)
                if max_side:
                    hr = _center_crop(hr, max_side - max_side % scale)
                lr = imresize_matlab(np.ascontiguousarray(hr), 1.0 / scale) if lr_mode == "cache" else None
                if hr_file is not None and lr_file is not None:
                    _save_npy(hr_file, hr)
                    if lr is not None:
                        _save_npy(lr_file, lr)
            if min(hr.shape[:2]) < min_hr:
                tiny.append(f"{ref} ({hr.shape[1]}x{hr.shape[0]})")
                continue
            keep.append(ref)
            hrs.append(hr)
            lrs.append(lr)
        if tiny:
            msg = (f"{len(tiny)} image(s) smaller than the {min_hr}x{min_hr} HR patch: {tiny[:10]}"
                   + (" ..." if len(tiny) > 10 else ""))
            if small == "error" or not keep:
                raise ValueError(msg + "; lower --data.patch or remove them.")
            warnings.warn(msg + "; skipped.", stacklevel=2)
        return cls(keep, hrs, lrs, scale)


def _center_crop(img: np.ndarray, side: int) -> np.ndarray:
    h, w = img.shape[:2]
    top, left = max(0, (h - side) // 2), max(0, (w - side) // 2)
    return img[top:top + side, left:left + side]


def upcycle_region(hr: np.ndarray, side: int) -> np.ndarray:
    """The centre ``side`` x ``side`` crop of an HR image that upcycled inputs are cut from (``side=0``: all of it)."""
    return np.ascontiguousarray(_center_crop(hr, side) if side else hr)


def _spread(batch: int, m: int) -> list[bool]:
    """``m`` of ``batch`` rows, spread evenly: row ``j`` when ``floor((j + 1) m / B) > floor(j m / B)``."""
    return [((j + 1) * m) // batch > (j * m) // batch for j in range(batch)]


def upcycled_rows(batch: int, share: float) -> list[bool]:
    """Which of a global batch's rows are upcycled: ``round(share * batch)`` of them, spread evenly.

    Row ``j`` is upcycled when ``floor((j + 1) m / B) > floor(j m / B)`` (``m`` upcycled of ``B``):
    a function of ``j`` alone, so the pattern holds for any number of ranks and workers, and
    each of ``R`` ranks (consecutive slices of ``B / R`` rows) gets ``m / R`` of them when ``R``
    divides ``m``.
    """
    return _spread(batch, round(share * batch))


def row_kinds(batch: int, upcycle_share: float = 0.0, teacher_only_share: float = 0.0) -> list[str]:
    """The kind of each row of a global batch: ``"real"`` (it has an HR), ``"upcycle"`` or ``"teacher_only"``.

    ``m_u = round(upcycle_share * batch)`` rows are upcycled and ``m_t = round(teacher_only_share *
    batch)`` teacher-only; the ``m = m_u + m_t`` rows without an HR are spread evenly over the batch
    as in :func:`upcycled_rows` (so each of ``R`` ranks gets ``m / R`` of them, the same number of
    real rows, when ``R`` divides ``m``), and the upcycled ones evenly among those. Without
    teacher-only rows the pattern is :func:`upcycled_rows`'s. A function of the row index alone.

    Raises:
        ValueError: the two shares ask for more rows than the batch has.
    """
    m_u, m_t = round(upcycle_share * batch), round(teacher_only_share * batch)
    if m_u + m_t > batch:
        raise ValueError(f"data.upcycle_share={upcycle_share} ({m_u} rows) and data.teacher_only_share="
                         f"{teacher_only_share} ({m_t} rows) ask for more than the batch's {batch} rows; lower "
                         "one of them (their sum is at most 1).")
    free, upcycled = _spread(batch, m_u + m_t), iter(_spread(m_u + m_t, m_u))
    return [("upcycle" if next(upcycled) else "teacher_only") if f else "real" for f in free]


class PatchDataset(torch.utils.data.Dataset):
    """Global sample index -> ``(lr, hr)`` CHW patch pair; randomness is a function of ``(seed, index)``.

    ``lr`` is uint8 in cache mode and float32 in [0, 1] in float mode; ``hr`` is uint8.
    The index ``k = step * global_batch + j`` names the step and the sample within it.

    With teacher targets, upcycled or teacher-only rows, or colour inversion, an item is
    ``(lr, hr, target, real)``: ``target`` is the float32 crop of the cached teacher SR at the HR
    patch's place with the same flips (an empty tensor with a live teacher), ``real`` whether the
    row has an HR. The kind of row ``k % batch`` is :func:`row_kinds`'s. Upcycled rows take an
    LR-sized crop of ``upcycle[i]`` (an HR region, :func:`upcycle_region`) as input, an all-zero
    HR and the crop of ``upcycle_targets[i]`` (the teacher's SR of that region) as target.
    Teacher-only rows take a patch of one of the ``teacher_only`` images, cut as a real row's is
    (its LR: the cached MATLAB-bicubic LR or, in float mode, made from its HR patch), with an
    all-zero HR (their HR is never a target) and the crop of ``teacher_only_targets[i]`` as target.

    Args:
        images: The training images.
        patch: LR patch side.
        seed: The sampling seed.
        augment: Random flips and transposes (False: patches as cut, for exactness checks).
        targets: Per image, the cached teacher SR of its whole LR (HR-sized HxWx3 float arrays).
        upcycle: Per image, the HR region upcycled inputs are cut from.
        upcycle_targets: Per image, the cached teacher SR of that region (None: live teacher).
        share: The upcycled share of each global batch of ``batch`` rows.
        batch: The global batch (needed with ``share`` or ``teacher_only_share``).
        invert: Probability of inverting a sample's colours (``255 - x``; a cached target becomes ``1 - t``).
        teacher_only: The images whose patches are teacher-only rows (same scale and LR mode as ``images``).
        teacher_only_targets: Per teacher-only image, the cached teacher SR of its whole LR (None: live teacher).
        teacher_only_share: The teacher-only share of each global batch.
    """

    def __init__(self, images: ImageSet, patch: int, seed: int, *, augment: bool = True,
                 targets: Sequence[np.ndarray] | None = None, upcycle: Sequence[np.ndarray] | None = None,
                 upcycle_targets: Sequence[np.ndarray] | None = None, share: float = 0.0, batch: int = 0,
                 invert: float = 0.0, teacher_only: ImageSet | None = None,
                 teacher_only_targets: Sequence[np.ndarray] | None = None, teacher_only_share: float = 0.0) -> None:
        self.images, self.patch, self.seed, self.augment = images, patch, seed, augment
        self.targets, self.upcycle, self.upcycle_targets, self.invert = targets, upcycle, upcycle_targets, invert
        self.teacher_only, self.teacher_only_targets = teacher_only, teacher_only_targets
        if targets is not None and len(targets) != len(images.hr):
            raise ValueError(f"{len(targets)} teacher targets for {len(images.hr)} images.")
        if share and (upcycle is None or batch < 1):
            raise ValueError("an upcycled share needs the upcycle regions and the global batch size.")
        if upcycle is not None and min(min(r.shape[:2]) for r in upcycle) < patch:
            raise ValueError(f"an upcycle region is smaller than the {patch}x{patch} LR patch; raise "
                             "--data.upcycle_side (or set it to 0 for whole images).")
        if (targets is None) != (upcycle_targets is None) and share:
            raise ValueError("give cached teacher targets for both the LR images and the upcycle regions, or neither.")
        if teacher_only_share:
            if teacher_only is None or not teacher_only.hr or batch < 1:
                raise ValueError("a teacher-only share needs teacher-only images and the global batch size.")
            if teacher_only.scale != images.scale or (teacher_only.lr[0] is None) != (images.lr[0] is None):
                raise ValueError("the teacher-only images need the training images' scale and LR mode.")
            if (targets is None) != (teacher_only_targets is None):
                raise ValueError("give cached teacher targets for both the training and the teacher-only images, "
                                 "or neither.")
            if teacher_only_targets is not None and len(teacher_only_targets) != len(teacher_only.hr):
                raise ValueError(f"{len(teacher_only_targets)} teacher targets for {len(teacher_only.hr)} "
                                 "teacher-only images.")
        self.rows = row_kinds(batch, share, teacher_only_share) if share or teacher_only_share else []
        self.extended = targets is not None or bool(share) or bool(teacher_only_share) or invert > 0

    def __len__(self) -> int:
        return 2**62

    def __getitem__(self, k: int) -> tuple[torch.Tensor, ...]:
        rng = np.random.default_rng([self.seed, int(k)])
        kind = self.rows[int(k) % len(self.rows)] if self.rows else "real"
        upcycled, only_teacher = kind == "upcycle", kind == "teacher_only"
        images = self.teacher_only if only_teacher and self.teacher_only is not None else self.images
        i = int(rng.integers(len(images.hr)))
        s, p = images.scale, self.patch
        source = self.upcycle[i] if upcycled and self.upcycle is not None else images.hr[i]
        h, w = (source.shape[0], source.shape[1]) if upcycled else (source.shape[0] // s, source.shape[1] // s)
        y, x = int(rng.integers(h - p + 1)), int(rng.integers(w - p + 1))
        flip_h, flip_v, transpose = (bool(b) for b in rng.integers(2, size=3))
        if not self.augment:
            flip_h = flip_v = transpose = False
        inverted = bool(self.invert) and bool(rng.random() < self.invert)
        hr = np.asarray(source[y * s:(y + p) * s, x * s:(x + p) * s]) if not upcycled else None
        lr_img = source if upcycled else images.lr[i]
        if lr_img is not None:
            lr = np.asarray(lr_img[y:y + p, x:x + p])
        else:
            lr = None
        def aug(a: np.ndarray) -> np.ndarray:
            if flip_h:
                a = a[:, ::-1]
            if flip_v:
                a = a[::-1]
            if transpose:
                a = a.transpose(1, 0, 2)
            return np.ascontiguousarray(a.transpose(2, 0, 1))
        hr_t = torch.from_numpy(aug(hr)) if hr is not None else torch.zeros(3, p * s, p * s, dtype=torch.uint8)
        if lr is None:
            lr_t = imresize_torch(hr_t.float()[None] / 255.0, 1.0 / s)[0].clamp_(0, 1)
        else:
            lr_t = torch.from_numpy(aug(lr))
            if upcycled and self.images.lr[i] is None:  # float mode: every input is float
                lr_t = lr_t.float() / 255.0
        if only_teacher:  # the HR of a teacher-only image is never a target (its LR was made from it above)
            hr_t = torch.zeros_like(hr_t)
        if not self.extended:
            return lr_t, hr_t
        cached = self.upcycle_targets if upcycled else self.teacher_only_targets if only_teacher else self.targets
        if cached is not None:
            target = torch.from_numpy(aug(np.asarray(cached[i][y * s:(y + p) * s, x * s:(x + p) * s]))).float()
        else:
            target = torch.empty(0)
        if inverted:
            lr_t = 255 - lr_t if lr_t.dtype == torch.uint8 else 1.0 - lr_t
            hr_t = 255 - hr_t if kind == "real" else hr_t
            target = 1.0 - target if target.numel() else target
        return lr_t, hr_t, target, torch.tensor(kind == "real")


def rank_batches(start_step: int, steps: int, global_batch: int, rank: int = 0,
                 world: int = 1) -> Iterator[list[int]]:
    """Yield, for each step in ``[start_step, steps)``, this rank's slice of the global batch indices."""
    if global_batch % world:
        raise ValueError(f"global batch {global_batch} is not divisible by {world} processes; "
                         "choose --data.batch as a multiple of the number of ranks.")
    local = global_batch // world
    for step in range(start_step, steps):
        base = step * global_batch + rank * local
        yield list(range(base, base + local))
