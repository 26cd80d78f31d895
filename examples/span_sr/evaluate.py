"""Evaluate SPAN / DSCLoRA checkpoints on SR benchmark folders (Y-PSNR, Y-SSIM, RGB-PSNR).

    python examples/span_sr/evaluate.py --weights ../shared/data/weights/dsclora_ch26.pth \\
        --data ../shared/data/sr_bench/Set5 ../shared/data/sr_bench/Set14 --json runs/eval.json
    python examples/span_sr/evaluate.py --weights ../shared/data/weights/span_tiny_ch26.pth \\
        --lora-adapter runs/dsclora/adapter.safetensors --data ../shared/data/sr_bench

A dataset folder holds ``HR/*.png`` and optionally ``LR_bicubic/X<s>/<name>x<s>.png``; without
provided LR (or with ``--regenerate-lr``) the LR is made from the modcropped HR with the
MATLAB-exact bicubic of :mod:`examples.span_sr.degrade`. With ``LR_bicubic/X<s>/``, an HR image
without its LR there is an error (``--bicubic-fallback`` makes that one LR with bicubic, and the
set's ``lr_source`` in the table's JSON names it). A folder without ``HR/`` whose
subfolders have one (e.g. ``sr_bench``) is expanded. Protocol: HR modcropped to a multiple of
the scale; SR clamped to [0, 1] and rounded to ``uint8``; metrics with a border of ``scale``
pixels (see :mod:`examples.span_sr.metrics`).
"""

from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import argparse
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from examples.span_sr.arch import SPAN
from examples.span_sr.checkpoint import write_json
from examples.span_sr.degrade import imresize_matlab, modcrop
from examples.span_sr.dsclora import load_deployed
from examples.span_sr.fast import FastSPAN, fast_span
from examples.span_sr.images import list_images, read_image
from examples.span_sr.metrics import psnr_rgb, psnr_y, ssim_y
from examples.span_sr.outputs import refuse_inputs, stopped
from examples.span_sr.upscale import upscale_image

__all__ = ["METRICS", "check_lr", "dataset_dirs", "evaluate_folder", "format_table", "main", "score", "sr_pairs"]

METRICS = {"psnr_y": psnr_y, "ssim_y": ssim_y, "psnr_rgb": psnr_rgb}
"""The metrics, by name (border-cropped, on uint8 images; see :mod:`examples.span_sr.metrics`)."""


def score(upscale: Callable[[np.ndarray], np.ndarray], pairs: Iterable[tuple[str, np.ndarray, np.ndarray]],
          border: int, metrics: Sequence[str] = tuple(METRICS)) -> dict[str, Any]:
    """Score ``upscale`` (uint8 LR -> uint8 SR) on ``(name, hr, lr)`` pairs; training validates with it too.

    Returns:
        ``{"images": [{"name", metric: value, ...}, ...], "mean": {metric: value}, "count": n}``.

    Raises:
        ValueError: no pairs.
    """
    rows = []
    for name, hr, lr in pairs:
        sr = upscale(lr)
        rows.append({"name": name, **{m: METRICS[m](sr, hr, border) for m in metrics}})
    if not rows:
        raise ValueError("no images to score.")
    return {"images": rows, "mean": {m: float(np.mean([r[m] for r in rows])) for m in metrics}, "count": len(rows)}


def _find_lr(lr_dir: Path | None, stem: str, scale: int) -> Path | None:
    if lr_dir is None:
        return None
    for name in (f"{stem}x{scale}.png", f"{stem}.png"):
        if (lr_dir / name).is_file():
            return lr_dir / name
    return None


def check_lr(hr_dir: str | Path, lr_dir: str | Path, scale: int) -> None:
    """Raise ``ValueError`` naming the HR images of ``hr_dir`` that have no LR image in ``lr_dir``."""
    missing = [p.name for p in list_images(hr_dir) if _find_lr(Path(lr_dir), p.stem, scale) is None]
    if missing:
        raise ValueError(f"{len(missing)} HR image(s) of {str(hr_dir)!r} have no LR image in {str(lr_dir)!r} "
                         f"(e.g. {missing[:3]}; looked for <name>x{scale}.png and <name>.png); add them, "
                         "pass --regenerate-lr for bicubic LR of every image, or --bicubic-fallback for "
                         "the missing ones only.")


