"""Geometric self-ensemble: the mean of a model's outputs over the eight flips and transposes of its input.

For an SR network ``f`` and the dihedral group ``D4`` of the square (four rotations, each with or
without a transpose), the x8 self-ensemble is

    E(x) = 1/8 * sum_{g in D4} g^-1( f( g(x) ) )

It costs eight forwards and needs no training. For SPAN-tiny (26 channels, x4) it scores about
0.2 dB above the plain forward on Set5 and 0.14 dB on Set14 (docs/reproduce_dsclora.md), a gain
the single forward can learn part of: ``E`` is a smoothed version of the student's own function,
so as a distillation teacher (``--model.teacher_ensemble 8``) it asks for an output the same
architecture can come close to, unlike a teacher of another architecture. Every ``g`` is exact
on pixels (a permutation), so ``E`` is equivariant under ``D4`` by construction.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["ENSEMBLE_SIZES", "SelfEnsemble"]

ENSEMBLE_SIZES = (1, 2, 4, 8)
"""The ensemble sizes offered: the first ``n`` of (identity, transpose, rot90, rot90+transpose, rot180, ...)."""

# (quarter turns, transpose) of each member, in the order the first-n sizes take them: 2 adds the
# transpose, 4 the quarter turn, 8 the rest of the group.
_MEMBERS = ((0, False), (0, True), (1, False), (1, True), (2, False), (2, True), (3, False), (3, True))


def _apply(x: torch.Tensor, turns: int, transpose: bool) -> torch.Tensor:
    y = x.transpose(-1, -2) if transpose else x
    return torch.rot90(y, turns, (-2, -1)) if turns else y


def _undo(y: torch.Tensor, turns: int, transpose: bool) -> torch.Tensor:
    y = torch.rot90(y, -turns, (-2, -1)) if turns else y
    return y.transpose(-1, -2) if transpose else y


class SelfEnsemble(nn.Module):
    """``model`` run on ``size`` dihedral transforms of the input, each output transformed back, averaged.

    Args:
        model: An image-to-image model on ``(N, C, H, W)`` inputs (any ``H``, ``W``: transposed
            members see ``W x H``); its ``upscale`` attribute, if any, is kept.
        size: Members of the ensemble, one of ``ENSEMBLE_SIZES`` (8 = the whole group).

    Raises:
        ValueError: ``size`` is not one of ``ENSEMBLE_SIZES``.
    """

    def __init__(self, model: nn.Module, size: int = 8) -> None:
        super().__init__()
        if not isinstance(size, int) or isinstance(size, bool) or size not in ENSEMBLE_SIZES:
            raise ValueError(f"self-ensemble size={size!r} is not one of {ENSEMBLE_SIZES}; use 8 for the whole "
                             "dihedral group or 1 for the plain model.")
        self.model, self.size = model, size
        scale = getattr(model, "upscale", None)
        if isinstance(scale, int):
            self.upscale = scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        total: torch.Tensor | None = None
        for turns, transpose in _MEMBERS[: self.size]:
            out = _undo(self.model(_apply(x, turns, transpose)), turns, transpose)
            total = out if total is None else total + out
        assert total is not None
        return total / self.size

    @property
    def architecture(self) -> str:
        """``x<size>:<the model's class>[:<its architecture>]``, part of a teacher-cache key."""
        inner = getattr(self.model, "architecture", "")
        return f"x{self.size}:{type(self.model).__name__}" + (f":{inner}" if inner else "")

    def extra_repr(self) -> str:
        return f"size={self.size}"
