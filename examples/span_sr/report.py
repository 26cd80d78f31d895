"""What a DSCLoRA run shows a person: the metrics log, the progress bar, the results table, curves, a picture.

:class:`MetricsLog` appends one JSON record per line to ``metrics.jsonl`` (and drops the records
after the step a resumed run starts from); :class:`Progress` is the tqdm bar, through whose writer
every other line is printed; :func:`results_table` formats the final Y-PSNR table;
:func:`plot_curves` draws the loss parts and validation PSNR with matplotlib; :func:`comparison_strip`
puts bicubic, each model and HR side by side, each tile captioned with its name and Y-PSNR.
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from examples.span_sr.checkpoint import write_atomically
from examples.span_sr.degrade import imresize_matlab
from examples.span_sr.metrics import psnr_y
from examples.span_sr.upscale import upscale_image

__all__ = ["CAPTION_HEIGHT", "MetricsLog", "Progress", "comparison_strip", "plot_curves", "results_table"]


class MetricsLog:
    """Append-only ``metrics.jsonl``; on resume, records after the resumed step are dropped."""

    def __init__(self, path: Path, *, truncate_after: int | None = None, enabled: bool = True) -> None:
        self.path, self.enabled = path, enabled
        if enabled and truncate_after is not None and path.is_file():
            keep = [line for line in path.read_text().splitlines()
                    if line.strip() and json.loads(line).get("step", 0) <= truncate_after]
            text = "".join(line + "\n" for line in keep)
            write_atomically(path, lambda tmp: Path(tmp).write_text(text))  # an interrupt keeps the old log

    def write(self, record: Mapping[str, Any]) -> None:
        """Append one JSON record (rank 0 only)."""
        if self.enabled:
            with open(self.path, "a") as fh:
                fh.write(json.dumps(dict(record)) + "\n")

    def read(self) -> list[dict[str, Any]]:
        """All records so far."""
        if not self.path.is_file():
            return []
        return [json.loads(line) for line in self.path.read_text().splitlines() if line.strip()]


def plot_curves(records: list[dict[str, Any]], path: Path) -> bool:
    """Loss parts and validation PSNR over steps as a PNG; returns False without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    train = [r for r in records if "loss" in r]
    val = [r for r in records if "val_psnr" in r]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    for key in ("loss", "rec", "out", "aff"):
        pts = [(r["step"], r[key]) for r in train if r.get(key)]
        if pts:
            ax1.plot(*zip(*pts), label=key)
    ax1.set(xlabel="step", ylabel="total (weighted) and unweighted parts", yscale="log", title="training loss")
    ax1.legend()
    if val:
        ax2.plot([r["step"] for r in val], [r["val_psnr"] for r in val], "o-", label="student")
    refs = next((r for r in records if "val_base" in r), None)
    if refs:
        ax2.axhline(refs["val_base"], color="gray", ls="--", label="base")
        ax2.axhline(refs["val_teacher"], color="green", ls=":", label="teacher")
    ax2.set(xlabel="step", ylabel="Y-PSNR (dB)", title="validation (held-out images)")
    ax2.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


class Progress:
    """The tqdm bar (steps, loss parts in use, lr, it/s, ETA) on the main process; a line per log interval without it.

    :meth:`write` prints a line through the bar's own writer, so no line is glued to the bar and
    the bar is redrawn once below it; on other ranks it prints nothing.
    """

    def __init__(self, start: int, total: int, *, enabled: bool, bar: bool) -> None:
        self.enabled, self.n, self.total, self.start, self.t0 = enabled, start, total, start, time.time()
        self.bar = tqdm(total=total, initial=start, dynamic_ncols=True, smoothing=0.05) if enabled and bar else None

    def write(self, line: str) -> None:
        """Print ``line`` above the bar (main process only)."""
        if self.enabled:
            tqdm.write(line)

    def update(self, n: int = 1) -> None:
        """Count ``n`` more steps."""
        self.n += n
        if self.bar is not None:
            self.bar.update(n)

    def show(self, **values: str) -> None:
        """Show ``values`` on the bar, or print them with the rate and ETA when there is no bar."""
        if self.bar is not None:
            self.bar.set_postfix(values, refresh=False)
        elif self.enabled:
            rate = (self.n - self.start) / max(1e-9, time.time() - self.t0)
            eta = (self.total - self.n) / max(rate, 1e-9)
            print(f"step {self.n}/{self.total} " + " ".join(f"{k} {v}" for k, v in values.items())
                  + f" | {rate:.2f} it/s, ETA {eta:.0f}s", flush=True)

    def close(self) -> None:
        """Close the bar (if any)."""
        if self.bar is not None:
            self.bar.close()


def results_table(results: Mapping[str, Mapping[str, float]], border: int) -> str:
    """The final Y-PSNR table: one row per image set, one column per model."""
    names = list(next(iter(results.values()))) if results else []
    lines = [f"Y-PSNR (dB, border {border}, MATLAB-bicubic LR)", f"{'set':<18}" + "".join(f"{n:>10}" for n in names)]
    lines += [f"{name:<18}" + "".join(f"{v:>10.3f}" for v in row.values()) for name, row in results.items()]
    return "\n".join(lines)


def comparison_strip(lr: np.ndarray, hr: np.ndarray, models: Mapping[str, nn.Module], *, crop: int = 40) -> np.ndarray:
    """Side by side on a ``crop``-pixel LR centre crop (x scale, uint8): MATLAB bicubic, each model, HR.

    Each tile sits under a caption with its name (the model's key in ``models``) and its Y-PSNR on
    the crop (border = scale).
    """
    scale = hr.shape[0] // lr.shape[0]
    h, w = lr.shape[:2]
    c = min(crop, h, w)
    top, left = (h - c) // 2, (w - c) // 2
    patch = np.ascontiguousarray(lr[top:top + c, left:left + c])
    ref = np.ascontiguousarray(hr[top * scale:(top + c) * scale, left * scale:(left + c) * scale])
    tiles = {"bicubic": imresize_matlab(patch, scale)}
    with torch.no_grad():
        tiles.update({name: upscale_image(model, patch) for name, model in models.items()})
    captions = [f"{name} {psnr_y(t, ref, scale):.2f} dB" for name, t in tiles.items()] + ["HR"]
    strips = [np.concatenate([_caption(text, t.shape[1]), t], axis=0)
              for text, t in zip(captions, [*tiles.values(), ref])]
    gap = np.full((strips[0].shape[0], 4, 3), 255, np.uint8)
    return np.concatenate([x for t in strips for x in (t, gap)][:-1], axis=1)


CAPTION_HEIGHT = 14
"""Height in pixels of the white band with a tile's name above it in :func:`comparison_strip`."""


def _caption(text: str, width: int) -> np.ndarray:
    """A white ``CAPTION_HEIGHT x width`` band with ``text`` in black (Pillow's built-in font)."""
    from PIL import Image, ImageDraw

    band = Image.new("RGB", (width, CAPTION_HEIGHT), (255, 255, 255))
    ImageDraw.Draw(band).text((2, 1), text, fill=(0, 0, 0))
    return np.asarray(band, dtype=np.uint8)
