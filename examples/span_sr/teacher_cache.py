"""The teacher-output cache: the teacher's SR of every whole training input, computed once, on disk.

With it a training step costs a plain L1 step whatever the teacher: the target of a patch is the
crop of the cached SR at the patch's place, with the patch's flips (``data.py``). Two things
differ from running the teacher on each patch (docs/distillation.md, "Teacher-output cache"):
the teacher saw the whole image, so near a patch border it had more context than on the patch
alone; and the dihedral augmentation is applied to the teacher's output (``aug(T(x))``), not to
its input (``T(aug(x))``); neither network is flip-equivariant.

**Key.** Each entry is one ``.npy`` file named by the SHA-256 of its
[`CacheSpec`][examples.span_sr.teacher_cache.CacheSpec] (cache-format version, teacher weights
digest and class, forward dtype, stored dtype, tiling, and the LR pipeline: scale, downscaler,
``lr_mode``, input kind) and of the teacher's input array itself (shape, dtype, bytes). The input
is what the pipeline made from the image, so a changed image, crop, scale or degradation is
another key; nothing stale is ever reused. A changed spec leaves the old files in place (delete
the folder to reclaim the space).

**Precision.** Stored as float16 by default: SR values in [0.5, 1) are rounded by at most 2.4e-4
(half a float16 step; 4.9e-4 in [1, 2)), 1/16 of a uint8 level, unbiased, at half the disk and page cache of
float32 (620 images, 138 MP of HR: about 0.8 GB). ``dtype="float32"`` stores the forward's output
exactly (what the equality tests use).

**Building** shows a tqdm bar, writes each entry atomically (a temporary file renamed into
place), so an interrupted build resumes where it stopped; it runs on CUDA when asked (TF32 off
during the build, so the targets are float32 convolutions on either device).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from examples.span_sr.checkpoint import write_atomically
from examples.span_sr.upscale import upscale_tensor

__all__ = ["CACHE_VERSION", "CacheSpec", "TeacherCache", "input_digest", "weights_digest"]

CACHE_VERSION = 1
"""Format version of the cache entries; part of every key."""

_DTYPES = {"float16": torch.float16, "float32": torch.float32, "bfloat16": torch.bfloat16}


def weights_digest(model: nn.Module) -> str:
    """SHA-256 of ``model``'s state dict: every name, dtype, shape and value, in key order."""
    h = hashlib.sha256()
    for name, value in sorted(model.state_dict().items()):
        t = value.detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def input_digest(image: np.ndarray) -> str:
    """SHA-256 of an input array's shape, dtype and bytes."""
    arr = np.ascontiguousarray(image)
    h = hashlib.sha256(f"{arr.shape}|{arr.dtype}|".encode())
    h.update(arr.data.cast("B"))
    return h.hexdigest()


@dataclass(frozen=True)
class CacheSpec:
    """Everything but the input that determines a cached teacher output (each field is part of the key).

    Attributes:
        teacher: [`weights_digest`][examples.span_sr.teacher_cache.weights_digest] of the teacher.
        architecture: The teacher's class (and spandrel architecture id).
        compute: The teacher's forward dtype (``"float32"``, ``"bfloat16"``, ``"float16"``).
        dtype: The stored dtype (``"float16"`` or ``"float32"``).
        tile: LR tile side of the forward (0: the whole image at once).
        pad: Tile margin in LR pixels (irrelevant, and stored as 0, without tiling).
        scale: The SR scale.
        downscaler: How the input was made from the HR image (``"matlab_bicubic_uint8"``; ``"none"``
            for upcycled inputs, which are HR crops).
        lr_mode: ``data.lr_mode`` (only ``"cache"`` has whole LR images).
        kind: ``"lr"`` (the training LR images) or ``"upcycle"`` (HR crops fed as inputs).
        version: [`CACHE_VERSION`][examples.span_sr.teacher_cache.CACHE_VERSION].
    """

    teacher: str
    architecture: str
    compute: str
    dtype: str
    tile: int
    pad: int
    scale: int
    downscaler: str
    lr_mode: str
    kind: str
    version: int = CACHE_VERSION

    def __post_init__(self) -> None:
        if self.dtype not in ("float16", "float32"):
            raise ValueError(f"teacher cache dtype={self.dtype!r}; use 'float16' or 'float32'.")
        if self.compute not in _DTYPES:
            raise ValueError(f"teacher compute dtype={self.compute!r}; use one of {sorted(_DTYPES)}.")
        if self.lr_mode != "cache":
            raise ValueError(f"the teacher cache needs data.lr_mode 'cache' (whole LR images made once); with "
                             f"{self.lr_mode!r} every patch's LR is made on the fly, so there is no whole image to "
                             "run the teacher on: set --data.lr_mode cache or --teacher_cache.enabled false.")
        if self.tile < 0 or self.pad < 0:
            raise ValueError(f"teacher cache tile={self.tile}, pad={self.pad} must be >= 0.")
        if not self.tile and self.pad:
            object.__setattr__(self, "pad", 0)  # no margin without tiles: one key for 'whole image'

    def digest(self) -> str:
        """SHA-256 of the spec's fields."""
        return hashlib.sha256(json.dumps(dataclasses.asdict(self), sort_keys=True).encode()).hexdigest()


