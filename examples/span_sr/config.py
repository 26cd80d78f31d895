"""Configuration of a DSCLoRA training run: dataclasses, YAML files, dotted command-line overrides.

A run is described by one :class:`Config` (sections ``data``, ``model``, ``loss``, ``train``,
``demo``). It is read from a YAML file, then every key can be overridden on the command line::

    python examples/span_sr/train.py --config examples/span_sr/configs/dsclora_x4.yaml \\
        --data.train ../shared/data/train/sr/BSD200 ../shared/data/train/sr/T91 \\
        --teacher span_ch28 --train.steps 2000 --train.lr 5e-5

A key whose last part is unique across sections may be given without its section
(``--teacher`` is ``--model.teacher``, ``--steps`` is ``--train.steps``). List keys take every
value up to the next ``--option``; ``none``/``null`` clears an optional key. The resolved config
is written into the run folder as ``config.yaml`` (:func:`dump_yaml`) and read back on resume.

PyYAML is used when installed; without it a small built-in reader handles the subset these
configs use (nested mappings, scalars, ``[a, b]`` and ``- item`` lists), so training also runs
on a machine with nothing but torch and numpy.
"""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = [
    "Config",
    "DataConfig",
    "DemoConfig",
    "LossConfig",
    "ModelConfig",
    "TrainConfig",
    "dump_yaml",
    "load_config",
    "parse_args",
]

DEFAULT_TAPS = [f"block_{i}" for i in range(1, 7)] + ["conv_2"]