def sr_pairs(hr_dir: str | Path, lr_dir: str | Path | None = None, scale: int = 4, *,
             bicubic_fallback: bool = False, made: list[str] | None = None
             ) -> Iterator[tuple[str, np.ndarray, np.ndarray]]:
    """Yield ``(name, hr, lr)`` ``uint8`` images: HR modcropped, LR read from ``lr_dir``
    (``<name>x<s>.png`` or ``<name>.png``) or, without ``lr_dir``, made with MATLAB-exact bicubic.

    Args:
        bicubic_fallback: With ``lr_dir``, make the LR of an HR image that has none there with
            MATLAB bicubic instead of raising; the names of those images are appended to ``made``.

    Raises:
        ValueError: an HR image without its LR in ``lr_dir`` (unless ``bicubic_fallback``), or a
            provided LR image that does not have the HR size divided by ``scale``.
    """
    lr_root = Path(lr_dir) if lr_dir is not None else None
    hr_files = list_images(hr_dir)
    if lr_root is not None and not bicubic_fallback:
        check_lr(hr_dir, lr_root, scale)
    for path in hr_files:
        hr = modcrop(read_image(path), scale)
        lr_path = _find_lr(lr_root, path.stem, scale)
        if lr_path is None and lr_root is not None and made is not None:
            made.append(path.stem)
        lr = read_image(lr_path) if lr_path else imresize_matlab(hr, 1.0 / scale)
        expected = (hr.shape[0] // scale, hr.shape[1] // scale, 3)
        if lr.shape != expected:
            raise ValueError(f"LR {lr_path} is {lr.shape}, expected {expected} for HR {path} "
                             f"modcropped at scale {scale}; use --regenerate-lr.")
        yield path.stem, hr, lr


def evaluate_folder(model: nn.Module, hr_dir: str | Path, lr_dir: str | Path | None = None, *,
                    scale: int | None = None, border: int | None = None, tile: int | None = None,
                    bicubic_fallback: bool = False) -> dict[str, Any]:
    """Super-resolve every image of ``hr_dir`` and score it.

    Args:
        model: SR model (input [0, 1] RGB; its device/dtype are used).
        hr_dir: Folder of HR images.
        lr_dir: Folder of LR images, or ``None`` to generate them with MATLAB bicubic.
        scale: Upscaling factor (default: ``model.upscale``).
        border: Pixels cropped for the metrics (default: ``scale``).
        tile: Optional LR tile size (exact tiling, see :mod:`examples.span_sr.upscale`).
        bicubic_fallback: With ``lr_dir``, make a missing LR image with MATLAB bicubic (else an
            error); the result's ``"bicubic_lr"`` lists those images.

    Returns:
        ``{"images": [{"name", "psnr_y", "ssim_y", "psnr_rgb"}, ...], "mean": {metric: value},
        "count": n}`` (and ``"bicubic_lr": [names]`` with ``bicubic_fallback``).
    """
    scale = int(scale if scale is not None else getattr(model, "upscale", 4))
    border = scale if border is None else border
    made: list[str] = []
    pairs = sr_pairs(hr_dir, lr_dir, scale, bicubic_fallback=bicubic_fallback, made=made)
    result = score(lambda lr: upscale_image(model, lr, tile=tile), pairs, border)
    if bicubic_fallback and lr_dir is not None:
        result["bicubic_lr"] = made
    return result


def dataset_dirs(paths: Sequence[str | Path]) -> list[Path]:
    """Dataset folders (each with ``HR/``); a folder without ``HR/`` is expanded one level."""
    out: list[Path] = []
    for p in map(Path, paths):
        if not p.is_dir():
            raise FileNotFoundError(f"data folder {str(p)!r} does not exist; docs/data.md lists the benchmark sets "
                                    "and the layout <set>/HR/*.png expected here.")
        if (p / "HR").is_dir():
            out.append(p)
            continue
        subs = sorted(d for d in p.iterdir() if (d / "HR").is_dir())
        if not subs:
            raise FileNotFoundError(f"{p} has no HR/ folder and no subfolder with one; expected "
                                    "<set>/HR/*.png (optionally <set>/LR_bicubic/X4/).")
        out.extend(subs)
    return out


def format_table(results: dict[str, dict[str, Any]]) -> str:
    """Plain-text table: set, images, Y-PSNR, Y-SSIM, RGB-PSNR."""
    lines = [f"{'set':<12} {'images':>6} {'Y-PSNR':>8} {'Y-SSIM':>7} {'RGB-PSNR':>8}"]
    for name, r in results.items():
        m = r["mean"]
        lines.append(f"{name:<12} {r['count']:>6} {m['psnr_y']:>8.3f} {m['ssim_y']:>7.4f} "
                     f"{m['psnr_rgb']:>8.3f}")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--weights", required=True, help="SPAN checkpoint (.pth or .safetensors)")
    ap.add_argument("--lora-adapter", help="convlora adapter (.safetensors) to load and merge")
    ap.add_argument("--data", nargs="+", required=True, help="dataset folder(s) with HR/")
    ap.add_argument("--regenerate-lr", action="store_true", help="ignore LR_bicubic, make LR from HR")
    ap.add_argument("--bicubic-fallback", action="store_true", help="an HR image without its LR in LR_bicubic: "
                    "make that LR with MATLAB bicubic (recorded per set) instead of stopping")
    ap.add_argument("--tile", type=int, default=None, help="LR tile size (exact)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--fast", action="store_true", help="the fast path (fast.py); float32")
    ap.add_argument("--json", help="write per-image and mean results here")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        folders = dataset_dirs(args.data)
        if args.tile is not None and args.tile < 1:
            raise ValueError(f"--tile {args.tile}: give a tile side of at least 1 LR pixel")
        refuse_inputs([args.json] if args.json else [], [args.weights, args.lora_adapter], "--json")
        span = load_deployed(args.weights, args.lora_adapter).to(args.device)
        model: SPAN | FastSPAN = fast_span(span) if args.fast else span
    except (FileNotFoundError, ValueError) as err:
        raise SystemExit(f"evaluate.py: {err}") from None
    found = {d: d / "LR_bicubic" / f"X{model.upscale}" for d in folders}
    lr_dirs = {d: lr if lr.is_dir() and not args.regenerate_lr else None for d, lr in found.items()}
    try:  # every set checked before the first is scored
        for d, lr in lr_dirs.items():
            if lr is not None and not args.bicubic_fallback:
                check_lr(d / "HR", lr, model.upscale)
    except (FileNotFoundError, ValueError) as err:
        raise SystemExit(f"evaluate.py: {err}") from None
    results: dict[str, dict[str, Any]] = {}
    for d, use_lr in lr_dirs.items():
        try:
            results[d.name] = evaluate_folder(model, d / "HR", use_lr, tile=args.tile,
                                              bicubic_fallback=args.bicubic_fallback)
        except (FileNotFoundError, ValueError) as err:
            raise SystemExit(f"evaluate.py: {err}") from None
        made = results[d.name].get("bicubic_lr", [])
        results[d.name]["lr_source"] = (str(use_lr) if use_lr else "matlab_bicubic(HR)") + (
            f" ({len(made)} of {results[d.name]['count']} made with matlab_bicubic(HR): {made})" if made else "")
    print(format_table(results))
    if args.json:
        write_json(args.json, {"weights": str(args.weights), "lora_adapter": args.lora_adapter, "sets": results})
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    try:
        raise SystemExit(main())
    except KeyboardInterrupt:
        raise SystemExit(stopped("evaluate.py")) from None
