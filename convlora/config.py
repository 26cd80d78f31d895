"""``LoRAConfig`` and the pattern matching of target names.

Patterns are shell-style globs (`fnmatch.fnmatchcase`) on qualified module names. A
pattern matches a module when it matches the module's own name or the name of one of its
ancestors, so ``"conv_2"`` matches ``"conv_2.eval_conv"`` and ``"block_*"`` matches every module
inside the blocks.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from fnmatch import fnmatchcase
from typing import Any, TypeVar

from torch import nn

from ._values import is_number
from .errors import ConvLoRAError
from .functional import FACTORIZATIONS
from .methods import METHODS

__all__ = ["ALPHA_MAX", "PIXEL_SHUFFLE", "LoRAConfig", "Predicate", "Target", "alpha_problem",
           "match_pattern", "pattern_lookup"]

ALPHA_MAX = 1e6
"""Largest accepted alpha: the delta is scaled by ``alpha / rank``, and a scale far beyond the
weights' own size only overflows (practical values are a few times the rank)."""

PIXEL_SHUFFLE = "pixel_shuffle"
"""Special target selector: every conv whose output feeds an ``nn.PixelShuffle``."""

Predicate = Callable[[str, nn.Module], bool]
Target = str | Predicate | Sequence[str | Predicate]
_T = TypeVar("_T")


def _ancestors(name: str) -> list[str]:
    parts = name.split(".")
    return [".".join(parts[:i]) for i in range(len(parts), 0, -1)]


def match_pattern(pattern: str, name: str) -> bool:
    """True when the glob ``pattern`` matches ``name`` or one of its ancestors."""
    return any(fnmatchcase(a, pattern) for a in _ancestors(name))


def pattern_lookup(patterns: Mapping[str, _T] | None, name: str, default: _T) -> _T:
    """Value of the first pattern (in mapping order) that matches ``name``, else ``default``."""
    if patterns:
        for pattern, value in patterns.items():
            if match_pattern(pattern, name):
                return value
    return default


