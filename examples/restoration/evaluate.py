"""PSNR/SSIM of every task: degraded input, base model, adapter, full fine-tuning.

    python examples/restoration/evaluate.py --run runs/restoration_demo
    python examples/restoration/evaluate.py --run runs/restoration_cpu_subset   # docs' table

Test sets (from the run's ``config.yaml``, section ``eval``): denoising tasks add noise to each
test image with a generator seeded from ``(seed, task, image)``; ``deblur_motion`` blurs each
image with each of Levin's 8 kernels (``eval.levin``), ``deblur_gauss`` with the 4 kernels of
:data:`~examples.restoration.kernels.GAUSSIAN_TEST`, then adds noise of sigma 2.55 (seeded from
``(seed, task, image, kernel)``). Outputs and references are clamped to [0, 1] and rounded to 8
bits; PSNR is over the RGB channels, SSIM the mean of the three channels' SSIM (11x11 Gaussian
window), no border cropped (the blur is circular); ``--border N`` scores only the inside, N pixels
away from every edge, where circular blur has not wrapped the opposite edge in.

All adapters are loaded onto *one* base model as named adapters and switched with
``convlora.set_adapter``; the script also checks that this equals a fresh model holding only
that adapter, and that the merged, unloaded deploy model (the plain base architecture) equals both.
Writes ``results.json`` and ``results.md`` into the run folder (``results_border<N>.*`` with
``--border N``).
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make `examples.restoration` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import numpy as np
import torch
from torch import Tensor

import convlora
from examples.restoration.config import apply_options, load_config, missing_data, resolve_path
from examples.restoration.data import SAMPLE_TEST, center_crop, eval_images, sample_photos
from examples.restoration.degrade import Task, degrade, get_task, seeded_generator
from examples.restoration.kernels import (
    GAUSSIAN_TEST,
    gaussian_kernel,
    load_levin,
    random_motion_kernel,
)
from examples.restoration.model import load_model
from examples.restoration.train import pick_device
from examples.span_sr.checkpoint import write_atomically, write_json
from examples.span_sr.metrics import psnr_rgb, ssim, to_uint8
from examples.span_sr.outputs import stopped

__all__ = ["Case", "degraded_cases", "eval_kernels", "eval_set", "main", "score"]

Case = tuple[str, Tensor, Tensor]
"""``(label, clean (3, H, W), degraded (3, H, W))`` in [0, 1]; the degraded image is not clipped."""


def eval_kernels(task: Task, levin: Path | None, seed: int) -> list[Tensor]:
    """Test PSFs of a blur task: Levin's 8 for motion (synthetic ones, seeded apart from training,
    when no Levin file is configured: demo only), :data:`GAUSSIAN_TEST` for Gaussian."""
    if task.kernels == "gaussian":
        return [gaussian_kernel(*spec) for spec in GAUSSIAN_TEST]
    if levin is not None:
        return load_levin(levin)
    rng = np.random.default_rng([seed, 0xC0FFEE])
    return [random_motion_kernel(rng) for _ in range(8)]


def degraded_cases(task: Task, images: dict[str, Tensor], kernels: list[Tensor], seed: int) -> list[Case]:
    """Degraded copies of ``images`` for ``task``, each with its own seeded generator."""
    cases: list[Case] = []
    for name, img in images.items():
        clean = img.float() / 255.0
        if task.kind == "noise":
            cases.append((name, clean, degrade(clean, task, seeded_generator(seed, task.name, name))))
            continue
        for i, k in enumerate(kernels):
            gen = seeded_generator(seed, task.name, name, i)
            cases.append((f"{name}/k{i + 1}", clean, degrade(clean, task, gen, k)))
    return cases


def score(restore: Callable[[Tensor], Tensor] | None, cases: list[Case],
          device: torch.device | str = "cpu", border: int = 0) -> dict[str, Any]:
    """Mean PSNR/SSIM of ``restore`` over ``cases`` (``None`` scores the degraded inputs),
    with the per-case PSNRs."""
    psnrs, ssims = [], []
    for _, clean, bad in cases:
        with torch.inference_mode():
            out = bad if restore is None else restore(bad[None].to(device))[0]
        a, b = to_uint8(out), to_uint8(clean)
        if border:
            a, b = a[border:-border, border:-border], b[border:-border, border:-border]
        psnrs.append(psnr_rgb(a, b, border=0))
        ssims.append(float(np.mean([ssim(a[..., c].astype(np.float64), b[..., c].astype(np.float64))
                                    for c in range(3)])))
    return {"psnr": float(np.mean(psnrs)), "ssim": float(np.mean(ssims)), "per_case": psnrs}


def eval_set(cfg: dict[str, Any], count: int | None = None,
             crop: int | None = None) -> tuple[dict[str, Tensor], str]:
    """The config's clean test images (``count``/``crop`` override ``eval.*``) and a label."""
    ev = cfg["eval"]
    count, crop = count or ev["count"], crop or ev["crop"]
    if ev["source"] == "sample":
        return ({k: center_crop(v, crop) for k, v in sample_photos(SAMPLE_TEST).items()},
                f"scikit-image {', '.join(SAMPLE_TEST)}")
    images = eval_images(resolve_path(ev["folder"]), count, crop)  # type: ignore[arg-type]
    return images, f"{Path(ev['folder']).name} ({len(images)} images{f', {crop}px centre crops' if crop else ''})"


