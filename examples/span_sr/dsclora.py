"""DSCLoRA, the method: a SPAN student with ConvLoRA adapters, distilled from a teacher (SPAN or any spandrel model).

Chen et al., "DSCLoRA: distillation and ConvLoRA for efficient super-resolution" (NTIRE 2025
ESR). Everything a reader changes to change the method is in this file:

* the student (:func:`build_student`): a copy of a pretrained deploy-form SPAN with adapters
  placed by a YAML file of ``convlora.LoRAConfig`` fields, ``configs/dsclora_lora.yaml`` by default
  (the authors' placement: every conv of the six SPABs at rank 2, ``conv_2`` and the pixel-shuffle
  conv at rank 8); only the adapters train;
* the teacher and base weights (:func:`resolve_weights`, :func:`load_pair`; a teacher of any
  architecture comes from ``teacher.py``);
* the taps (after each SPAB and ``conv_2``; a SPAB returns ``(out, out1)``, :func:`first_tensor`
  picks ``out``) and their normalisation (:func:`affinity_tap_weights`);
* the loss (:func:`make_loss`): ``w_rec * L1(SR, HR) + w_out * L1(SR, SR_teacher) + w_aff * mean
  over taps of the spatial-affinity loss``, a ``convlora.distill.Distiller`` with a live teacher,
  or two L1 terms on cached teacher outputs (``teacher_cache.py``); :class:`DSCLoRALoss`;
* deployment (:func:`deploy`, :func:`load_deployed`): adapters merged and unloaded, which gives
  back a plain SPAN with the official keys, parameter count and FLOPs.

Note: the released ``dsclora_ch26`` weights are not exactly one such merge on ``span_tiny_ch26``;
the default config reproduces the authors' *placement*, not their weights.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from pathlib import Path
from typing import Any, TypeVar

import torch
import yaml
from torch import nn

import convlora
from convlora.config import match_pattern
from convlora.distill import Distiller, FeatureTaps, affinity_loss, pixel_loss
from examples.span_sr.arch import SPAN, load_span
from examples.span_sr.config import LossConfig
from examples.span_sr.teacher import SpandrelTeacher, load_teacher, teacher_scale, teacher_tap

__all__ = [
    "DSCLORA_YAML",
    "DSCLoRALoss",
    "affinity_tap_weights",
    "build_student",
    "deploy",
    "first_tensor",
    "load_deployed",
    "load_lora_config",
    "load_pair",
    "make_loss",
    "resolve_weights",
    "tap_map",
    "teacher_select",
]

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
DSCLORA_YAML = HERE / "configs" / "dsclora_lora.yaml"
"""The authors' adapter placement (the default of ``model.lora``)."""

_M = TypeVar("_M", bound=nn.Module)

_FIELDS = ("rank", "alpha", "targets", "exclude", "rank_pattern", "alpha_pattern",
           "factorization", "factorization_pattern", "dropout", "freeze")


def load_lora_config(src: str | Path | Mapping[str, Any] = DSCLORA_YAML) -> convlora.LoRAConfig:
    """A ``convlora.LoRAConfig`` from a YAML file or a mapping of its fields.

    A relative path is looked up in the working directory, then in ``examples/span_sr/``.

    Raises:
        FileNotFoundError: no such file.
        ValueError: unknown fields (the allowed ones are listed) or a file that is not a mapping.
    """
    if isinstance(src, Mapping):
        data: Any = dict(src)
    else:
        path = Path(src)
        if not path.is_file() and not path.is_absolute() and (HERE / path).is_file():
            path = HERE / path
        if not path.is_file():
            hint = (" ('dsclora' was the older name of the paper's placement; it is now the default, "
                    f"{DSCLORA_YAML.relative_to(REPO)})" if str(src) == "dsclora" else "")
            raise FileNotFoundError(f"LoRA config {str(src)!r} does not exist{hint}; set --model.lora to a YAML "
                                    "file of convlora.LoRAConfig fields.")
        data = yaml.safe_load(path.read_text())
    if not isinstance(data, dict):
        raise ValueError(f"LoRA config {src!r} must be a mapping of LoRAConfig fields, got {type(data).__name__}.")
    unknown = sorted(set(data) - set(_FIELDS))
    if unknown:
        raise ValueError(f"unknown LoRA config fields {unknown}; allowed: {list(_FIELDS)}.")
    for key in ("targets", "exclude"):
        if isinstance(data.get(key), list):
            data[key] = tuple(data[key])
    return convlora.LoRAConfig(**data)


