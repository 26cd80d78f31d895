"""Configuration of a run: dataclasses, YAML files (PyYAML), dotted command-line overrides.

A DSCLoRA run is one :class:`Config` (sections ``data``, ``model``, ``loss``, ``train``,
``demo``), read from a YAML file; then every key can be overridden on the command line::

    python examples/span_sr/train.py --config examples/span_sr/configs/dsclora_x4.yaml \\
        --data.train ../shared/data/train/sr/BSD200 ../shared/data/train/sr/T91 \\
        --teacher span_ch28 --train.steps 2000 --train.lr 5e-5

The dialect, shared with ``examples/restoration`` (whose configs are nested dicts):
``--section.key VALUE`` sets one key, ``--key=VALUE`` works too; a key whose last part is unique
across sections may be given without its section (``--teacher`` is ``--model.teacher``); list
keys take every value up to the next ``--option``; ``none``/``null`` clears an optional key; a
bare ``--flag`` is ``true``. Values arrive as strings and are typed by the dataclass field they
set (for a dict config: read as a number, bool or null when they look like one; a list key takes
a list). The resolved config is written
into the run folder as ``config.yaml`` (:func:`dump_yaml`) and read back on resume.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import types
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

__all__ = [
    "Config",
    "DataConfig",
    "DemoConfig",
    "LossConfig",
    "ModelConfig",
    "Range",
    "Rule",
    "TeacherCacheConfig",
    "TrainConfig",
    "apply_overrides",
    "check_value",
    "dump_yaml",
    "load_config",
    "parse_args",
    "split_options",
]

DEFAULT_TAPS = [f"block_{i}" for i in range(1, 7)] + ["conv_2"]


@dataclass
class DataConfig:
    """Training and validation data.

    Sources are folders of images (``.png``/``.jpg``/``.bmp``/``.tif``/``.webp``, or pre-decoded
    uint8 ``.npy``/``.u8.xz`` arrays) or ``skimage:NAME`` for an image bundled with scikit-image.
    """

    train: list[str] = field(default_factory=list)
    val: list[str] = field(default_factory=list)  # empty: hold out `val_holdout` training images
    val_holdout: int = 8
    test: list[str] = field(default_factory=list)  # `<set>/HR` folders, reported at the end only
    scale: int = 4
    patch: int = 64  # LR patch side; the HR patch is `patch * scale`
    batch: int = 32  # global batch (split evenly over DDP ranks)
    lr_mode: str = "cache"  # "cache": MATLAB-exact uint8 LR made once; "float": on the fly
    cache_dir: str = ""  # decoded HR + LR arrays; "" = `<out>/../.cache`
    workers: int = 2
    small: str = "skip"  # images smaller than the HR patch: "skip" (warn) or "error"
    val_max_side: int = 0  # crop validation HR to at most this side (0 = whole image)
    augment: bool = True  # random flips and transposes (the dihedral group) of each patch
    upcycle_share: float = 0.0  # share of each global batch that is upcycled: LR-sized crops of the HR
    # images fed as inputs, labelled by the teacher only (no L1(SR, HR) on them)
    upcycle_side: int = 128  # upcycled inputs come from the centre crop of each HR image of this side (0 = whole
    # image; the teacher then runs on every HR pixel, 16x the LR cost at x4)
    invert: float = 0.0  # probability of a colour inversion (255 - x) of a sample; with cached teacher outputs
    # the target is inverted too (1 - T(x): the inversion undone on the teacher's output)
    teacher_only: list[str] = field(default_factory=list)  # image folders used as inputs only, labelled by the
    # teacher alone (no D(SR, HR) on them; e.g. lossy JPEGs whose HR has artefacts); never in `train`
    teacher_only_share: float = 0.0  # share of each global batch that is teacher-only rows (needs `teacher_only`)


@dataclass
class ModelConfig:
    """Student base, teacher and the LoRA placement.

    ``base``/``teacher`` are a file path or a name looked up as ``<weights_dir>/<name>.pth``.
    ``teacher: base`` distils from the student's own base weights. An empty ``base`` or
    ``teacher`` is only allowed with ``demo.enabled``: the demo then trains a small substitute.
    ``lora`` is a YAML file of ``convlora.LoRAConfig`` fields; a relative path is looked up in the
    working directory, then in ``examples/span_sr/`` (the default is the paper's placement).
    """

    base: str = "span_tiny_ch26"
    teacher: str = "span_ch28"
    weights_dir: str = "../shared/data/weights"  # relative paths are relative to the repo root
    lora: str = "configs/dsclora_lora.yaml"
    teacher_ensemble: int = 1  # x8 = the teacher's geometric self-ensemble (ensemble.py): the mean over the
    # eight flips/transposes of its input; 1 = the plain teacher
    full_finetune: bool = False  # baseline: no adapters, every parameter of the student trains (`lora` unused);
    # the run then writes no adapter.safetensors, only the merged (plain SPAN) weights


@dataclass
class LossConfig:
    """Distillation loss: ``w_rec*D(SR,HR) + w_out*D(SR,SR_teacher) + w_aff*mean_taps(aff)``, ``D`` = ``pixel``."""

    w_rec: float = 0.2
    w_out: float = 0.8
    w_aff: float = 0.0
    pixel: str = "l1"  # pixel loss of both output terms: "l1" or "mse" (the squared error PSNR measures)
    p: int = 2  # affinity loss exponent: 1 = FAKD's mean |A_s - A_t|, 2 = squared (Gram identity)
    pool: int = 0  # average-pool factor before the affinity (0 = exact)
    aff_warmup: int = 0  # steps over which w_aff ramps up linearly from 0
    aff_norm: bool = True  # divide each tap by its base-vs-teacher value at the start (floored at 1% of the
    # largest tap): every tap starts near 1 and the whole term near w_aff
    taps: list[str] = field(default_factory=lambda: list(DEFAULT_TAPS))
    teacher_taps: list[str] = field(default_factory=list)  # the teacher's modules paired with `taps`, for a
    # non-SPAN teacher (spandrel module names, e.g. CRAFT's layers.0); empty = the same names as `taps`


@dataclass
class TeacherCacheConfig:
    """Teacher-output cache (``teacher_cache.py``): the teacher's SR of every whole training LR image, on disk.

    Needs ``data.lr_mode: cache`` and ``loss.w_aff: 0`` (the affinity term needs the live teacher).
    """

    enabled: bool = False
    dtype: str = "float16"  # stored precision: "float16" (error <= 2.4e-4 below 1: 1/16 of a uint8 level) or "float32"
    compute: str = "float32"  # the teacher's forward dtype ("bfloat16"/"float16" on CUDA only)
    tile: int = 0  # LR tile side of the teacher's forward (0 = whole image); part of the key
    pad: int = 21  # tile margin in LR pixels (SPAN's receptive-field radius); part of the key
    dir: str = ""  # "" = `<data.cache_dir>/teacher`
    build_device: str = "auto"  # where the cache is built: "auto" (CUDA when present), "cpu" or "cuda"


@dataclass
class TrainConfig:
    """Optimisation, schedule, logging and checkpointing."""

    steps: int = 2000
    lr: float = 5e-5
    betas: list[float] = field(default_factory=lambda: [0.9, 0.99])
    weight_decay: float = 0.0
    schedule: str = "cosine"  # "cosine", "multistep" or "constant" (all after a linear warm-up)
    warmup: int = 100
    min_lr: float = 0.0  # cosine floor, as a fraction of `lr`
    milestones: list[int] = field(default_factory=list)  # multistep only
    gamma: float = 0.5
    clip: float = 1.0  # max global grad norm (0 = off)
    ema: float = 0.0  # decay of an EMA of the adapters used for validation/export (0 = off)
    amp: bool = True  # bf16 autocast, CUDA only
    channels_last: bool = True  # CUDA only
    compile: bool = False
    device: str = "auto"
    threads: int = 0  # CPU intra-op threads (0 = torch's default; 1 is far faster on a shared, busy CPU)
    seed: int = 0
    log_every: int = 50
    val_every: int = 500
    ckpt_every: int = 500
    stop_after: int = 0  # interrupt (checkpoint + exit) after this many steps of this process
    time_limit: float = 0.0  # seconds; when reached, finish early as if `steps` were reached
    progress: bool = True  # tqdm bar; otherwise a line per log interval


@dataclass
class DemoConfig:
    """Demo substitutes: short from-scratch training of a teacher and base when none is given."""

    enabled: bool = False
    teacher_width: int = 24
    base_width: int = 12
    teacher_steps: int = 600
    base_steps: int = 300
    lr: float = 2e-3
    patch: int = 24
    batch: int = 8


@dataclass(frozen=True)
class Range:
    """The numbers a config key allows: finite, at least ``lo`` (above it with ``lo_open``), at most
    ``hi`` (below it with ``hi_open``); for a list key, every item."""

    lo: float | None = None
    hi: float | None = None
    lo_open: bool = False
    hi_open: bool = False

    def allows(self, value: float) -> bool:
        """Whether ``value`` is in the range."""
        if not math.isfinite(value):
            return False
        if self.lo is not None and (value <= self.lo if self.lo_open else value < self.lo):
            return False
        return self.hi is None or (value < self.hi if self.hi_open else value <= self.hi)

    def __str__(self) -> str:
        parts = [f"{'>' if self.lo_open else '>='} {self.lo:g}" if self.lo is not None else "",
                 f"{'<' if self.hi_open else '<='} {self.hi:g}" if self.hi is not None else ""]
        return "a finite number " + " and ".join(p for p in parts if p) if any(parts) else "a finite number"


Rule = Range | tuple[Any, ...]
"""A :class:`Range` of numbers, or a tuple of the allowed values."""

_POS, _NONNEG, _UNIT = Range(1), Range(0), Range(0, 1)
_CHOICES: dict[str, Rule] = {
    "data.lr_mode": ("cache", "float"),
    "data.small": ("skip", "error"),
    "teacher_cache.dtype": ("float16", "float32"),
    "teacher_cache.compute": ("float32", "bfloat16", "float16"),
    "teacher_cache.build_device": ("auto", "cpu", "cuda"),
    "train.schedule": ("cosine", "multistep", "constant"),
    "loss.pixel": ("l1", "mse"),
    "model.teacher_ensemble": (1, 2, 4, 8),
    "train.device": ("auto", "cpu", "cuda"),
    "data.val_holdout": _NONNEG, "data.scale": Range(1, 8), "data.patch": Range(1, 4096),
    "data.batch": Range(1, 1 << 16), "data.workers": Range(0, 256), "data.val_max_side": _NONNEG,
    "loss.w_rec": _NONNEG, "loss.w_out": _NONNEG, "loss.w_aff": _NONNEG, "loss.p": Range(1, 2),
    "loss.pool": Range(0, 64), "loss.aff_warmup": _NONNEG,
    "train.steps": _POS, "train.lr": Range(0, 1, lo_open=True), "train.betas": Range(0, 1, hi_open=True),
    "train.weight_decay": _NONNEG, "train.warmup": _NONNEG, "train.min_lr": _UNIT, "train.milestones": _POS,
    "train.gamma": Range(0, 1, lo_open=True), "train.clip": _NONNEG, "train.ema": Range(0, 1, hi_open=True),
    "train.threads": Range(0, 1024), "train.seed": Range(0, 2**63 - 1), "train.log_every": _POS,
    "train.val_every": _NONNEG, "train.ckpt_every": _NONNEG, "train.stop_after": _NONNEG,
    "train.time_limit": _NONNEG,
    "demo.teacher_width": Range(1, 1024), "demo.base_width": Range(1, 1024), "demo.teacher_steps": _POS,
    "demo.base_steps": _POS, "demo.lr": Range(0, 1, lo_open=True), "demo.patch": Range(1, 4096),
    "demo.batch": Range(1, 1 << 16),
    "data.upcycle_share": _UNIT, "data.upcycle_side": _NONNEG, "data.invert": _UNIT, "data.teacher_only_share": _UNIT,
    "teacher_cache.tile": _NONNEG, "teacher_cache.pad": _NONNEG,
}
_LENGTHS = {"train.betas": 2}



@dataclass
class Config:
    """A whole training run (see the module docstring for the command line)."""

    out: str = "runs/dsclora"
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    teacher_cache: TeacherCacheConfig = field(default_factory=TeacherCacheConfig)
    demo: DemoConfig = field(default_factory=DemoConfig)

    def to_dict(self) -> dict[str, Any]:
        """Plain nested dict (lists copied), as written to ``config.yaml``."""
        return dataclasses.asdict(self)


def dump_yaml(data: Mapping[str, Any]) -> str:
    """``data`` as block-style YAML, keys in their order (what ``config.yaml`` holds)."""
    return yaml.safe_dump(dict(data), sort_keys=False, default_flow_style=False, width=120)


def _scalar(text: str) -> Any:
    """A command-line value: bool, None, int or float when it reads as one (``1e-3`` too), else the string."""
    low = text.strip().lower()
    if low in ("true", "yes", "on"):
        return True
    if low in ("false", "no", "off"):
        return False
    if low in ("none", "null", "~"):
        return None
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    if text.strip()[:1] in ("[", "{"):
        return yaml.safe_load(text)
    return text


def _coerce(value: Any, hint: Any, key: str) -> Any:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        hint = next(a for a in args if a is not type(None))
        origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is list:
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null", "[]")):
            return []
        items = value if isinstance(value, list) else [value]
        return [_coerce(v, args[0], key) for v in items]
    if isinstance(value, str) and hint is not str:
        value = _scalar(value)
    if hint is bool and isinstance(value, bool):
        return value
    if (hint is int and isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
            and float(value) == int(value)):
        return int(value)
    if hint is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        if not math.isfinite(value):
            raise ValueError(f"config key {key!r}: {value!r} is not a finite number; give one (e.g. --{key} 0.5)")
        return float(value)
    if hint is str and not isinstance(value, (list, dict)):
        return "" if value is None else str(value)
    raise ValueError(f"config key {key!r}: {value!r} is not a valid {getattr(hint, '__name__', hint)}; "
                     f"give a value of that type (e.g. --{key} ...)")


def check_value(key: str, value: Any, hint: Any, rule: Rule | None = None) -> Any:
    """``value`` typed by the annotation ``hint`` (``"1e-3"`` is a float) and checked against ``rule``.

    Raises:
        ValueError: one line naming ``key``, the value and what is allowed.
    """
    typed = _coerce(value, hint, key)
    if rule is None:
        return typed
    for item in typed if isinstance(typed, list) else [typed]:
        if item is None:
            continue
        shown = f"{item!r} (in {value!r})" if isinstance(typed, list) else repr(value)
        if isinstance(rule, Range):
            if not rule.allows(item):
                raise ValueError(f"config key {key!r}: {shown} is out of range; give {rule}")
        elif item not in rule:
            raise ValueError(f"config key {key!r}: {shown} is not one of {list(rule)}")
    return typed


def _apply_mapping(obj: Any, data: Mapping[str, Any], prefix: str = "") -> None:
    """Set the fields of the dataclass ``obj`` (sections recursively) from ``data``, typed by the field hints."""
    hints = typing.get_type_hints(type(obj))
    names = {f.name for f in dataclasses.fields(obj)}
    for key, value in data.items():
        full = prefix + key
        if key not in names:
            raise ValueError(f"unknown config key {full!r}; valid keys here: {sorted(names)}")
        current = getattr(obj, key)
        if dataclasses.is_dataclass(current):
            if not isinstance(value, Mapping):
                raise ValueError(f"config key {full!r} is a section; give a mapping, not {value!r}")
            _apply_mapping(current, value, full + ".")
            continue
        value = check_value(full, value, hints[key], _CHOICES.get(full))
        if full in _LENGTHS and len(value) != _LENGTHS[full]:
            raise ValueError(f"config key {full!r}: {value!r} has {len(value)} items; give {_LENGTHS[full]}")
        setattr(obj, key, value)


def _as_tree(cfg: Config | dict[str, Any]) -> dict[str, Any]:
    return cfg.to_dict() if isinstance(cfg, Config) else cfg


def _dotted_keys(tree: Mapping[str, Any]) -> dict[str, str]:
    """Every dotted key of a two-level tree, and every unique leaf name, mapped to its dotted key."""
    full: dict[str, str] = {}
    leaves: dict[str, list[str]] = {}
    for section, value in tree.items():
        full[section] = section
        if isinstance(value, Mapping):
            for leaf in value:
                full[f"{section}.{leaf}"] = f"{section}.{leaf}"
                leaves.setdefault(leaf, []).append(f"{section}.{leaf}")
    for leaf, owners in leaves.items():
        if leaf not in full:
            full[leaf] = owners[0] if len(owners) == 1 else ""
    return full


def _typed_like(current: Any, value: str | list[str], key: str) -> Any:
    """A dict config's value: YAML-parsed; a list key takes a list, a scalar key one value."""
    if isinstance(current, list):
        items = value if isinstance(value, list) else [value]
        if items == ["[]"] or (len(items) == 1 and items[0].lower() in ("none", "null")):
            return []
        return [_scalar(v) for v in items]
    if isinstance(value, list):
        raise ValueError(f"config key {key!r} takes one value, got {value}")
    return _scalar(value)


def apply_overrides(cfg: Any, overrides: Mapping[str, str | list[str]]) -> None:
    """Apply dotted (or unique leaf-name) ``overrides`` to ``cfg`` in place.

    Args:
        cfg: A :class:`Config` (values typed by its fields) or a nested dict (values parsed as YAML).
        overrides: From :func:`split_options`: ``{"train.steps": "200", "data.train": ["a", "b"]}``.

    Raises:
        ValueError: an unknown or ambiguous option (the message lists the valid ones) or a value of
            the wrong type; ``cfg`` is left unchanged then.
    """
    tree = _as_tree(cfg)
    keys = _dotted_keys(tree)
    settable = sorted(k for k in keys if "." in k or (k in tree and not isinstance(tree[k], Mapping)))
    nested: dict[str, Any] = {}
    for key, value in overrides.items():
        dotted = keys.get(key)
        if not dotted:
            owners = sorted(k for k in keys if k.endswith("." + key))
            if owners:
                raise ValueError(f"option --{key} is ambiguous; write one of " + ", ".join(f"--{k}" for k in owners))
            raise ValueError(f"unknown option --{key}; valid options: " + ", ".join(f"--{k}" for k in settable))
        *parents, leaf = dotted.split(".")
        node = nested
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    if dataclasses.is_dataclass(cfg):
        _apply_mapping(copy.deepcopy(cfg), nested)  # a bad value raises before anything changes
        _apply_mapping(cfg, nested)
        return
    staged: list[tuple[dict[str, Any], str, Any]] = []
    for section, value in nested.items():
        if isinstance(value, dict) and isinstance(cfg[section], Mapping):
            for leaf, raw in value.items():
                staged.append((cfg[section], leaf, _typed_like(cfg[section][leaf], raw, f"{section}.{leaf}")))
        else:
            staged.append((cfg, section, _typed_like(cfg[section], value, section)))
    for node, leaf, typed in staged:
        node[leaf] = typed


def split_options(argv: Sequence[str]) -> dict[str, str | list[str]]:
    """``--key value``, ``--key=value``, ``--key v1 v2 ...`` (a list) and bare ``--flag`` (``"true"``) tokens as a dict.

    Raises:
        ValueError: a token that is not an option (the message shows the form).
    """
    options: dict[str, str | list[str]] = {}
    i = 0
    while i < len(argv):
        token = argv[i]
        if not token.startswith("--") or token == "--":
            raise ValueError(f"unexpected argument {token!r}; options look like --section.key VALUE")
        key, eq, inline = token[2:].partition("=")
        values = [inline] if eq else []
        i += 1
        while not eq and i < len(argv) and not (argv[i].startswith("--") and len(argv[i]) > 2):
            values.append(argv[i])
            i += 1
        options[key] = values if len(values) > 1 else (values[0] if values else "true")
    return options


def parse_args(argv: Sequence[str]) -> tuple[str | None, str | None, dict[str, str | list[str]]]:
    """Split a training command line into ``(config path, resume folder, overrides)``."""
    options = split_options(argv)
    paths: dict[str, str | None] = {}
    for key in ("config", "resume"):
        value = options.pop(key, None)
        if isinstance(value, list):
            raise ValueError(f"--{key} takes one path, got {value}")
        paths[key] = value
    return paths["config"], paths["resume"], options


def load_config(path: str | Path | None, overrides: Mapping[str, str | list[str]] | None = None) -> Config:
    """Build a :class:`Config` from defaults, a YAML file and dotted ``overrides``.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: an unknown key or a value of the wrong type (the message names it).
    """
    cfg = Config()
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"config file {str(path)!r} not found; pass --config PATH to an existing YAML file")
        data = yaml.safe_load(path.read_text()) or {}
        if not isinstance(data, dict):
            raise ValueError(f"config file {str(path)!r} must be a YAML mapping of sections, got {type(data).__name__}")
        _apply_mapping(cfg, data)
    apply_overrides(cfg, overrides or {})
    return cfg