def _exactness(run: Path, multi: torch.nn.Module, name: str, x: Tensor,
               device: torch.device) -> dict[str, float]:
    """Max |difference| of the switched multi-adapter model vs a fresh single-adapter model and
    vs the merged + unloaded deploy model."""
    fresh = load_model(run / "base.safetensors").to(device)
    convlora.load_adapter(fresh, run / "adapters" / f"{name}.safetensors")
    deploy = convlora.unload(copy.deepcopy(fresh), merge=True)
    base_keys = set(load_model(run / "base.safetensors").state_dict())
    if set(deploy.state_dict()) != base_keys:
        raise RuntimeError(f"the deploy model of {name!r} has other state-dict keys than the base.")
    x = x.to(device)
    with torch.inference_mode():
        ref = multi(x)
        return {"switch_max_abs": float((fresh(x) - ref).abs().max()),
                "merge_max_abs": float((deploy(x) - ref).abs().max())}


def _fmt(r: dict[str, Any] | None) -> str:
    return "—" if r is None else f"{r['psnr']:.2f} / {r['ssim']:.4f}"


def markdown(results: dict[str, Any]) -> str:
    """The results as two Markdown tables (per task; per Levin kernel)."""
    lines = ["| task | test set | input: PSNR (dB) / SSIM | base | adapter | full fine-tune "
             "| adapter − full (dB) | params trained / stored: adapter | full fine-tune "
             "| max abs diff: switch / merge |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for name, r in results["tasks"].items():
        ad, ft = r.get("adapter"), r.get("finetune")
        gap = f"{ad['psnr'] - ft['psnr']:+.2f}" if ad and ft else "—"
        pa = f"{r['adapter_params']:,} ({100 * r['adapter_params'] / results['base_params']:.2f}%)" \
            if ad else "—"
        pf = f"{results['base_params']:,}" if ft else "—"
        exact = f"{r['switch_max_abs']:.1e} / {r['merge_max_abs']:.1e}" if "switch_max_abs" in r else "—"
        lines.append(f"| {name} | {r['test_set']} | {_fmt(r['input'])} | {_fmt(r['base'])} | {_fmt(ad)} "
                     f"| {_fmt(ft)} | {gap} | {pa} | {pf} | {exact} |")
    lines += ["", "max abs diff (exactness, on one test image): switch = the multi-adapter model switched to the "
              "task vs a fresh base with only that adapter loaded; merge = vs the adapter merged and unloaded "
              "(plain layers)."]
    motion = results["tasks"].get("deblur_motion")
    if motion and motion.get("adapter"):
        k = len(motion["kernels"])
        lines += ["", "deblur_motion, PSNR (dB) per Levin kernel (mean over images):", "",
                  "| | " + " | ".join(motion["kernels"]) + " |", "|---" * (k + 1) + "|"]
        for row in ("input", "base", "adapter", "finetune"):
            if motion.get(row):
                per = np.asarray(motion[row]["per_case"]).reshape(-1, k).mean(0)
                lines.append(f"| {row} | " + " | ".join(f"{v:.2f}" for v in per) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Command-line entry point; returns the results."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                 allow_abbrev=False)
    ap.add_argument("--run", required=True, help="run folder written by train.py")
    ap.add_argument("--count", type=int, default=None, help="override eval.count (test images)")
    ap.add_argument("--crop", type=int, default=None, help="override eval.crop (centre crop, px)")
    ap.add_argument("--border", type=int, default=0, help="score only pixels this far from the edges")
    ap.epilog = "Any config value: --section.key VALUE, e.g. --eval.seed 1 (the span_sr dialect)."
    args, rest = ap.parse_known_args(argv)
    run = Path(args.run)
    try:
        cfg = apply_options(load_config(run / "config.yaml"), rest)
        for key in ("count", "crop"):  # --count/--crop are eval.count/eval.crop, checked the same way
            if getattr(args, key) is not None:
                apply_options(cfg, [f"--eval.{key}", str(getattr(args, key))])
    except (FileNotFoundError, ValueError) as err:
        raise SystemExit(f"evaluate.py: {err}") from None
    problem = missing_data(cfg, "eval")
    if problem:
        raise SystemExit(problem)
    ev = cfg["eval"]
    torch.set_num_threads(cfg["threads"])
    device = pick_device(cfg["device"])
    bd = args.border
    if bd < 0:
        raise SystemExit(f"--border {bd} must be >= 0 (pixels left out at every edge).")
    images, where = eval_set(cfg)
    base = load_model(run / "base.safetensors").to(device)
    multi = copy.deepcopy(base)
    names = [convlora.load_adapter(multi, run / "adapters" / f"{t}.safetensors", name=t) for t in cfg["tasks"]]
    n_base = sum(p.numel() for p in base.parameters())
    where += f", {bd}px border left out" if bd else ""
    results: dict[str, Any] = {"base_params": n_base, "where": where, "border": bd, "tasks": {}}
    for tname in [cfg["base"]["task"], *names]:
        task, t0 = get_task(tname), time.perf_counter()
        kernels = eval_kernels(task, resolve_path(ev["levin"]), ev["seed"]) if task.kind == "blur" else []
        cases = degraded_cases(task, images, kernels, ev["seed"])
        r: dict[str, Any] = {"test_set": where + (f" × {len(kernels)} kernels" if kernels else ""),
                             "kernels": [f"k{i + 1}" for i in range(len(kernels))],
                             "input": score(None, cases, border=bd), "base": score(base, cases, device, bd)}
        if tname in names:
            convlora.set_adapter(multi, tname)
            r["adapter"] = score(multi, cases, device, bd)
            tensors, _ = convlora.read_adapter(run / "adapters" / f"{tname}.safetensors")
            r["adapter_params"] = sum(t.numel() for t in tensors.values())
            r.update(_exactness(run, multi, tname, cases[0][2][None], device))
            ft = run / "finetune" / f"{tname}.safetensors"
            r["finetune"] = score(load_model(ft).to(device), cases, device, bd) if ft.is_file() else None
        results["tasks"][tname] = r
        print(f"{tname}: {len(cases)} cases in {time.perf_counter() - t0:.0f}s, PSNR (dB) / SSIM:  input {_fmt(r['input'])}  "
              f"base {_fmt(r['base'])}  adapter {_fmt(r.get('adapter'))}  full {_fmt(r.get('finetune'))}",
              flush=True)
    table = markdown(results)
    print(table)
    stem = f"results_border{bd}" if bd else "results"
    write_json(run / f"{stem}.json", results)
    write_atomically(run / f"{stem}.md", lambda tmp: Path(tmp).write_text(table + "\n"))
    return results


if __name__ == "__main__":
    try:
        main()
    except (FileNotFoundError, ValueError) as err:  # a missing run folder, weights or image file: one line
        raise SystemExit(f"error: {err}") from None
    except KeyboardInterrupt:
        raise SystemExit(stopped("evaluate.py")) from None