def build_student(base: SPAN, lora: convlora.LoRAConfig | str | Path | Mapping[str, Any] | None = DSCLORA_YAML) -> SPAN:
    """A copy of ``base`` with adapters placed by ``lora``; only the adapters are trainable.

    ``lora=None`` is the full fine-tuning baseline: no adapters, every parameter trainable.

    Raises:
        ValueError: ``base`` is not a deploy-form SPAN (the adapters go on ``eval_conv``), or a
            ``rank_pattern``/``alpha_pattern`` key of ``lora`` matches no adapted layer (a typo).
    """
    if not isinstance(base, SPAN) or base.form != "deploy":
        raise ValueError(f"the DSCLoRA student needs a deploy-form SPAN, got {type(base).__name__} "
                         f"(form={getattr(base, 'form', None)!r}); call model.reparameterize() first.")
    if lora is None:
        return copy.deepcopy(base).requires_grad_(True)
    config = lora if isinstance(lora, convlora.LoRAConfig) else load_lora_config(lora)
    student = copy.deepcopy(base)
    convlora.inject(student, config)
    adapted = list(convlora.lora_layers(student))
    for key in ("rank_pattern", "alpha_pattern"):
        for pattern in getattr(config, key) or {}:
            if not any(match_pattern(pattern, name) for name in adapted):
                raise ValueError(f"LoRA config {key} key {pattern!r} matches no adapted layer (a typo?); "
                                 f"the adapted layers are {', '.join(adapted)}.")
    convlora.mark_only_lora_trainable(student)
    return student


def resolve_weights(spec: str, weights_dir: str) -> Path:
    """A weights file path, or ``<weights_dir>/<spec>.pth`` (``weights_dir`` relative to the repo).

    Raises:
        FileNotFoundError: neither exists (the message points to docs/data.md).
    """
    if Path(spec).is_file():
        return Path(spec)
    folder = Path(weights_dir) if Path(weights_dir).is_absolute() else REPO / weights_dir
    candidate = folder / f"{spec}.pth"
    if candidate.is_file():
        return candidate
    known = sorted(p.stem for p in folder.glob("*.pth")) if folder.is_dir() else []
    raise FileNotFoundError(f"weights {spec!r} not found (tried {spec!r} and {str(candidate)!r}); give a file path "
                            f"or one of {known or 'the names in --model.weights_dir'} (docs/data.md lists the "
                            "released checkpoints and where to get them).")


def _load(path: Path) -> SPAN:
    try:
        return load_span(path)
    except ValueError as err:
        raise ValueError(f"cannot load SPAN weights from {str(path)!r}: {err}") from err


def load_pair(base: str | Path, teacher: str | Path | None, scale: int) -> tuple[SPAN, nn.Module]:
    """``(base, teacher)``: the base SPAN and a teacher of any architecture (:func:`examples.span_sr.teacher.load_teacher`).

    Without ``teacher`` it is a copy of the base.

    Raises:
        ImportError: a non-SPAN teacher and no spandrel (the message names the ``[spandrel]`` extra).
        ValueError: a base that is not SPAN weights, a teacher no loader knows, or scales that differ
            from each other or ``scale``.
    """
    base_model = _load(Path(base))
    teacher_model = copy.deepcopy(base_model) if teacher is None else load_teacher(teacher)
    if teacher_scale(teacher_model) != base_model.upscale or base_model.upscale != scale:
        raise ValueError(f"scales differ: student base x{base_model.upscale}, teacher x{teacher_scale(teacher_model)}, "
                         f"data x{scale}; use weights of the same scale and set --data.scale to it.")
    return base_model, teacher_model


def first_tensor(output: object) -> torch.Tensor:
    """Tap selector: a SPAB returns ``(out, out1)``; distil its main output."""
    return output[0] if isinstance(output, (tuple, list)) else output  # type: ignore[return-value]


