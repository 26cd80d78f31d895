"""Distiller: one call = teacher forward (no grad) + student forward + weighted losses."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .affinity import affinity_loss
from .taps import FeatureTaps, Selector

__all__ = ["PIXEL_LOSSES", "Distiller", "pixel_loss"]

PIXEL_LOSSES = {"l1": F.l1_loss, "mse": F.mse_loss}
"""The pixel losses of the output terms, by name."""

_Select = Selector | Mapping[str, Selector] | None


@contextlib.contextmanager
def _eval_mode(model: nn.Module) -> Iterator[None]:
    """Put every submodule in eval mode; restore each one's own flag afterwards."""
    flags = [(m, m.training) for m in model.modules()]
    try:
        model.eval()
        yield
    finally:
        for m, flag in flags:
            m.training = flag


def pixel_loss(name: str) -> Callable[[Tensor, Tensor], Tensor]:
    """The pixel loss called ``name`` (a key of ``PIXEL_LOSSES``), mean-reduced.

    Raises:
        ValueError: an unknown name (the message lists the known ones).
    """
    if name not in PIXEL_LOSSES:
        raise ValueError(f"pixel={name!r} is not a known pixel loss; use one of {sorted(PIXEL_LOSSES)}.")
    return PIXEL_LOSSES[name]


def _check_weight(name: str, value: float) -> float:
    value = float(value)
    if not value >= 0.0 or value == float("inf"):
        raise ValueError(f"{name}={value} must be a finite number >= 0.")
    return value


