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

The YAML reader/writer lives in ``yaml_io.py`` (PyYAML when installed, else a built-in reader of
the subset these configs use); argument parsing and typed overrides live in ``config_cli.py``.
``dump_yaml`` and ``parse_args`` are re-exported here.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from examples.span_sr.config_cli import apply_mapping, apply_overrides, parse_args
from examples.span_sr.yaml_io import dump_yaml, read_yaml

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
        apply_mapping(cfg, read_yaml(path))
    apply_overrides(cfg, overrides or {})
    return cfg