def teacher_select(teacher: nn.Module) -> Any:
    """The tap selector of ``teacher``: :func:`first_tensor`, then (spandrel teachers) cropped to the input's size."""
    if isinstance(teacher, SpandrelTeacher):
        return lambda output: teacher.crop(first_tensor(output))
    return first_tensor


def tap_map(teacher: nn.Module, loss: LossConfig) -> dict[str, str]:
    """``{student tap: teacher module}``: ``loss.taps`` on both sides, or paired with ``loss.teacher_taps``.

    A SPAN teacher has the student's module names; for a spandrel teacher (CRAFT, ...) the user
    gives its module names in ``loss.teacher_taps``, one per student tap (looked up under ``net.``).
    Without them such a teacher has no taps (fine while ``loss.w_aff`` is 0).

    Raises:
        ValueError: ``teacher_taps`` of another length than ``taps``, or ``w_aff > 0`` with a
            non-SPAN teacher and no ``teacher_taps``.
    """
    if loss.teacher_taps:
        if len(loss.teacher_taps) != len(loss.taps):
            raise ValueError(f"loss.teacher_taps has {len(loss.teacher_taps)} names for {len(loss.taps)} loss.taps; "
                             "give one teacher module name per student tap, in the same order.")
        return {s: teacher_tap(teacher, t) for s, t in zip(loss.taps, loss.teacher_taps)}
    if isinstance(teacher, SPAN):
        return {t: t for t in loss.taps}
    if loss.w_aff:
        raise ValueError(f"loss.w_aff={loss.w_aff} with a {type(teacher).__name__} teacher needs loss.teacher_taps: "
                         "the teacher's module names (from model.named_modules()) to pair with loss.taps.")
    return {}


@torch.no_grad()
def affinity_tap_weights(base: nn.Module, teacher: nn.Module, loss: LossConfig, lr: torch.Tensor
                         ) -> tuple[list[float] | None, float, dict[str, float]]:
    """``(tap_weights, w_aff, start)``: every tap's affinity term starts at 1, the whole term at ``w_aff``.

    ``start`` is each tap's affinity loss between the untouched base and the teacher on ``lr``
    (step 0's global batch: it depends on neither the rank nor the resume point, so every process
    of every resumed run derives the same weights). A tap where the two already agree is floored at
    1% of the largest. Without ``loss.w_aff`` or ``loss.aff_norm`` the taps are unweighted:
    ``(None, loss.w_aff, {})``.
    """
    if not (loss.w_aff and loss.aff_norm):
        return None, loss.w_aff, {}
    with FeatureTaps(base, loss.taps, select=first_tensor) as s_taps, \
            FeatureTaps(teacher, tap_map(teacher, loss), select=teacher_select(teacher)) as t_taps:
        base(lr)
        teacher(lr)
        s_feats, t_feats = s_taps.pop(), t_taps.pop()
    start = {k: float(affinity_loss(s_feats[k], t_feats[k], p=loss.p, pool=loss.pool or None)) for k in loss.taps}
    floor = 0.01 * max(start.values())
    tap_weights = [1.0 / max(start[k], floor, 1e-12) for k in loss.taps]
    return tap_weights, loss.w_aff * sum(tap_weights) / len(tap_weights), start


