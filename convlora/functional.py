"""Pure math of the two ConvLoRA factorisations: shapes, rank bounds, initialisation, delta weight.

Notation: a base weight ``W`` of shape ``(out, in/groups, *kernel)`` (or ``(out, in)`` for
``nn.Linear``), an adapter pair ``A`` / ``B`` and a scale ``s = alpha / rank``.

* ``"kernel"`` (PEFT/LyCORIS layout): ``A`` is ``rank x (in/groups * prod(kernel))`` -- a
  ``kernel``-sized conv from the input to ``rank`` channels -- and ``B`` is ``out x rank`` -- a 1x1
  conv. ``delta W = s * (B @ A).reshape(W.shape)``. Its rank in the conv's own unfolding is at
  most ``rank``; valid ranks are ``1 .. min(out, in/groups * prod(kernel))``.
* ``"loralib"`` (Microsoft loralib's ``ConvLoRA``, used by DSCLoRA): for a square ``k x k`` 2-D
  kernel with ``groups == 1``, ``A`` is ``(rank*k) x (in*k)`` and ``B`` is ``(out*k) x (rank*k)``;
  ``delta W = s * (B @ A).view(out, in, k, k)``. The product has rank ``<= rank*k`` in that
  ``(out*k) x (in*k)`` view, which after the reshape can reach ``min(out, rank*k*k)`` in the
  conv's unfolding; it costs ``k`` times the parameters of ``"kernel"`` for the same ``rank``.
  Valid ranks are ``1 .. min(out, in)``.

In both cases ``A`` starts Kaiming-uniform and ``B`` at zero, so a fresh adapter changes nothing.
The delta and the merged weight are computed in the precision of the weight and factors, and at
least in float32 ([`compute_dtype`][convlora.functional.compute_dtype]): fp16/bf16 sum in float32, float64 stays float64.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from torch import Tensor, nn

__all__ = [
    "FACTORIZATIONS",
    "Factorization",
    "compute_dtype",
    "delta_weight",
    "factorization_problem",
    "init_lora_",
    "lora_shapes",
    "max_rank",
    "merged_weight",
]

Factorization = Literal["kernel", "loralib"]
FACTORIZATIONS: tuple[str, ...] = ("kernel", "loralib")


def factorization_problem(factorization: str, weight_shape: tuple[int, ...], groups: int) -> str | None:
    """Return why ``factorization`` cannot apply to a weight of this shape, or ``None`` if it can."""
    if factorization not in FACTORIZATIONS:
        return f"unknown factorization {factorization!r}; choose one of {FACTORIZATIONS}"
    if factorization == "loralib":
        if len(weight_shape) != 4:
            return "the 'loralib' factorization applies to 2-D convolutions only"
        if weight_shape[2] != weight_shape[3]:
            return f"the 'loralib' factorization needs a square kernel, got {tuple(weight_shape[2:])}"
        if groups != 1:
            return f"the 'loralib' factorization needs groups=1, got groups={groups}"
    return None


def max_rank(factorization: str, weight_shape: tuple[int, ...], groups: int = 1) -> int:
    """Largest meaningful rank for a layer: beyond it the factorisation only adds parameters."""
    out = weight_shape[0]
    if factorization == "loralib":
        return min(out, weight_shape[1] * groups)
    return min(out, math.prod(weight_shape[1:]))


def lora_shapes(
    factorization: str, weight_shape: tuple[int, ...], rank: int, groups: int = 1
) -> tuple[tuple[int, int], tuple[int, int]]:
    """Shapes of ``(A, B)`` for a base weight of ``weight_shape``."""
    out = weight_shape[0]
    if factorization == "loralib":
        k = weight_shape[-1]
        cin = weight_shape[1] * groups
        return (rank * k, cin * k), (out * k, rank * k)
    return (rank, math.prod(weight_shape[1:])), (out, rank)


def init_lora_(lora_a: Tensor, lora_b: Tensor) -> None:
    """Initialise in place: ``A`` Kaiming-uniform (as ``nn.Linear``), ``B`` zeros."""
    with torch.no_grad():
        nn.init.kaiming_uniform_(lora_a, a=math.sqrt(5))
        nn.init.zeros_(lora_b)


def compute_dtype(*tensors: Tensor) -> torch.dtype:
    """The dtype the delta is computed in: the widest of ``tensors``' dtypes and float32.

    fp16 and bf16 weights are summed in float32 and cast back once; a float64 weight (or factor)
    keeps float64, so no precision below the weight's own is ever used.
    """
    dtype = torch.float32
    for t in tensors:
        dtype = torch.promote_types(dtype, t.dtype)
    return dtype


def delta_weight(lora_a: Tensor, lora_b: Tensor, weight_shape: tuple[int, ...] | torch.Size,
                 scale: float) -> Tensor:
    """``scale * (B @ A)`` reshaped to ``weight_shape``, in the factors' compute dtype.

    The compute dtype is [`compute_dtype`][convlora.functional.compute_dtype] of ``A`` and ``B``.

    The same function serves both factorisations: only the shapes of ``A`` and ``B`` differ, and
    in both layouts the row-major ``(B @ A)`` viewed as ``weight_shape`` is the delta weight.
    """
    dtype = compute_dtype(lora_a, lora_b)
    delta = lora_b.to(dtype) @ lora_a.to(dtype)
    return (delta * scale).reshape(tuple(weight_shape))


def merged_weight(weight: Tensor, lora_a: Tensor, lora_b: Tensor, scale: float) -> Tensor:
    """``W + scale * (B @ A)`` summed in the compute dtype and cast back to ``weight``'s dtype.

    The compute dtype is [`compute_dtype`][convlora.functional.compute_dtype] of ``W``, ``A``, ``B``.

    One fused ``addmm`` over the weight viewed as ``(B.rows, A.cols)``, which is a valid view of
    the weight for both factorisations. The unmerged forward, `LoRALayer.merge` and the
    state-dict merge of the command line all call this function, so they agree bit for bit. A
    fresh adapter (``B = 0``) returns a weight equal to ``W`` in every dtype.
    """
    dtype = compute_dtype(weight, lora_a, lora_b)
    flat = weight.to(dtype).reshape(lora_b.shape[0], lora_a.shape[1])
    out = torch.addmm(flat, lora_b.to(dtype), lora_a.to(dtype), alpha=scale)
    return out.view(weight.shape).to(weight.dtype)
