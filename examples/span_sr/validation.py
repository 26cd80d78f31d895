"""Validation and the end-of-run report of a DSCLoRA run.

Y-PSNR is measured as ``evaluate.py`` does (border = scale, SR rounded to uint8). During training
:func:`validate` keeps the best adapter (EMA weights when on); at the end :func:`export_student`
writes the adapter and the merged SPAN and :func:`final_report` writes ``results.json``, the
table, ``curves.png`` and ``comparison.png``.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

import convlora
from examples.span_sr import checkpoint as ckpt
from examples.span_sr import run_report as report
from examples.span_sr.config import Config
from examples.span_sr.data import ImageSet
from examples.span_sr.image_sources import list_images
from examples.span_sr.metrics import psnr_y, to_uint8
from examples.span_sr.train_utils import swapped, to_float

__all__ = ["export_student", "final_report", "mean_psnr", "reference_psnr", "validate"]

Say = Callable[..., None]


@torch.no_grad()
def mean_psnr(model: torch.nn.Module, images: ImageSet, device: torch.device) -> float:
    """Mean Y-PSNR (border = scale, SR rounded to uint8) over ``images``, as evaluate.py measures it."""
    values = []
    for lr, hr in zip(images.lr, images.hr):
        x = torch.from_numpy(np.array(lr)).permute(2, 0, 1)[None]
        values.append(psnr_y(to_uint8(model(to_float(x, device)).float().cpu()), np.asarray(hr), border=images.scale))
    return float(np.mean(values))


def reference_psnr(base: torch.nn.Module, teacher: torch.nn.Module, images: ImageSet, device: torch.device,
                   log: report.MetricsLog, say: Say) -> None:
    """Log the base's and the teacher's validation Y-PSNR at step 0 (the bars the student is judged by)."""
    ref = {"val_base": mean_psnr(base, images, device), "val_teacher": mean_psnr(teacher, images, device)}
    log.write({"step": 0, **ref})
    say(f"validation Y-PSNR: base {ref['val_base']:.3f} dB, teacher {ref['val_teacher']:.3f} dB")


def validate(student: torch.nn.Module, params: list[torch.nn.Parameter], ema: list[torch.Tensor] | None,
             images: ImageSet, device: torch.device, best: dict[str, Any], step: int,
             log: report.MetricsLog, say: Say) -> float:
    """Validation Y-PSNR of ``student`` (with the EMA weights when on); updates ``best`` in place.

    ``best`` holds ``psnr``, ``step`` and ``params`` (the trainable state on CPU) of the best step so far.
    """
    with swapped(params, ema):
        value = mean_psnr(student, images, device)
    if value > best["psnr"]:
        best.update(psnr=value, step=step, params=ckpt.trainable_state(student) if ema is None else
                    {n: e.cpu().clone() for (n, _), e in zip(ckpt.trainable_state(student).items(), ema)})
    log.write({"step": step, "val_psnr": value, "best_psnr": best["psnr"], "best_step": best["step"]})
    say(f"step {step}: validation Y-PSNR {value:.3f} dB (best {best['psnr']:.3f} at step {best['step']})")
    return value


def export_student(student: torch.nn.Module, params: list[torch.nn.Parameter], ema: list[torch.Tensor] | None,
                   best: dict[str, Any], cfg: Config, run: Path, say: Say) -> torch.nn.Module:
    """Load the best validation adapter (else the EMA weights), write ``adapter.safetensors`` and the merged SPAN.

    Returns:
        The merged plain SPAN, as written to ``merged.safetensors``/``merged.pth`` (official keys).
    """
    if best["params"] is not None:
        ckpt.load_trainable_state(student, best["params"])
        say(f"using the best validation adapter: step {best['step']}, {best['psnr']:.3f} dB")
    elif ema is not None:
        with torch.no_grad():
            torch._foreach_copy_([p.data for p in params], ema)  # export the EMA weights
    student = student.to(memory_format=torch.contiguous_format)
    convlora.save_adapter(student, run / "adapter.safetensors",
                          metadata={"best_step": best["step"], "config": cfg.to_dict()})
    return ckpt.export_merged(student, run)


def final_report(models: dict[str, torch.nn.Module], val_set: ImageSet | None, cfg: Config, run: Path,
                 cache: str, best_step: int, steps: int, log: report.MetricsLog, device: torch.device,
                 say: Say) -> None:
    """Y-PSNR of ``models`` (base, teacher, student) on validation and ``data.test``, curves and a comparison.

    Writes ``results.json``, ``curves.png`` (when matplotlib is installed) and ``comparison.png``
    (when there is a validation set) into ``run``, and prints the table and the output list.
    """
    scale = cfg.data.scale
    results: dict[str, dict[str, float]] = {}
    if val_set is not None:
        results["val (held out)" if not cfg.data.val else "val"] = {n: mean_psnr(m, val_set, device) for n, m in models.items()}
    for folder in cfg.data.test:
        hr_dir = Path(folder) / "HR" if (Path(folder) / "HR").is_dir() else Path(folder)
        test_set = ImageSet.load(list_images([str(hr_dir)]), scale, cache_dir=cache)
        results[Path(folder).name] = {n: mean_psnr(m, test_set, device) for n, m in models.items()}
    report.dump_json(run / "results.json", {"y_psnr_db": results, "best_step": best_step, "steps": steps})
    say(f"\nY-PSNR (dB, border {scale}, MATLAB-bicubic LR)\n{'set':<18}" + "".join(f"{n:>10}" for n in models))
    for name, row in results.items():
        say(f"{name:<18}" + "".join(f"{v:>10.3f}" for v in row.values()))
    if not report.plot_curves(log.read(), run / "curves.png"):
        say("matplotlib is not installed: curves.png skipped")
    if val_set is not None:
        lr0 = torch.from_numpy(np.array(val_set.lr[0])).permute(2, 0, 1)[None].float() / 255.0
        strip = report.comparison_strip(lr0, np.asarray(val_set.hr[0]),
                                      {"base": models["base"], "student": models["student"], "teacher": models["teacher"]})
        report.write_png(run / "comparison.png", strip)
    say(f"\noutputs in {run}/: " + ", ".join(sorted(p.name for p in run.iterdir() if p.is_file()))
        + f"\nmerged.pth is a plain SPAN with the official keys; try it:\n  python examples/span_sr/upscale.py "
        f"--weights {run / 'merged.pth'} --input IMAGE --output OUT_DIR")
