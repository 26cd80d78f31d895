"""Models of a DSCLoRA run: weight lookup, demo substitutes, the student, the affinity normalisation.

``train.py`` calls these in order: :func:`prepare_weights` (file paths, training demo substitutes
when asked), :func:`load_pair` (base + teacher, same scale), :func:`build_student` (adapters on a
copy of the base) and :func:`affinity_tap_weights` (per-tap normalisation of the affinity loss).
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.distributed as dist

import convlora
from convlora.distill import FeatureTaps, affinity_loss
from examples.span_sr.arch import SPAN
from examples.span_sr.config import Config
from examples.span_sr.data import ImageSet, PatchDataset, rank_batches
from examples.span_sr.span_io import load_span
from examples.span_sr.train_utils import first_tensor, to_float

__all__ = [
    "affinity_tap_weights",
    "build_student",
    "load_pair",
    "load_weights",
    "prepare_weights",
    "resolve_weights",
    "tap_losses",
    "train_substitute",
]

REPO = Path(__file__).resolve().parents[2]


def resolve_weights(spec: str, weights_dir: str) -> Path:
    """A weights file path, or ``<weights_dir>/<spec>.pth`` (``weights_dir`` relative to the repo)."""
    if Path(spec).is_file():
        return Path(spec)
    folder = Path(weights_dir) if Path(weights_dir).is_absolute() else REPO / weights_dir
    candidate = folder / f"{spec}.pth"
    if candidate.is_file():
        return candidate
    known = sorted(p.stem for p in folder.glob("*.pth")) if folder.is_dir() else []
    raise FileNotFoundError(f"weights {spec!r} not found (tried {spec!r} and {str(candidate)!r}); "
                            f"give a file path or one of {known or 'the names in --model.weights_dir'}.")


def load_weights(path: Path) -> SPAN:
    """``load_span`` with an error that names the file."""
    try:
        return load_span(path)
    except Exception as err:
        raise ValueError(f"cannot load SPAN weights from {str(path)!r}: {err}") from err


def train_substitute(width: int, steps: int, images: ImageSet, cfg: Config, device: torch.device,
                     seed: int, label: str) -> SPAN:
    """Demo only: train a small deploy-form SPAN from scratch with L1 (a stand-in for pretrained weights)."""
    torch.manual_seed(seed)
    model = SPAN(feature_channels=width, upscale=cfg.data.scale, form="deploy").to(device)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.demo.lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * s / steps)))
    data = PatchDataset(images, cfg.demo.patch, seed)
    t0 = time.time()
    for step, idx in enumerate(rank_batches(0, steps, cfg.demo.batch)):
        lr, hr = (torch.stack(x) for x in zip(*(data[i] for i in idx)))
        loss = (model(to_float(lr, device)) - to_float(hr, device)).abs().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if (step + 1) % max(1, steps // 4) == 0:
            print(f"  [demo substitute {label}] step {step + 1}/{steps} L1 {loss.item():.4f} ({time.time() - t0:.0f}s)")
    return model.eval()


def prepare_weights(cfg: Config, run: Path, images: ImageSet, device: torch.device, main_proc: bool,
                    world: int, say: Callable[..., None]) -> dict[str, str]:
    """Weight files by role (``"base"``, and ``"teacher"`` unless it is ``base``).

    An empty role with ``demo.enabled`` gets a substitute trained on ``images`` (once, kept as
    ``<run>/demo_<role>.pth``; rank 0 writes it, the others wait).

    Raises:
        ValueError: an empty role without the demo.
        FileNotFoundError: a name that is neither a file nor in ``model.weights_dir``.
    """
    weights: dict[str, str] = {}
    for role in ("teacher", "base"):
        spec = getattr(cfg.model, role)
        if spec == "" or (cfg.demo.enabled and spec in ("", "none")):
            if not cfg.demo.enabled:
                raise ValueError(f"model.{role} is empty; give weights or enable the demo substitute.")
            path = run / f"demo_{role}.pth"
            if not path.is_file():
                say(f"DEMO SUBSTITUTE: no pretrained {role} given; training a SPAN width "
                    f"{getattr(cfg.demo, role + '_width')} from scratch for {getattr(cfg.demo, role + '_steps')} steps "
                    "(a tiny stand-in trained for seconds: it, and the student built on it, score below "
                    "plain bicubic upscaling; pass real weights for real results)")
                model = train_substitute(getattr(cfg.demo, role + "_width"), getattr(cfg.demo, role + "_steps"),
                                         images, cfg, device, cfg.train.seed + (1 if role == "teacher" else 2), role)
                if main_proc:
                    torch.save({k: v.cpu() for k, v in model.state_dict().items()}, path)
                if world > 1:
                    dist.barrier()
            weights[role] = str(path)
        elif not (role == "teacher" and spec == "base"):
            weights[role] = str(resolve_weights(spec, cfg.model.weights_dir))
    return weights


def load_pair(weights: dict[str, str], scale: int) -> tuple[SPAN, SPAN]:
    """``(base, teacher)`` from :func:`prepare_weights`' files (the teacher is a copy of the base if absent).

    Raises:
        ValueError: a file that is not SPAN weights, or scales that differ from each other or ``scale``.
    """
    base = load_weights(Path(weights["base"]))
    teacher = copy.deepcopy(base) if "teacher" not in weights else load_weights(Path(weights["teacher"]))
    if teacher.upscale != base.upscale or base.upscale != scale:
        raise ValueError(f"scales differ: student base x{base.upscale}, teacher x{teacher.upscale}, data x{scale}; "
                         "use weights of the same scale and set --data.scale to it.")
    return base, teacher


def build_student(base: SPAN, lora: str) -> torch.nn.Module:
    """The DSCLoRA student: a deep copy of ``base`` with adapters, only the adapters trainable."""
    from examples.span_sr.lora_config import build_dsclora

    student = copy.deepcopy(base)
    # "dsclora": the paper's placement; anything else is a YAML file of convlora.LoRAConfig fields
    student = build_dsclora(student) if lora == "dsclora" else build_dsclora(student, lora)
    convlora.mark_only_lora_trainable(student)
    return student


@torch.no_grad()
def tap_losses(base: torch.nn.Module, teacher: torch.nn.Module, taps: dict[str, str], data: PatchDataset,
               cfg: Config, device: torch.device) -> dict[str, float]:
    """Affinity loss per tap between the untouched base and the teacher on step 0's global batch.

    It depends on neither the rank nor the resume point, so every process of every (resumed)
    run derives the same per-tap normalisation from it.
    """
    lr = to_float(torch.stack([data[i][0] for i in range(cfg.data.batch)]), device)
    with FeatureTaps(base, taps.keys(), select=first_tensor) as s_taps, \
            FeatureTaps(teacher, taps, select=first_tensor) as t_taps:
        base(lr)
        teacher(lr)
        s_feats, t_feats = s_taps.pop(), t_taps.pop()
    return {k: float(affinity_loss(s_feats[k], t_feats[k], p=cfg.loss.p, pool=cfg.loss.pool or None)) for k in taps}


def affinity_tap_weights(base: torch.nn.Module, teacher: torch.nn.Module, taps: dict[str, str],
                         images: ImageSet, cfg: Config, device: torch.device,
                         say: Callable[..., None]) -> tuple[list[float] | None, float]:
    """``(tap_weights, w_aff)`` for the Distiller: every tap starts at 1, the whole term at ``w_aff``.

    Without ``loss.w_aff`` or ``loss.aff_norm`` the taps are unweighted: ``(None, loss.w_aff)``.
    """
    if not (cfg.loss.w_aff and cfg.loss.aff_norm):
        return None, cfg.loss.w_aff
    init = tap_losses(base, teacher, taps, PatchDataset(images, cfg.data.patch, cfg.train.seed), cfg, device)
    floor = 0.01 * max(init.values())  # a tap where student and teacher already agree is not blown up
    tap_weights = [1.0 / max(init[k], floor, 1e-12) for k in taps]
    say("affinity per tap at the start (base vs teacher): " + ", ".join(f"{k} {v:.3g}" for k, v in init.items()))
    return tap_weights, cfg.loss.w_aff * sum(tap_weights) / len(tap_weights)
