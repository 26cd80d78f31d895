r"""LoKr's Kronecker math (LyCORIS/PEFT LoKr): ``W' = W + s * reshape(kron(W1, W2))``.

The rows ``a*b`` and ``W.shape[1] = c*d`` of a weight are split into their two most balanced
factors (``a <= b``, ``c <= d``, as PEFT's ``factorization(n, -1)``;
[`kron_split`][convlora.lokr.kron_split]), and ``delta = s * kron(W1, W2)`` reshaped to
``W.shape`` with ``W1: a x c`` (``lokr_w1``) and ``W2: b x (d * prod(kernel))``, which is either
full (``lokr_w2``, stored ``(b, d, *kernel)``) when ``rank >= max(b, d) / 2``, or low-rank
``W2 = W2a @ W2b`` (``lokr_w2_a: b x rank``, ``lokr_w2_b: rank x (d * prod(kernel))``), PEFT's
rule ([`lokr_dims`][convlora.lokr.lokr_dims]). In the Tucker form a low-rank ``W2`` is the
[Tucker product][convlora.tucker] ``tucker(T2, W2a, W2b)`` of shape ``(b, d, *kernel)`` with
``lokr_t2: rank x rank x kernel``, ``lokr_w2_a: rank x b``, ``lokr_w2_b: rank x d``
([`lokr_w2`][convlora.lokr.lokr_w2] rebuilds it); where ``W2`` is full the option changes
nothing, as in PEFT. A fresh adapter has ``W1 = 0``, so the delta is exactly zero.

How ``W'`` is computed: [`lokr_weight`][convlora.lokr.lokr_weight] adds ``s * W1[i, l] * W2[j, m]``
to ``W`` viewed as ``(a, b, c, d * prod(kernel))`` in one broadcasting ``addcmul``, without
materialising the Kronecker product; the backward of
[`lokr_weight_autograd`][convlora.lokr.lokr_weight_autograd] reads the weight gradient twice
(``dW1`` in cache-sized blocks, ``dW2`` as one batched product) instead of forming two
weight-sized products as autograd of the ``addcmul`` would.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from ._autocast import no_autocast
from ._functorch import functorch_transform_active
from .tucker import tucker_product

__all__ = ["kron_split", "lokr_dims", "lokr_w2", "lokr_weight", "lokr_weight_autograd"]


def kron_split(n: int) -> tuple[int, int]:
    """``(m, n // m)`` with ``m`` the largest divisor of ``n`` not above ``sqrt(n)``.

    Args:
        n: A positive axis length.

    Returns:
        The two factors, the smaller first.
    """
    m = max(d for d in range(1, math.isqrt(n) + 1) if n % d == 0)
    return m, n // m


def lokr_dims(weight_shape: tuple[int, ...], rank: int) -> tuple[int, int, int, int, bool]:
    """LoKr's split of a weight and whether its ``W2`` is full (PEFT's rule).

    Args:
        weight_shape: The base weight's shape.
        rank: The adapter's rank.

    Returns:
        ``(a, b, c, d, full)`` with ``weight_shape[0] = a * b``, ``weight_shape[1] = c * d`` and
        ``full`` true when ``rank >= max(b, d) / 2``.
    """
    a, b = kron_split(weight_shape[0])
    c, d = kron_split(weight_shape[1])
    return a, b, c, d, rank >= max(b, d) / 2


def lokr_w2(factors: Mapping[str, Tensor]) -> Tensor:
    """LoKr's ``W2`` as a ``b x (d * prod(kernel))`` matrix, with autograd.

    ``W2a @ W2b`` when low-rank, the Tucker product of ``lokr_t2``, ``W2a``, ``W2b`` in the
    Tucker form.

    Args:
        factors: The adapter's factors by name (``lokr_w2``, or ``lokr_w2_a``/``lokr_w2_b`` and
            in the Tucker form ``lokr_t2``).

    Returns:
        ``W2`` as a matrix.
    """
    if "lokr_w2" in factors:
        w2 = factors["lokr_w2"]
    elif "lokr_t2" in factors:
        w2 = tucker_product(factors["lokr_t2"], factors["lokr_w2_a"], factors["lokr_w2_b"])
    else:
        w2 = factors["lokr_w2_a"] @ factors["lokr_w2_b"]
    return w2.reshape(w2.shape[0], -1)


def lokr_weight(w: Tensor, w1: Tensor, w2: Tensor, scale: float) -> Tensor:
    """``W + s * kron(W1, W2)`` for ``W`` viewed as ``(a, b, c, D)``: one broadcasting ``addcmul``.

    Every LoKr forward computes ``W'`` with this function, so they agree bit for bit.

    Args:
        w: The base weight viewed as ``(a, b, c, D)`` with ``D = d * prod(kernel)``.
        w1: ``W1``, ``a x c``.
        w2: ``W2`` as a ``b x D`` matrix ([`lokr_w2`][convlora.lokr.lokr_w2]).
        scale: The scale ``s``.

    Returns:
        ``W'`` viewed as ``(a, b, c, D)``.
    """
    return torch.addcmul(w, w1[:, None, :, None], w2[None, :, None, :], value=scale)


_LOKR_BLOCK_BYTES = 1 << 21


class _LoKrWeight(torch.autograd.Function):
    """``W + s * kron(W1, W2)`` on ``W`` viewed as ``(a, b, c, D)``: one broadcasting ``addcmul``.

    Autograd of that ``addcmul`` would form ``G * W2`` and ``G * W1`` as weight-sized tensors
    before summing them. This backward reads the weight gradient ``G`` twice and allocates
    nothing weight-sized: ``dW1[i, l] = s * sum_{j, m} G[i, j, l, m] * W2[j, m]`` in blocks of
    ``i`` of about 2 MiB (the block's product stays in cache), and
    ``dW2[j, m] = s * sum_i (W1[i] @ G[i, j])[m]`` as one batched matrix product.
    """

    @staticmethod
    def forward(ctx: Any, w: Tensor, w1: Tensor, w2: Tensor, scale: float) -> Tensor:
        ctx.save_for_backward(w1, w2)
        ctx.scale = scale
        return lokr_weight(w, w1, w2, scale)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        w1, w2 = ctx.saved_tensors
        need_w, need_1, need_2 = ctx.needs_input_grad[:3]
        with no_autocast(grad):
            g = grad.to(w1.dtype).reshape(w1.shape[0], w2.shape[0], w1.shape[1], w2.shape[1])
            g1 = g2 = None
            if need_1:
                n = max(1, _LOKR_BLOCK_BYTES // max(1, g[0].numel() * g.element_size()))
                w2b = w2[None, :, None, :]
                g1 = torch.cat([(blk * w2b).sum((1, 3)) for blk in g.split(n)]).mul_(ctx.scale)
            if need_2:
                g2 = torch.matmul(w1[:, None, None, :], g).sum(0).squeeze(-2).mul_(ctx.scale)
        return (g if need_w else None), g1, g2, None


def lokr_weight_autograd(w: Tensor, w1: Tensor, w2: Tensor, scale: float) -> Tensor:
    """LoKr's ``W'`` (as [`lokr_weight`][convlora.lokr.lokr_weight]) with LoKr's own backward.

    The backward reads the weight gradient twice and forms no weight-sized product.

    Args:
        w: The base weight viewed as ``(a, b, c, D)`` with ``D = d * prod(kernel)``.
        w1: ``W1``, ``a x c``.
        w2: ``W2`` as a ``b x D`` matrix ([`lokr_w2`][convlora.lokr.lokr_w2]).
        scale: The scale ``s``.

    Returns:
        ``W'`` viewed as ``(a, b, c, D)``.
    """
    if functorch_transform_active():  # plain autograd of the same addcmul
        return lokr_weight(w, w1, w2, scale)
    out: Tensor = _LoKrWeight.apply(w, w1, w2, scale)
    return out