@dataclass(frozen=True)
class LoRAConfig:
    """Settings of one adapter, validated at construction.

    Args:
        rank: Default rank of every targeted layer.
        alpha: Default alpha, a finite number in ``(0, 1e6]``; the adapter is scaled by
            ``alpha / rank``. ``None`` means ``alpha = rank`` (scale 1) for each layer, with
            that layer's own rank.
        targets: Glob pattern(s), predicate(s) ``(name, module) -> bool``, the selector
            ``"pixel_shuffle"``, or a list mixing them. ``None`` selects every convolution.
        exclude: Same forms as ``targets``; removes layers from the selection.
        rank_pattern: ``{pattern: rank}`` overrides; the first matching pattern wins.
        alpha_pattern: ``{pattern: alpha}`` overrides.
        factorization: ``"kernel"`` (default) or ``"loralib"``; see [convlora.functional][].
        factorization_pattern: ``{pattern: factorization}`` overrides.
        dropout: Dropout on the adapter branch's input while training (two-path forward).
        freeze: Freeze every non-LoRA parameter of the model (biases included).
        method: ``"lora"`` (default), ``"dora"``, ``"loha"`` or ``"lokr"``; see
            [convlora.methods][].
        method_pattern: ``{pattern: method}`` overrides.
        rslora: Scale by ``alpha / sqrt(rank)`` (rsLoRA) instead of ``alpha / rank``.
        tucker: Build LoHa/LoKr factors in the Tucker form (PEFT's ``use_effective_conv2d``):
            a ``rank x rank x kernel`` core and two ``rank``-row factors instead of one
            ``rank x (ch * prod(kernel))`` factor; see [convlora.methods][]. It applies where
            [tucker_applies][convlora.methods.tucker_applies] says so (``"loha"``/``"lokr"`` on
            a ``Conv``/``ConvTranspose`` with a kernel of more than one tap) and is ignored
            elsewhere (``Linear``, ``1x1`` kernels, ``"lora"``/``"dora"``, a full LoKr ``W2``),
            as PEFT ignores it; each layer records whether it applied. Refused when neither
            ``method`` nor ``method_pattern`` names ``"loha"``/``"lokr"``.
        tucker_pattern: ``{pattern: bool}`` overrides of ``tucker``.
    """

    rank: int = 4
    alpha: float | None = None
    targets: Target | None = None
    exclude: Target | None = None
    rank_pattern: Mapping[str, int] | None = field(default=None)
    alpha_pattern: Mapping[str, float] | None = field(default=None)
    factorization: str = "kernel"
    factorization_pattern: Mapping[str, str] | None = field(default=None)
    dropout: float = 0.0
    freeze: bool = True
    method: str = "lora"
    method_pattern: Mapping[str, str] | None = field(default=None)
    rslora: bool = False
    tucker: bool = False
    tucker_pattern: Mapping[str, bool] | None = field(default=None)

    def __post_init__(self) -> None:
        _check_rank(self.rank, "rank")
        for pattern, r in (self.rank_pattern or {}).items():
            _check_rank(r, f"rank_pattern[{pattern!r}]")
        if self.alpha is not None:
            _check_alpha(self.alpha, "alpha")
        for pattern, a in (self.alpha_pattern or {}).items():
            _check_alpha(a, f"alpha_pattern[{pattern!r}]")
        for where, f in [("factorization", self.factorization)] + [
            (f"factorization_pattern[{p!r}]", v) for p, v in (self.factorization_pattern or {}).items()
        ]:
            if f not in FACTORIZATIONS:
                raise ConvLoRAError(
                    f"{where}={f!r} is not a known factorization; choose one of {FACTORIZATIONS}."
                )
        for where, m in [("method", self.method)] + [
            (f"method_pattern[{p!r}]", v) for p, v in (self.method_pattern or {}).items()
        ]:
            if m not in METHODS:
                raise ConvLoRAError(f"{where}={m!r} is not a known method; choose one of {METHODS}.")
        if not isinstance(self.rslora, bool):
            raise ConvLoRAError(f"rslora={self.rslora!r} must be True or False.")
        tuckers = [("tucker", self.tucker)] + [
            (f"tucker_pattern[{p!r}]", v) for p, v in (self.tucker_pattern or {}).items()]
        for where, t in tuckers:
            if not isinstance(t, bool):
                raise ConvLoRAError(f"{where}={t!r} must be True or False.")
        methods = {self.method, *(self.method_pattern or {}).values()}
        if any(t for _, t in tuckers) and not methods & {"loha", "lokr"}:
            raise ConvLoRAError(f"tucker=True applies to methods 'loha'/'lokr' only, and no layer "
                                f"uses them (method={self.method!r}, method_pattern="
                                f"{self.method_pattern!r}); set method='loha' or 'lokr', or "
                                "leave tucker off.")
        if not (isinstance(self.dropout, (int, float)) and 0.0 <= self.dropout < 1.0):
            raise ConvLoRAError(f"dropout={self.dropout!r} must be a number in [0, 1).")

    def rank_for(self, name: str) -> int:
        """Rank of the layer ``name``."""
        return int(pattern_lookup(self.rank_pattern, name, self.rank))

    def alpha_for(self, name: str) -> float:
        """Alpha of the layer ``name`` (its rank when no alpha is given)."""
        default = float(self.alpha) if self.alpha is not None else float(self.rank_for(name))
        return float(pattern_lookup(self.alpha_pattern, name, default))

    def factorization_for(self, name: str) -> str:
        """Factorisation of the layer ``name``."""
        return str(pattern_lookup(self.factorization_pattern, name, self.factorization))

    def method_for(self, name: str) -> str:
        """Method of the layer ``name``."""
        return str(pattern_lookup(self.method_pattern, name, self.method))

    def tucker_for(self, name: str) -> bool:
        """Whether the Tucker form is asked for on the layer ``name`` (used where it applies)."""
        return bool(pattern_lookup(self.tucker_pattern, name, self.tucker))

    def replace(self, **changes: Any) -> LoRAConfig:
        """A copy with ``changes`` applied (validated again)."""
        return dataclasses.replace(self, **changes)


def _check_rank(value: object, where: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConvLoRAError(f"{where}={value!r} is invalid: the rank must be an integer >= 1.")


def alpha_problem(value: object) -> str | None:
    """Why ``value`` is not a valid alpha (a finite number in ``(0, ALPHA_MAX]``), or ``None``."""
    if not is_number(value) or not 0 < value <= ALPHA_MAX:
        return f"alpha must be a finite number in (0, {ALPHA_MAX:g}]"
    return None


def _check_alpha(value: object, where: str) -> None:
    problem = alpha_problem(value)
    if problem:
        raise ConvLoRAError(f"{where}={value!r} is invalid: {problem}.")
