"""Train the base restoration CNN on one task, then one ConvLoRA adapter per other task.

    python examples/restoration/train.py                 # demo: scikit-image photos, CPU, ~4 min
    python examples/restoration/train.py --config configs/cpu_subset.yaml   # the docs' table
    python examples/restoration/train.py --config configs/full.yaml         # shared data, GPU-sized
    # one task, longer, on an existing base (the base is copied, not retrained):
    python examples/restoration/train.py --config configs/cpu_subset.yaml --out runs/restoration_motion600 \
        --base runs/restoration_cpu_subset/base.safetensors --tasks deblur_motion --steps 600

Steps: (1) train :class:`~examples.restoration.model.ResidualCNN` on ``base.task`` (all weights);
(2) for each entry of ``tasks``, add a named adapter (``convlora.inject``, ``adapter_name=``), train only its
factors with the base frozen, save it (``convlora.save_adapter``); (3) with ``finetune.enabled``,
fine-tune a copy of the *whole* base for the same steps on the same data stream, for comparison.
Patches are degraded on the fly (:mod:`examples.restoration.degrade`); blur tasks draw a kernel per
patch from :func:`~examples.restoration.kernels.kernel_pool` (never Levin's test kernels).

The run folder gets ``config.yaml``, ``base.safetensors``, ``adapters/<task>.safetensors``,
``finetune/<task>.safetensors`` and ``log.json`` (losses, seconds, parameter counts).
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make `examples.restoration` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch
import torch.nn.functional as F
import yaml
from torch import Tensor, nn

import convlora
from examples.restoration.config import (
    apply_options,
    check_config,
    load_config,
    missing_data,
    resolve_path,
)
from examples.restoration.data import SAMPLE_TRAIN, PatchSampler, folder_images, sample_photos
from examples.restoration.degrade import Task, degrade, get_task, seeded_generator
from examples.restoration.kernels import kernel_pool
from examples.restoration.model import build_model, load_model, save_model
from examples.span_sr.checkpoint import write_json
from examples.span_sr.outputs import refuse_inputs, stopped

__all__ = ["adapter_config", "blur_margin", "draw_batch", "kernel_pools", "main", "pick_device",
           "task_stream", "train_images", "train_steps"]


def train_images(cfg: dict[str, Any]) -> list[Tensor]:
    """The clean training images the config names (``uint8 (3, H, W)``)."""
    data = cfg["data"]
    if data["source"] == "sample":
        return list(sample_photos(SAMPLE_TRAIN).values())
    if data["source"] == "folders":
        folders = [resolve_path(f) for f in data["folders"]]
        return list(folder_images(folders, data["limit"]).values())  # type: ignore[arg-type]
    raise ValueError(f"data.source={data['source']!r}: use 'sample' or 'folders'.")


def kernel_pools(cfg: dict[str, Any], tasks: list[Task]) -> dict[str, Tensor]:
    """Training kernels per blur family used by ``tasks`` (kernels_12.mat if configured + synthetic)."""
    k12 = resolve_path(cfg["data"]["kernels12"])
    families = sorted({t.kernels for t in tasks if t.kind == "blur" and t.kernels})
    return {f: kernel_pool(f, cfg["data"]["synthetic_kernels"], cfg["seed"] + i, k12)
            for i, f in enumerate(families)}


def adapter_config(cfg: dict[str, Any]) -> convlora.LoRAConfig:
    """The LoRA settings of every task adapter (all convs of the network)."""
    return convlora.LoRAConfig(rank=cfg["adapter"]["rank"], alpha=cfg["adapter"]["alpha"])


def draw_batch(sampler: PatchSampler, task: Task, pool: Tensor | None, batch: int,
               generator: torch.Generator, margin: int = 0,
               device: torch.device | str = "cpu") -> tuple[Tensor, Tensor]:
    """One ``(degraded, clean)`` batch: patches, a kernel per patch from ``pool`` (blur tasks), the
    degradation. ``margin > 0`` (:func:`blur_margin`): patches are blurred whole, then both images
    lose ``margin`` pixels per side, the band circular blur wraps the opposite edge into, so they
    look like the inside of a large blurred photo (it did not help deblur_motion; see
    docs/restoration.md)."""
    clean = sampler.sample(batch).to(device)
    kernel = None
    if task.kind == "blur":
        if pool is None:
            raise ValueError(f"task {task.name!r} blurs; pass its kernel pool (kernel_pools()).")
        kernel = pool[torch.randint(len(pool), (batch,), generator=generator)].to(device)
    bad = degrade(clean, task, generator, kernel)
    if margin:
        bad, clean = (t[..., margin:-margin, margin:-margin] for t in (bad, clean))
    return bad, clean


def train_steps(model: nn.Module, params: list[nn.Parameter], sampler: PatchSampler, task: Task,
                pool: Tensor | None, *, steps: int, lr: float, batch: int,
                generator: torch.Generator, loss: str = "l1", log_every: int = 50,
                tag: str = "", margin: int = 0) -> list[float]:
    """Adam with a cosine learning-rate decay on ``params``; returns the loss of every step.
    Batches come from :func:`draw_batch` (``margin``: see there)."""
    if steps < 1:
        return []
    opt = torch.optim.Adam(params, lr=lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * s / steps)))
    loss_fn = {"l1": F.l1_loss, "l2": F.mse_loss}[loss]
    losses: list[float] = []
    device = next(model.parameters()).device
    model.train()
    for step in range(steps):
        bad, clean = draw_batch(sampler, task, pool, batch, generator, margin, device)
        value = loss_fn(model(bad), clean)
        opt.zero_grad(set_to_none=True)
        value.backward()
        opt.step()
        sched.step()
        losses.append(value.item())
        if log_every and (step + 1) % log_every == 0:
            recent = losses[-log_every:]
            print(f"  [{tag}] step {step + 1}/{steps}  loss {sum(recent) / len(recent):.5f}", flush=True)
    model.eval()
    return losses


def blur_margin(cfg: dict[str, Any], task: Task, pool: Tensor | None) -> int:
    """Pixels cut from each side of a blurred training patch: the kernel radius with
    ``train.blur_crop``, else 0 (and always 0 for noise tasks)."""
    if not cfg["train"]["blur_crop"] or task.kind != "blur" or pool is None:
        return 0
    return int(pool.shape[-1]) // 2


def task_stream(cfg: dict[str, Any], images: list[Tensor], name: str,
                margin: int = 0) -> tuple[PatchSampler, torch.Generator]:
    """Patch sampler + degradation generator seeded by ``name``: adapter and full fine-tuning of a
    task see exactly the same patches and noise. Patches are ``train.patch + 2 * margin`` wide."""
    size = cfg["train"]["patch"] + 2 * margin
    fits = [im for im in images if min(im.shape[-2:]) >= size]
    if 0 < len(fits) < len(images):
        print(f"  [{name}] {len(images) - len(fits)} of {len(images)} training images are smaller than "
              f"{size}x{size} patches and are skipped")
    sampler = PatchSampler(fits or images, size, seeded_generator(cfg["seed"], name, "patches"))
    return sampler, seeded_generator(cfg["seed"], name, "degrade")


def pick_device(name: str) -> torch.device:
    """``"auto"``: CUDA when available, else CPU; otherwise the named device."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def _record(losses: list[float], seconds: float, trained: int) -> dict[str, Any]:
    k = max(1, len(losses) // 10)
    return {"steps": len(losses), "seconds": round(seconds, 1), "params_trained": trained,
            "loss_first10pct": sum(losses[:k]) / k, "loss_last10pct": sum(losses[-k:]) / k}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Command-line entry point; returns the training log."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                 allow_abbrev=False)
    ap.add_argument("--config", default=None, help="YAML config (default: configs/demo.yaml)")
    ap.add_argument("--out", default=None, help="run folder (default: the config's 'out')")
    ap.add_argument("--base", default=None, help="reuse this base.safetensors instead of training a base")
    ap.add_argument("--tasks", nargs="+", default=None, help="override 'tasks' (adapter tasks to train)")
    ap.add_argument("--steps", type=int, default=None, help="override adapter.steps (also full fine-tuning)")
    ap.add_argument("--threads", type=int, default=None, help="override 'threads' (torch CPU threads)")
    ap.epilog = "Any other config value: --section.key VALUE, e.g. --train.blur_crop true --train.patch 96."
    args, rest = ap.parse_known_args(argv)
    try:
        cfg = apply_options(load_config(args.config), rest)
    except (FileNotFoundError, ValueError) as err:
        raise SystemExit(f"train.py: {err}") from None
    if args.out:
        cfg["out"] = args.out
    if args.tasks:
        cfg["tasks"] = list(args.tasks)
    if args.steps is not None:
        cfg["adapter"]["steps"] = args.steps
    if args.threads is not None:
        cfg["threads"] = args.threads
    try:
        check_config(cfg)  # --steps/--threads too: every value checked before anything is written
    except ValueError as err:
        raise SystemExit(f"train.py: {err}") from None
    if args.base:
        base_path = Path(args.base)
        if not base_path.is_file():
            raise SystemExit(f"--base {args.base!r} is not a file; pass the base.safetensors of an earlier run")
    out = Path(resolve_path(cfg["out"]) or ".")
    written = [out / "base.safetensors", out / "config.yaml", out / "log.json",
               *(out / sub / f"{t}.safetensors" for sub in ("adapters", "finetune") for t in cfg["tasks"])]
    try:
        refuse_inputs(written, [args.base, args.config, resolve_path(cfg["data"]["kernels12"])], "--out")
    except ValueError as err:
        raise SystemExit(f"train.py: {err}") from None
    problem = missing_data(cfg, "train")
    if problem:  # before the run folder is made: a failed start leaves nothing behind
        raise SystemExit(problem)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    torch.set_num_threads(cfg["threads"])
    torch.manual_seed(cfg["seed"])
    tr = cfg["train"]
    base_task = get_task(cfg["base"]["task"])
    tasks = [get_task(t) for t in cfg["tasks"]]
    images = train_images(cfg)
    pools = kernel_pools(cfg, [base_task, *tasks])
    print(f"{len(images)} training images; tasks: base {base_task.name}, adapters {[t.name for t in tasks]}")
    log: dict[str, Any] = {"base": {}, "adapters": {}, "finetune": {}}

    # (1) base model: every weight trains on the base task
    device = pick_device(cfg["device"])
    if args.base:  # reuse a trained base (same config); it is copied into the run folder
        model = load_model(args.base).to(device)
        n_base = sum(p.numel() for p in model.parameters())
        log["base"] = {"task": base_task.name, "loaded_from": str(args.base), "params_trained": 0}
    else:
        model = build_model(**cfg["model"]).to(device)
        n_base = sum(p.numel() for p in model.parameters())
        pool = pools.get(base_task.kernels or "")
        margin = blur_margin(cfg, base_task, pool)
        sampler, gen = task_stream(cfg, images, base_task.name, margin)
        t0 = time.perf_counter()
        losses = train_steps(model, list(model.parameters()), sampler, base_task, pool,
                             steps=cfg["base"]["steps"], lr=cfg["base"]["lr"], batch=tr["batch"],
                             generator=gen, loss=tr["loss"], tag=f"base {base_task.name}", margin=margin)
        log["base"] = {"task": base_task.name, **_record(losses, time.perf_counter() - t0, n_base)}
    save_model(model, out / "base.safetensors", extra={"task": base_task.name})

    # (2) one named adapter per task on the frozen base; (3) full fine-tuning for comparison
    steps, lora_cfg = cfg["adapter"]["steps"], adapter_config(cfg)
    for task in tasks:
        convlora.inject(model, lora_cfg, adapter_name=task.name)  # freezes the base, activates the adapter
        params = list(convlora.lora_parameters(model, task.name))
        pool = pools.get(task.kernels or "")
        margin = blur_margin(cfg, task, pool)
        sampler, gen = task_stream(cfg, images, task.name, margin)
        t0 = time.perf_counter()
        losses = train_steps(model, params, sampler, task, pool, steps=steps, lr=cfg["adapter"]["lr"],
                             batch=tr["batch"], generator=gen, loss=tr["loss"],
                             tag=f"adapter {task.name}", margin=margin)
        n = sum(p.numel() for p in params)
        log["adapters"][task.name] = {**_record(losses, time.perf_counter() - t0, n),
                                      "fraction_of_base": n / n_base}
        convlora.save_adapter(model, out / "adapters" / f"{task.name}.safetensors", name=task.name,
                              metadata={"task": task.name, "steps": steps, "base_task": base_task.name})
        if cfg["finetune"]["enabled"]:
            full = load_model(out / "base.safetensors").to(device)  # the base as saved above
            sampler, gen = task_stream(cfg, images, task.name, margin)
            t0 = time.perf_counter()
            losses = train_steps(full, list(full.parameters()), sampler, task, pool, steps=steps,
                                 lr=cfg["finetune"]["lr"], batch=tr["batch"], generator=gen,
                                 loss=tr["loss"], tag=f"full fine-tune {task.name}", margin=margin)
            log["finetune"][task.name] = _record(losses, time.perf_counter() - t0, n_base)
            save_model(full, out / "finetune" / f"{task.name}.safetensors", extra={"task": task.name})
        write_json(out / "log.json", log)
    print(convlora.summary(model))
    write_json(out / "log.json", log)
    print(f"wrote {out}")
    try:  # evaluate.py reads --run relative to the working directory
        shown = out.resolve().relative_to(Path.cwd().resolve())
    except ValueError:
        shown = out.resolve()
    print(f"next: python examples/restoration/evaluate.py --run {shown}")
    return log


if __name__ == "__main__":
    try:
        main()
    except FileNotFoundError as err:  # a missing run folder, weights or image file: one line
        raise SystemExit(f"error: {err}") from None
    except KeyboardInterrupt:
        raise SystemExit(stopped("train.py")) from None
