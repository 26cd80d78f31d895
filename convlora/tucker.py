r"""The Tucker product of LoHa's and LoKr's Tucker form (PEFT's ``use_effective_conv2d``).

On a convolution weight ``(rows, ch, *kernel)`` a low-rank product is built from a core
``T: rank x rank x kernel`` and two factors ``U: rank x rows``, ``V: rank x ch``:

``tucker(T, U, V)[p, q, k] = sum_{i, j} T[i, j, k] * U[i, p] * V[j, q]``

with ``k`` running over the kernel taps. So the kernel gets its own small factor, where the
flattened form spends ``rank * ch * prod(kernel)`` parameters on the ``cols`` axis. The product
is computed as ``U^T @ C`` with ``C`` the core with ``V`` contracted in
([`tucker_cols`][convlora.tucker.tucker_cols], ``rank x ch * prod(kernel)``, small): plain 2-D
products, the same kernels whether or not the factors require grad, so a merge from a file
computes what the layer computes. [convlora.loha][] and [convlora.lokr][] use it; which factors
each method has is in [convlora.methods][].
"""

from __future__ import annotations

import math

from torch import Tensor

__all__ = ["tucker_cols", "tucker_product"]


def tucker_cols(t: Tensor, v: Tensor) -> Tensor:
    """``c[i, (q, k)] = sum_j t[i, j, k] * v[j, q]``: the core with ``v`` contracted in, ``(i, q * K)``.

    Small (``rank x ch * prod(kernel)``); ``u^T @ c`` is the Tucker product as a
    ``rows x cols`` matrix. Plain 2-D products (the same kernels whether or not the factors
    require grad, so a merge from a file computes what the layer computes).

    Args:
        t: The core, ``rank x rank x kernel``.
        v: The factor of the channel axis, ``rank x ch``.

    Returns:
        ``c`` of shape ``(rank, ch * prod(kernel))``.
    """
    r1, r2, taps = t.shape[0], t.shape[1], math.prod(t.shape[2:])
    c = t.reshape(r1, r2, taps).transpose(1, 2).reshape(r1 * taps, r2) @ v  # (i*K, q)
    return c.reshape(r1, taps, v.shape[1]).transpose(1, 2).reshape(r1, -1)


def tucker_product(t: Tensor, u: Tensor, v: Tensor) -> Tensor:
    """``out[p, q, k] = sum_{i, j} t[i, j, k] * u[i, p] * v[j, q]``, shape ``(p, q, *kernel)``.

    Args:
        t: The core, ``rank x rank x kernel``.
        u: The factor of the row axis, ``rank x rows``.
        v: The factor of the channel axis, ``rank x ch``.

    Returns:
        The product, of shape ``(rows, ch, *kernel)``.
    """
    return (u.T @ tucker_cols(t, v)).reshape(u.shape[1], v.shape[1], *t.shape[2:])