@dataclass
class DataConfig:
    """Training and validation data.

    Sources are folders of images (``.png``/``.jpg``/``.bmp``/``.tif``/``.webp``, or pre-decoded
    uint8 ``.npy``/``.npz`` arrays) or ``skimage:NAME`` for an image bundled with scikit-image.
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


@dataclass
class ModelConfig:
    """Student base, teacher and the LoRA placement.

    ``base``/``teacher`` are a file path or a name looked up as ``<weights_dir>/<name>.pth``.
    ``teacher: base`` distils from the student's own base weights. An empty ``base`` or
    ``teacher`` is only allowed with ``demo.enabled``: the demo then trains a small substitute.
    """

    base: str = "span_tiny_ch26"
    teacher: str = "span_ch28"
    weights_dir: str = "../shared/data/weights"  # relative paths are relative to the repo root
    lora: str = "dsclora"  # "dsclora" (the paper's placement) or a YAML LoRA config file


@dataclass
class LossConfig:
    """Distillation loss: ``w_rec*L1(SR,HR) + w_out*L1(SR,SR_teacher) + w_aff*mean_taps(aff)``."""

    w_rec: float = 0.2
    w_out: float = 0.8
    w_aff: float = 0.0
    p: int = 2  # affinity loss exponent: 1 = FAKD's mean |A_s - A_t|, 2 = squared (Gram identity)
    pool: int = 0  # average-pool factor before the affinity (0 = exact)
    aff_warmup: int = 0  # steps over which w_aff ramps up linearly from 0
    aff_norm: bool = True  # divide each tap by its base-vs-teacher value at the start (floored at 1% of the
    # largest tap): every tap starts near 1 and the whole term near w_aff
    taps: list[str] = field(default_factory=lambda: list(DEFAULT_TAPS))


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
    progress: bool = True  # tqdm bar (when installed); otherwise a line per log interval


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


@dataclass
class Config:
    """A whole training run (see the module docstring for the command line)."""

    out: str = "runs/dsclora"
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    demo: DemoConfig = field(default_factory=DemoConfig)

    def to_dict(self) -> dict[str, Any]:
        """Plain nested dict (lists copied), as written to ``config.yaml``."""
        return dataclasses.asdict(self)


# ----------------------------------------------------------------------------- YAML
def _outside_quotes(text: str) -> list[bool]:
    """For each character: is it outside a quoted string?"""
    flags, quote = [], ""
    for ch in text:
        if quote:
            flags.append(False)
            quote = "" if ch == quote else quote
        else:
            quote = ch if ch in "\"'" else ""
            flags.append(not quote)
    return flags


def _strip_comment(line: str) -> str:
    out = _outside_quotes(line)
    for i, ch in enumerate(line):
        if ch == "#" and out[i] and (i == 0 or line[i - 1] in " \t"):
            return line[:i].rstrip()
    return line.rstrip()


def _split_items(inner: str) -> list[str]:
    out, items, start = _outside_quotes(inner), [], 0
    for i, ch in enumerate(inner):
        if ch == "," and out[i]:
            items.append(inner[start:i])
            start = i + 1
    return items + [inner[start:]]


def _scalar(text: str) -> Any:
    text = text.strip()
    if text == "" or text in ("null", "~", "None", "none"):
        return None
    if text[0] in "\"'":
        return json.loads(text) if text[0] == '"' else text[1:-1].replace("''", "'")
    if text.startswith("[") and text.endswith("]"):
        inner = text[1:-1].strip()
        return [] if not inner else [_scalar(part) for part in _split_items(inner)]
    low = text.lower()
    if low in ("true", "yes", "on"):
        return True
    if low in ("false", "no", "off"):
        return False
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return text


def _parse_yaml_subset(text: str, source: str) -> dict[str, Any]:
    """Read nested mappings, scalars and lists (the subset of YAML the configs use)."""
    lines = []
    for number, raw in enumerate(text.splitlines(), 1):
        body = _strip_comment(raw)
        if body.strip():
            lines.append((number, len(body) - len(body.lstrip()), body.strip()))
    root: dict[str, Any] = {}
    stack: list[tuple[int, Any]] = [(-1, root)]
    pending: tuple[dict[str, Any], str, int] | None = None  # key waiting for a nested block
    for number, indent, body in lines:
        if pending is not None:
            parent, key, key_indent = pending
            if indent > key_indent:
                parent[key] = [] if body.startswith("- ") or body == "-" else {}
                stack.append((indent, parent[key]))
            pending = None
        while stack and indent < stack[-1][0]:
            stack.pop()
        container = stack[-1][1]
        if body.startswith("- ") or body == "-":
            if not isinstance(container, list):
                raise ValueError(f"{source}:{number}: list item {body!r} outside a list")
            container.append(_scalar(body[1:]))
            continue
        if ":" not in body or not isinstance(container, dict):
            raise ValueError(f"{source}:{number}: cannot read {body!r} (expected 'key: value')")
        key, _, value = body.partition(":")
        if value.strip():
            container[key.strip()] = _scalar(value)
        else:
            container[key.strip()] = None
            pending = (container, key.strip(), indent)
    return root


def _read_yaml(path: Path) -> dict[str, Any]:
    text = path.read_text()
    try:
        import yaml
    except ImportError:
        return _parse_yaml_subset(text, str(path))
    data = yaml.safe_load(text)
    return data if data is not None else {}


def _emit(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return repr(value)
    if isinstance(value, float):  # YAML 1.1 (PyYAML) needs a dot in the mantissa: 3.0e-05, not 3e-05
        text = repr(value)
        mantissa, e, exponent = text.partition("e")
        return f"{mantissa}.0e{exponent}" if e and "." not in mantissa else text
    if isinstance(value, list):
        return "[" + ", ".join(_emit(v) for v in value) + "]"
    text = str(value)
    plain = text and text == text.strip() and not any(c in text for c in ":#[],'\"{}&*!|>%@`")
    return text if plain and not isinstance(_scalar(text), (bool, int, float, type(None))) else json.dumps(text)


def dump_yaml(data: dict[str, Any], indent: int = 0) -> str:
    """Write a nested dict of scalars/lists as YAML readable by PyYAML and the built-in reader."""
    out = []
    for key, value in data.items():
        if isinstance(value, dict):
            out.append(" " * indent + f"{key}:\n" + dump_yaml(value, indent + 2))
        else:
            out.append(" " * indent + f"{key}: {_emit(value)}\n")
    return "".join(out)


# ----------------------------------------------------------------------------- building
def _field_type(cls: type, name: str) -> Any:
    return typing.get_type_hints(cls)[name]


def _coerce(value: Any, hint: Any, key: str) -> Any:
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
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
    try:
        if hint is bool:
            if not isinstance(value, bool):
                raise ValueError
            return value
        if hint is int:
            if isinstance(value, bool) or float(value) != int(float(value)):
                raise ValueError
            return int(float(value))
        if hint is float:
            return float(value)
        if hint is str:
            return "" if value is None else str(value)
    except (TypeError, ValueError):
        pass
    else:
        return value
    raise ValueError(f"config key {key!r}: {value!r} is not a valid {getattr(hint, '__name__', hint)}; "
                     f"give a value of that type (e.g. --{key} ...)")


def _apply(obj: Any, data: dict[str, Any], prefix: str = "") -> None:
    names = {f.name for f in dataclasses.fields(obj)}
    for key, value in data.items():
        full = prefix + key
        if key not in names:
            raise ValueError(f"unknown config key {full!r}; valid keys here: {sorted(names)}")
        current = getattr(obj, key)
        if dataclasses.is_dataclass(current):
            if not isinstance(value, dict):
                raise ValueError(f"config key {full!r} is a section; give a mapping, not {value!r}")
            _apply(current, value, full + ".")
        else:
            setattr(obj, key, _coerce(value, _field_type(type(obj), key), full))


def _leaf_keys(cfg: Config) -> dict[str, str]:
    """Map every dotted key and every unique leaf name to its dotted key."""
    full: dict[str, str] = {}
    leaves: dict[str, list[str]] = {}
    for section in dataclasses.fields(cfg):
        value = getattr(cfg, section.name)
        if dataclasses.is_dataclass(value):
            for f in dataclasses.fields(value):
                dotted = f"{section.name}.{f.name}"
                full[dotted] = dotted
                leaves.setdefault(f.name, []).append(dotted)
        else:
            full[section.name] = section.name
    for leaf, owners in leaves.items():
        if len(owners) == 1 and leaf not in full:
            full[leaf] = owners[0]
    return full


def load_config(path: str | Path | None, overrides: dict[str, Any] | None = None) -> Config:
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
        _apply(cfg, _read_yaml(path))
    keys = _leaf_keys(cfg)
    for key, value in (overrides or {}).items():
        if key not in keys:
            raise ValueError(f"unknown option --{key}; valid options: "
                             + ", ".join(f"--{k}" for k in sorted(k for k in keys if "." in k)))
        nested: dict[str, Any] = {}
        node = nested
        *parents, leaf = keys[key].split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
        _apply(cfg, nested)
    return cfg


def parse_args(argv: list[str]) -> tuple[str | None, str | None, dict[str, Any]]:
    """Split ``argv`` into ``(config path, resume dir, overrides)``.

    ``--key value``, ``--key=value`` and ``--key v1 v2 ...`` (lists) are accepted; values stay
    strings here and are typed by :func:`load_config`.
    """
    config: str | None = None
    resume: str | None = None
    overrides: dict[str, Any] = {}
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
        if key in ("config", "resume"):
            if len(values) != 1:
                raise ValueError(f"--{key} takes one path, got {values}")
            config, resume = (values[0], resume) if key == "config" else (config, values[0])
            continue
        if not values:
            values = ["true"]  # bare flag: --train.compile
        overrides[key] = values if len(values) > 1 else values[0]
    return config, resume, overrides