class Distiller:
    """Loss for distilling a teacher SR network into a student.

    ``total = w_rec·D(sr, hr) + w_out·D(sr, sr_teacher) + w·aff`` where ``D`` is the
    pixel loss (``pixel="l1"``, the default, or ``"mse"``, the squared error PSNR measures), and
    ``aff`` is the (optionally weighted) mean over taps of
    [`affinity_loss`][convlora.distill.affinity_loss] between the student's and the
    teacher's features, and ``w`` ramps linearly from 0 to ``w_aff`` over
    ``aff_warmup_steps`` steps. The teacher runs under ``torch.no_grad()`` in
    eval mode (each submodule's ``training`` flag is restored afterwards); hooks
    exist only during the call. This is not an ``nn.Module``, so the teacher's
    parameters never reach the student's optimizer or state dict.

    The defaults (0.2, 0.8, 0) are deliberately not FAKD's x4 recipe (0.5, 0.5,
    10 summed over taps), which was measured to degrade a SPAN student.

    Args:
        student: the model being trained.
        teacher: the frozen reference model.
        taps: ``{student_layer: teacher_layer}`` qualified module names whose
            outputs are compared (same spatial size, channels may differ).
        w_rec: weight of the reconstruction term ``D(sr, hr)``.
        w_out: weight of the output term ``D(sr, sr_teacher)``.
        w_aff: weight of the affinity term (needs ``taps``).
        p: 1 (FAKD mean absolute difference) or 2 (mean squared difference).
        tap_weights: per-tap weights, a mapping keyed by student layer or a
            sequence in ``taps`` order; the affinity term is their weighted mean.
        aff_warmup_steps: ramp ``w_aff`` linearly over this many steps; calls
            must then pass ``step``.
        select: selector for tuple/dict outputs (see [`FeatureTaps`][convlora.distill.FeatureTaps]; a
            mapping is keyed by student layer) used for both models, or a pair
            ``(student_select, teacher_select)``.
        pool: optional average-pooling factor before the affinity (approximate).
        block_size: row block of the ``p=1`` affinity loss (memory knob).
        pixel: the pixel loss ``D`` of both output terms, ``"l1"`` or ``"mse"``.
    """

    def __init__(
        self,
        student: nn.Module,
        teacher: nn.Module,
        taps: Mapping[str, str] | None = None,
        *,
        w_rec: float = 0.2,
        w_out: float = 0.8,
        w_aff: float = 0.0,
        p: int = 1,
        tap_weights: Mapping[str, float] | Sequence[float] | None = None,
        aff_warmup_steps: int = 0,
        select: _Select | tuple[_Select, _Select] = None,
        pool: int | None = None,
        block_size: int | None = None,
        pixel: str = "l1",
    ) -> None:
        self.student, self.teacher = student, teacher
        self.pixel = pixel_loss(pixel)
        self.taps = dict(taps or {})
        self.w_rec = _check_weight("w_rec", w_rec)
        self.w_out = _check_weight("w_out", w_out)
        self.w_aff = _check_weight("w_aff", w_aff)
        if p not in (1, 2) or isinstance(p, bool):
            raise ValueError(f"p={p!r} is not supported; use 1 (FAKD) or 2.")
        self.p, self.pool, self.block_size = p, pool, block_size
        if self.w_aff > 0 and not self.taps:
            raise ValueError(f"w_aff={w_aff} needs taps={{student_layer: teacher_layer}}; "
                             "pass taps or set w_aff=0.")
        if isinstance(aff_warmup_steps, bool) or not isinstance(aff_warmup_steps, int) \
                or aff_warmup_steps < 0:
            raise ValueError(f"aff_warmup_steps={aff_warmup_steps!r} must be an integer >= 0.")
        self.aff_warmup_steps = aff_warmup_steps
        self.tap_weights = self._tap_weights(tap_weights)
        if isinstance(select, tuple):
            self._s_select, self._t_select = select
        else:
            self._s_select = self._t_select = select
        if self.taps:  # validate names now, not at the first step
            FeatureTaps(student, {k: k for k in self.taps}).remove()
            FeatureTaps(teacher, self.taps).remove()

    def _tap_weights(self, weights: Mapping[str, float] | Sequence[float] | None) -> list[float]:
        if weights is None:
            return [1.0] * len(self.taps)
        if isinstance(weights, Mapping):
            extra = set(weights) - set(self.taps)
            if extra:
                raise ValueError(f"tap_weights has keys {sorted(extra)} that are not student "
                                 f"layers in taps ({list(self.taps)}).")
            values = [float(weights.get(k, 1.0)) for k in self.taps]
        else:
            values = [float(w) for w in weights]
            if len(values) != len(self.taps):
                raise ValueError(f"tap_weights has {len(values)} entries for {len(self.taps)} "
                                 "taps; give one weight per tap, in taps order.")
        if any(not w >= 0 for w in values) or not sum(values) > 0:
            raise ValueError(f"tap_weights={values} must be >= 0 with a positive sum.")
        return values

    def aff_weight(self, step: int | None = None) -> float:
        """Effective affinity weight at ``step`` (after the linear warm-up)."""
        if self.aff_warmup_steps == 0:
            return self.w_aff
        if step is None:
            raise ValueError(f"aff_warmup_steps={self.aff_warmup_steps} needs the current step: "
                             "call distiller(lr, hr, step=step).")
        return self.w_aff * min(1.0, max(step, 0) / self.aff_warmup_steps)

    def __call__(
        self, lr: Tensor, hr: Tensor | None = None, step: int | None = None
    ) -> tuple[Tensor, dict[str, Tensor], Tensor]:
        """Run teacher and student on ``lr`` and return ``(total, parts, sr)``.

        Args:
            lr: the input batch.
            hr: the ground truth for the ``rec`` term; may be ``None`` when
                ``w_rec == 0``.
            step: the training step, required when ``aff_warmup_steps > 0``.

        Returns:
            ``total`` (differentiable), ``parts`` with detached scalar tensors
            ``"rec"``, ``"out"``, ``"aff"`` (unweighted; 0 for unused terms)
            and the student output ``sr``.
        """
        if hr is None and self.w_rec > 0:
            raise ValueError(f"hr is None but w_rec={self.w_rec}; pass the ground truth or "
                             "construct the Distiller with w_rec=0.")
        w_aff = self.aff_weight(step)
        use_aff = self.w_aff > 0
        t_sr, t_feats = self._run_teacher(lr, use_aff)
        if use_aff:
            with FeatureTaps(self.student, {k: k for k in self.taps},
                             select=self._s_select) as taps:
                sr = self.student(lr)
                s_feats = taps.pop()
        else:
            sr, s_feats = self.student(lr), {}
        zero = sr.new_zeros((), dtype=torch.float32)
        rec = self.pixel(sr, hr) if hr is not None and self.w_rec > 0 else zero
        out = self.pixel(sr, t_sr) if t_sr is not None else zero
        aff = self._affinity(s_feats, t_feats) if use_aff else zero
        total = self.w_rec * rec + self.w_out * out + w_aff * aff
        parts = {"rec": rec.detach().float(), "out": out.detach().float(),
                 "aff": aff.detach().float()}
        return total, parts, sr

    def _run_teacher(self, lr: Tensor, use_aff: bool) -> tuple[Tensor | None, dict[str, Tensor]]:
        if self.w_out == 0 and not use_aff:
            return None, {}
        with _eval_mode(self.teacher), torch.no_grad():
            if not use_aff:
                return self.teacher(lr), {}
            with FeatureTaps(self.teacher, self.taps, select=self._t_select,
                             detach=True) as taps:
                t_sr = self.teacher(lr)
                return t_sr, taps.pop()

    def _affinity(self, s_feats: dict[str, Tensor], t_feats: dict[str, Tensor]) -> Tensor:
        total: Tensor | None = None
        for key, weight in zip(self.taps, self.tap_weights):
            missing = [w for w, f in (("student", s_feats), ("teacher", t_feats)) if key not in f]
            if missing:
                raise RuntimeError(f"tap {key!r}: the {' and '.join(missing)} layer did not run "
                                   "during forward; tap a module that is called by forward().")
            try:
                loss = affinity_loss(s_feats[key], t_feats[key], p=self.p, pool=self.pool,
                                     block_size=self.block_size)
            except ValueError as exc:
                raise ValueError(f"tap {key!r} -> {self.taps[key]!r}: {exc}") from exc
            term = weight * loss
            total = term if total is None else total + term
        assert total is not None  # taps is non-empty when use_aff (checked in __init__)
        return total / sum(self.tap_weights)