class TeacherCache:
    """Cached teacher outputs for one :class:`CacheSpec`, in ``folder/<spec digest[:16]>/``.

    Args:
        folder: The cache root (shared by every spec; ``teacher_cache.dir``).
        spec: What the entries are.
    """

    def __init__(self, folder: str | Path, spec: CacheSpec) -> None:
        self.spec = spec
        self.root = Path(folder) / spec.digest()[:16]

    def key(self, image: np.ndarray) -> str:
        """The entry key of the teacher's output on ``image``: spec digest and input digest, hashed."""
        return hashlib.sha256(f"{self.spec.digest()}|{input_digest(image)}".encode()).hexdigest()[:32]

    def path(self, image: np.ndarray) -> Path:
        """The ``.npy`` file of ``image``'s entry (it may not exist yet)."""
        return self.root / f"{self.key(image)}.npy"

    def missing(self, images: Sequence[np.ndarray]) -> list[int]:
        """Indices of ``images`` without an entry."""
        return [i for i, img in enumerate(images) if not self.path(img).is_file()]

    @torch.no_grad()
    def build(self, teacher: nn.Module, images: Sequence[np.ndarray], *, device: torch.device | str = "cpu",
              rank: int = 0, world: int = 1, progress: bool = True, desc: str = "teacher cache") -> int:
        """Compute the missing entries of ``images`` (uint8 HxWx3) with ``teacher``; returns how many were computed.

        With ``world > 1`` this process builds the images ``i % world == rank`` (call it on every
        rank, then synchronise). Entries already present are skipped, so a build interrupted at
        any point resumes where it stopped. ``teacher`` is used in eval mode on ``device`` in the
        spec's compute dtype, and left as it was found (device, dtype, mode).
        """
        device = torch.device(device)
        todo = [i for i in self.missing(images) if i % world == rank]
        if not todo:
            return 0
        if self.spec.compute != "float32" and device.type != "cuda":
            raise ValueError(f"teacher compute dtype {self.spec.compute!r} needs CUDA; use 'float32' on {device}.")
        self.root.mkdir(parents=True, exist_ok=True)
        spec_file = self.root / "spec.json"
        if not spec_file.is_file():
            write_atomically(spec_file, lambda tmp: Path(tmp).write_text(json.dumps(
                dataclasses.asdict(self.spec), indent=1)))
        first = next(teacher.parameters())
        was = (first.device, first.dtype, teacher.training)
        tf32 = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
        compute = _DTYPES[self.spec.compute]
        teacher.to(device=device, dtype=compute).eval()
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
        try:
            for i in tqdm(todo, desc=desc, unit="img", disable=not progress or len(todo) < 2, dynamic_ncols=True):
                x = torch.from_numpy(np.array(images[i])).permute(2, 0, 1)[None]  # a copy: entries may be read-only
                x = x.to(device=device, dtype=compute) / 255.0
                y = upscale_tensor(teacher, x, tile=self.spec.tile or None, pad=self.spec.pad)
                out = y[0].permute(1, 2, 0).float().cpu().numpy().astype(self.spec.dtype)

                def write(tmp: str, arr: np.ndarray = out) -> None:
                    with open(tmp, "wb") as fh:
                        np.save(fh, arr)

                write_atomically(self.path(images[i]), write)
        finally:
            torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = tf32
            teacher.to(device=was[0], dtype=was[1]).train(was[2])
        return len(todo)

    def read(self, images: Sequence[np.ndarray]) -> list[np.ndarray]:
        """The entries of ``images``, memory-mapped (HR-sized HxWx3 in the stored dtype).

        Raises:
            FileNotFoundError: an entry is missing (build the cache first).
        """
        out = []
        for i, img in enumerate(images):
            path = self.path(img)
            if not path.is_file():
                raise FileNotFoundError(f"teacher cache entry {path} for input {i} is missing; build the cache first.")
            arr = np.load(path, mmap_mode="r")
            s = self.spec.scale
            if arr.shape != (img.shape[0] * s, img.shape[1] * s, 3) or arr.dtype != np.dtype(self.spec.dtype):
                raise ValueError(f"teacher cache entry {path} holds {arr.dtype} {arr.shape}, not {self.spec.dtype} "
                                 f"{(img.shape[0] * s, img.shape[1] * s, 3)}; delete it and rebuild.")
            out.append(arr)
        return out
