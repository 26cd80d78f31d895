"""Run configuration: YAML files in ``configs/`` merged over :data:`DEFAULTS`.

Relative paths inside a config (data folders, kernel files, ``out``) are resolved against the
repository root, so ``../shared/data/...`` works from any working directory.
"""

from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Any

import yaml

__all__ = ["DEFAULTS", "REPO", "apply_overrides", "load_config", "missing_data", "resolve_path"]

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


def apply_overrides(cfg: dict[str, Any], items: list[str]) -> dict[str, Any]:
    """``cfg`` with ``KEY.PATH=VALUE`` overrides applied (values parsed as YAML), in place.

    Example: ``["train.blur_crop=true", "train.patch=96"]``.

    Raises:
        ValueError: an item has no ``=`` or names a key the config does not have.
    """
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ValueError(f"override {item!r} must look like section.key=value, e.g. train.patch=96.")
        *parents, leaf = key.split(".")
        node = cfg
        for part in parents:
            if not isinstance(node.get(part), dict):
                raise ValueError(f"override {item!r}: {part!r} is not a config section; sections: "
                                 f"{sorted(k for k, v in node.items() if isinstance(v, dict))}.")
            node = node[part]
        if leaf not in node:
            raise ValueError(f"override {item!r}: unknown key {leaf!r}; known keys here: {sorted(node)}.")
        node[leaf] = yaml.safe_load(raw)
    return cfg
