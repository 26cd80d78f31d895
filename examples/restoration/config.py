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

import torch
import yaml

from examples.restoration.degrade import TASKS
from examples.restoration.model import ARCHS, build_model
from examples.span_sr.config import Range, Rule, apply_overrides, check_value, split_options

__all__ = ["DEFAULTS", "REPO", "SCHEMA", "apply_options", "check_config", "load_config", "missing_data",
           "resolve_path"]

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

_LR, _SEED = Range(0, 1, lo_open=True), Range(0, 2**63 - 1)
SCHEMA: dict[str, tuple[Any, Rule | None]] = {
    "seed": (int, _SEED), "out": (str, None), "threads": (int, Range(1, 1024)),
    "device": (str, ("auto", "cpu", "cuda")),
    "data.source": (str, ("sample", "folders")), "data.folders": (list[str], None),
    "data.limit": (int | None, Range(1)), "data.kernels12": (str | None, None),
    "data.synthetic_kernels": (int, Range(1, 100_000)),
    "model.arch": (str, ARCHS), "model.channels": (int, Range(1, 512)), "model.depth": (int, Range(3, 100)),
    "model.dilations": (list[int] | None, Range(1, 64)), "model.in_channels": (int, Range(1, 64)),
    "train.patch": (int, Range(1, 4096)), "train.batch": (int, Range(1, 65536)), "train.loss": (str, ("l1", "l2")),
    "train.blur_crop": (bool, None),
    "base.task": (str, tuple(TASKS)), "base.steps": (int, Range(1)), "base.lr": (float, _LR),
    "adapter.rank": (int, Range(1, 512)), "adapter.alpha": (float | None, Range(0, 1e6, lo_open=True)),
    "adapter.lr": (float, _LR), "adapter.steps": (int, Range(1)),
    "tasks": (list[str], tuple(TASKS)),
    "finetune.enabled": (bool, None), "finetune.lr": (float, _LR),
    "eval.source": (str, ("sample", "folder")), "eval.folder": (str | None, None),
    "eval.count": (int | None, Range(1)), "eval.crop": (int | None, Range(8, 65536)),
    "eval.levin": (str | None, None), "eval.seed": (int, _SEED),
}
"""Type and allowed values of every config key (dotted), checked by :func:`check_config`.
``model.channels`` is a list of ints for ``SmallUNet``."""

_ARCH_KEYS = {"ResidualCNN": ("arch", "channels", "depth", "dilations", "in_channels"),
              "SmallUNet": ("arch", "channels", "in_channels")}


def check_config(cfg: dict[str, Any]) -> dict[str, Any]:
    """Type every value of ``cfg`` by :data:`SCHEMA` (``"1e-3"`` is a float) and check its range, in place.

    Raises:
        ValueError: one line naming the key, the value and what is allowed; ``cfg`` is unchanged then.
    """
    typed = copy.deepcopy(cfg)
    for section, value in cfg.items():
        if isinstance(DEFAULTS.get(section), dict) and not isinstance(value, dict):
            raise ValueError(f"config key {section!r} is a section; give a mapping, not {value!r}")
    arch = check_value("model.arch", typed["model"].get("arch", "ResidualCNN"), str, ARCHS)
    for key in typed["model"]:
        if key not in _ARCH_KEYS[arch]:
            raise ValueError(f"unknown config key 'model.{key}' for arch {arch}; known keys: {list(_ARCH_KEYS[arch])}")
    for key, (hint, rule) in SCHEMA.items():
        section, _, leaf = key.rpartition(".")
        node = typed[section] if section else typed
        if leaf not in node:
            continue
        if key == "model.channels" and arch == "SmallUNet":
            hint = list[int]
        node[leaf] = check_value(key, node[leaf], hint, rule)
    if typed["data"]["source"] == "folders" and not typed["data"]["folders"]:
        raise ValueError("config key 'data.folders' is empty with data.source 'folders'; list image folders "
                         "(--data.folders A B) or use data.source 'sample'")
    if typed["eval"]["source"] == "folder" and typed["eval"]["folder"] is None:
        raise ValueError("config key 'eval.folder' is null with eval.source 'folder'; give a folder of test images")
    try:
        with torch.device("meta"):  # shapes only: no memory, no weights
            build_model(**typed["model"])
    except (TypeError, ValueError) as err:
        raise ValueError(f"config key 'model': {typed['model']} is not a valid network ({err})") from None
    cfg.clear()
    cfg.update(typed)
    return cfg


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
    return check_config(_merge(DEFAULTS, raw))


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
    trial = copy.deepcopy(cfg)
    apply_overrides(trial, split_options(argv))
    check_config(trial)  # typed and range-checked before ``cfg`` changes
    cfg.clear()
    cfg.update(trial)
    return cfg