class DSCLoRALoss:
    """The DSCLoRA loss, with a live teacher or with cached teacher outputs.

    ``loss(lr, hr, step=, target=None, real=None)`` returns ``(total, {"rec", "out", "aff"}, sr)``:

    * live (``cached=False``): a ``convlora.distill.Distiller`` runs the teacher on ``lr`` (and
      the affinity taps when ``w_aff > 0``);
    * cached (``cached=True``): ``target`` is the teacher's SR of ``lr`` read from the
      teacher-output cache (``teacher_cache.py``), so a step costs the student's forward and
      backward and two L1 terms, whatever the teacher. The affinity term needs the teacher's
      features, so it is refused here.

    ``real`` (bool per row) marks the rows that have an HR; the others are upcycled inputs
    (crops of HR images fed as LR, ``data.upcycle_share``), labelled by the teacher only, so
    ``L1(SR, HR)`` is the mean over the real rows and ``L1(SR, SR_teacher)`` over all rows.
    Every rank gets the same number of real rows (train.py checks), so DDP's gradient average is
    the global batch's.
    """

    def __init__(self, student: nn.Module, teacher: nn.Module, loss: LossConfig, tap_weights: list[float] | None,
                 w_aff: float, *, cached: bool = False) -> None:
        if cached and w_aff:
            raise ValueError(f"loss.w_aff={w_aff} needs the teacher's features at every step; cached teacher "
                             "outputs have none: set --teacher_cache.enabled false (live teacher) or --loss.w_aff 0.")
        self.student, self.w_rec, self.w_out, self.cached = student, loss.w_rec, loss.w_out, cached
        self.pixel = pixel_loss(loss.pixel)
        self.distiller: Distiller | None = None
        self.no_rec: Distiller | None = None
        if not cached:
            kw = dict(taps=tap_map(teacher, loss), w_out=loss.w_out, w_aff=w_aff, p=loss.p, pool=loss.pool or None,
                      tap_weights=tap_weights, aff_warmup_steps=loss.aff_warmup,
                      select=(first_tensor, teacher_select(teacher)), pixel=loss.pixel)
            self.distiller = Distiller(student, teacher, w_rec=loss.w_rec, **kw)  # type: ignore[arg-type]
            self.no_rec = Distiller(student, teacher, w_rec=0.0, **kw)  # type: ignore[arg-type]

    def __call__(self, lr: torch.Tensor, hr: torch.Tensor, *, step: int, target: torch.Tensor | None = None,
                 real: torch.Tensor | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor], torch.Tensor]:
        """One step's loss; ``target`` is required when cached, ``real=None`` means every row has an HR."""
        mixed = real is not None and not bool(real.all())
        if not self.cached:
            assert self.distiller is not None and self.no_rec is not None
            if not mixed:
                return self.distiller(lr, hr, step=step)
            total, parts, sr = self.no_rec(lr, None, step=step)
        else:
            if target is None or target.shape != hr.shape:
                raise ValueError(f"cached teacher targets of shape {None if target is None else tuple(target.shape)} "
                                 f"for an HR batch of shape {tuple(hr.shape)}; rebuild the teacher cache.")
            sr = self.student(lr)
            out = self.pixel(sr, target)
            total, parts = self.w_out * out, {"out": out.detach().float(), "aff": sr.new_zeros((), dtype=torch.float32)}
        zero = sr.new_zeros((), dtype=torch.float32)
        if mixed:
            assert real is not None
            rec = self.pixel(sr[real], hr[real]) if self.w_rec and bool(real.any()) else zero
        else:
            rec = self.pixel(sr, hr) if self.w_rec else zero
        total = self.w_rec * rec + total
        parts["rec"] = rec.detach().float()
        return total, parts, sr


def make_loss(student: nn.Module, teacher: nn.Module, loss: LossConfig, tap_weights: list[float] | None,
              w_aff: float, *, cached: bool = False) -> DSCLoRALoss:
    """The DSCLoRA loss on ``student`` (a DDP wrapper is fine: the taps look through it); see :class:`DSCLoRALoss`."""
    return DSCLoRALoss(student, teacher, loss, tap_weights, w_aff, cached=cached)


def deploy(model: _M) -> _M:
    """A float32 CPU copy of ``model`` with its adapters merged and unloaded and train-form convs fused.

    For a DSCLoRA student this is a plain deploy SPAN with the official keys, ready for
    ``torch.save``/safetensors, ``evaluate.py``, ``upscale.py`` and ONNX export.
    """
    plain = copy.deepcopy(model).cpu().float()
    if convlora.lora_layers(plain):
        plain = convlora.unload(plain, merge=True)
    reparameterize = getattr(plain, "reparameterize", None)
    if callable(reparameterize):
        reparameterize()
    return plain.eval()


def load_deployed(weights: str | Path, adapter: str | Path | None = None) -> SPAN:
    """A SPAN checkpoint (``.pth`` or ``.safetensors``), with ``adapter`` loaded and merged when given.

    Raises:
        FileNotFoundError: a file does not exist (the message points to docs/data.md).
    """
    model = load_span(weights)
    if adapter is not None:
        if not Path(adapter).is_file():
            raise FileNotFoundError(f"adapter file {str(adapter)!r} does not exist; train.py writes one as "
                                    "<run>/adapter.safetensors.")
        convlora.load_adapter(model, adapter)
    return deploy(model)
