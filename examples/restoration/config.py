"""Run configuration: YAML files in ``configs/`` merged over :data:`DEFAULTS`, command-line overrides.

Relative paths inside a config (data folders, kernel files, ``out``) are resolved against the
repository root, so ``../shared/data/...`` works from any working directory. Any value can be
overridden on the command line in the dialect of ``examples/span_sr`` (the same code,
:func:`examples.span_sr.config.apply_overrides`): ``--train.blur_crop true --train.patch 96``,
``--tasks deblur_motion noise50`` for a list, ``--adapter.alpha null``.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

from examples.span_sr.config import apply_overrides, split_options

__all__ = ["DEFAULTS", "REPO", "apply_options", "load_config", "missing_data", "resolve_path"]

REPO = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent

DEFAULTS: dict[str, Any] = {
    "seed": 0,
    "out": "runs/restoration_demo",
    "threads": 1,
    "device": "auto",
    "data": {"source": "sample", "folders": [], "limit": None, "kernels12": None,
             "synthetic_kernels": 200},
    # "model" is replaced as a whole (not merged key by key): its keys depend on the arch.
    "model": {"arch": "ResidualCNN", "channels": 32, "depth": 10},
    # blur_crop: blur patches larger by the kernel radius, then cut that band off (no wrap-around)
    "train": {"patch": 40, "batch": 8, "loss": "l1", "blur_crop": False},
    "base": {"task": "noise25", "steps": 300, "lr": 1.0e-3},
    "adapter": {"rank": 1, "alpha": None, "lr": 1.0e-2, "steps": 100},
    "tasks": ["noise50", "deblur_gauss"],
    "finetune": {"enabled": False, "lr": 5.0e-4},
    "eval": {"source": "sample", "folder": None, "count": None, "crop": None,
             "levin": None, "seed": 0},
}


WHOLE = {"model"}  # sections a config replaces entirely


def _merge(base: dict[str, Any], over: dict[str, Any], where: str = "") -> dict[str, Any]:
    out = copy.deepcopy(base)
    for key, value in over.items():
        if key not in base:
            raise ValueError(f"unknown config key {where + key!r}; known keys: {sorted(base)}.")
        if isinstance(base[key], dict) and isinstance(value, dict) and key not in WHOLE:
            out[key] = _merge(base[key], value, f"{where}{key}.")
        else:
            out[key] = value
    return out


def resolve_path(path: str | os.PathLike[str] | None) -> Path | None:
    """``path`` made absolute against the repository root (``None`` stays ``None``)."""
    if path is None:
        return None
    p = Path(path).expanduser()
    return p if p.is_absolute() else REPO / p


def missing_data(cfg: dict[str, Any], part: str) -> str | None:
    """A one-line message naming the configured data paths of ``part`` (``"train"`` or ``"eval"``)
    that do not exist, and where the data sets come from; ``None`` when every one is there."""
    if part == "train":
        data = cfg["data"]
        paths = [("data.folders", f) for f in data["folders"]] if data["source"] == "folders" else []
        paths.append(("data.kernels12", data["kernels12"]))
    elif part == "eval":
        ev = cfg["eval"]
        paths = [("eval.folder", ev["folder"])] if ev["source"] != "sample" else []
        paths.append(("eval.levin", ev["levin"]))
    else:
        raise ValueError(f"missing_data(part={part!r}): use 'train' or 'eval'.")
    gone = [f"{key}={value}" for key, value in paths
            if value is not None and not resolve_path(value).exists()]  # type: ignore[union-attr]
    if not gone:
        return None
    return (f"missing data: {', '.join(gone)} (relative to {REPO}). Where these files come from and "
            "the layout the scripts expect: docs/data.md. The demo needs none: "
            "python examples/restoration/train.py")


def load_config(path: str | os.PathLike[str] | None) -> dict[str, Any]:
    """Read a YAML config (``None``: ``configs/demo.yaml``) and fill in the defaults.

    A relative ``path`` is looked up in the working directory, then in this example's folder.
    """
    if path is None:
        path = HERE / "configs" / "demo.yaml"
    p = Path(path)
    if not p.is_file() and (HERE / p).is_file():
        p = HERE / p
    if not p.is_file():
        raise FileNotFoundError(f"config {str(path)!r} not found (looked in the working directory "
                                f"and {HERE}); see {HERE / 'configs'} for the shipped ones.")
    with p.open() as fh:
        raw = yaml.safe_load(fh) or {}
    if not isinstance(raw, dict):
        raise ValueError(f"config {p} must be a YAML mapping, got {type(raw).__name__}.")
    return _merge(DEFAULTS, raw)


def apply_options(cfg: dict[str, Any], argv: Sequence[str]) -> dict[str, Any]:
    """``cfg`` with the ``--section.key VALUE`` options of ``argv`` applied, in place.

    Raises:
        ValueError: an unknown or ambiguous key, a value of the wrong shape, or the older
            ``--set section.key=value`` form (the message shows the new one); ``cfg`` is unchanged then.
    """
    argv = list(argv)
    old = [argv[i + 1] if a == "--set" and i + 1 < len(argv) else a.removeprefix("--set=")
           for i, a in enumerate(argv) if a == "--set" or a.startswith("--set=")]
    if old:
        new = " ".join(f"--{k} {v}" if sep else f"--{k}" for k, sep, v in (o.partition("=") for o in old))
        raise ValueError(f"--set was replaced by the span_sr dialect: write {new} (lists as --tasks a b)")
    apply_overrides(cfg, split_options(argv))
    return cfg
