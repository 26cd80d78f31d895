r"""DoRA's weight decomposition: ``W' = m * V / ||V||`` with the norm per output channel.

DoRA (Liu et al. 2024, as PEFT implements it) adds a LoRA product to the base weight,
``V = W + s * reshape(B @ A)``, and rescales each output channel of ``V`` to a trainable
magnitude: ``W' = m * V / ||V||``, with ``m`` (``lora_magnitude``, one value per output channel)
started at ``||W||``. The norm is detached (treated as a constant in backward), as in the paper
and PEFT.

Output channel ``o`` of a ``Conv``/``Linear`` weight is ``W[o]``; of a ``ConvTranspose`` weight
``(in, out/g, *kernel)`` with ``g`` groups it is ``W[j*in/g:(j+1)*in/g, o % (out/g)]`` with
``j = o // (out/g)`` -- the slice along axis 1 within its group
([`channel_norm`][convlora.dora.channel_norm]). A channel whose ``V`` is all zero has norm 0: its
effective weight is zero (the division uses 1 in place of 0 there, never producing NaN or inf);
a channel that is zero in the base starts with ``m = 0`` and stays zero.

A fresh adapter (``B = 0``) leaves the weight unchanged: ``m = ||W||`` and ``||V|| = ||W||`` are
computed by the same function on the same tensor, so ``m / ||V|| = 1`` exactly and ``W' = W`` bit
for bit when the magnitude is stored in the compute dtype's precision (float32/float64 weights).
For fp16/bf16 weights the magnitude is stored in the weight's dtype, so ``m / ||V||`` is 1 within
that rounding (relative ``2**-11`` / ``2**-8``) and ``W'`` may differ from ``W`` by one unit in
the last place of some entries.

How ``W'`` is computed: [`dora_weight`][convlora.dora.dora_weight] allocates one weight-sized
tensor, ``V`` from one ``addmm``, rescaled in place into ``W'`` after the norm. Its trainable
form, [`dora_weight_autograd`][convlora.dora.dora_weight_autograd], keeps ``W`` for backward and,
when asked (on CPU with float32/float64 weights), ``W'`` itself (the very tensor the convolution
keeps, so no extra memory). On ``Conv``/``Linear`` with ``"kernel"`` factors its backward forms
the factor gradients as ``s * diag(m / ||V||) @ (G @ A^T)`` and ``s * (diag(m / ||V||) @ B)^T @ G``
and the magnitude's as ``<G, V> / ||V|| = <G, W'> / (r * ||V||)`` row by row with
``r = m / ||V||`` (``W'`` was just read by the convolution's backward, so it is still in cache
where ``W`` is not; rows with ``r = 0`` use ``(<G, W> + s * <G @ A^T, B>) / ||V||``): three reads
of the weight gradient ``G``, nothing weight-sized allocated. (A fresh weight-sized allocation
costs as much as several passes over warm memory on CPU, so the count of those is what this
minimises.) Which factors DoRA has and how the layer calls this is in [convlora.methods][].
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from ._autocast import no_autocast
from ._functorch import functorch_transform_active

__all__ = ["channel_norm", "dora_weight", "dora_weight_autograd"]


def _grouped_view(v: Tensor, groups: int, transposed: bool) -> Tensor:
    """``v`` viewed so that axis 1 (after the group axis 0) indexes output channels.

    Conv/Linear: ``(1, out, rest)``. ConvTranspose: ``(g, in/g, out/g, rest)`` -- the norm then
    runs over axes 1 and 3.
    """
    if transposed:
        return v.reshape(groups, v.shape[0] // groups, v.shape[1], -1)
    return v.reshape(1, v.shape[0], -1)


def channel_norm(v: Tensor, groups: int = 1, transposed: bool = False) -> Tensor:
    """L2 norm of ``v`` per output channel, shape ``(out,)``, in ``v``'s dtype.

    Args:
        v: A weight-shaped tensor.
        groups: The layer's groups (they matter for a ``ConvTranspose`` weight only).
        transposed: Whether ``v`` is a ``ConvTranspose``'s ``(in, out/groups, *kernel)`` weight.

    Returns:
        One norm per output channel.
    """
    g = _grouped_view(v, groups, transposed)
    if transposed:
        return torch.linalg.vector_norm(g, dim=(1, 3)).reshape(-1)
    return torch.linalg.vector_norm(g, dim=2).reshape(-1)


def _per_channel(values: Tensor, groups: int, transposed: bool) -> Tensor:
    """``values`` (one per output channel) shaped to broadcast against ``_grouped_view``."""
    return values.reshape(groups, 1, -1, 1) if transposed else values.reshape(1, -1, 1)


def _channel_scale_(v: Tensor, per_channel: Tensor, groups: int, transposed: bool) -> Tensor:
    """Multiply each output channel of the contiguous ``v`` by its entry of ``per_channel``, in place."""
    _grouped_view(v, groups, transposed).mul_(_per_channel(per_channel, groups, transposed))
    return v


def _channel_dot(u: Tensor, v: Tensor, groups: int, transposed: bool) -> Tensor:
    """Per-output-channel dot product of two weight-shaped tensors, shape ``(out,)``."""
    gu, gv = _grouped_view(u, groups, transposed), _grouped_view(v, groups, transposed)
    if transposed:
        return (gu * gv).sum(dim=(1, 3)).reshape(-1)
    return torch.linalg.vecdot(gu, gv, dim=2).reshape(-1)


_ROWDOT_CHUNK_BYTES = 1 << 20


def _rowdot(u: Tensor, v: Tensor) -> Tensor:
    """Row-wise dot product of two ``rows x cols`` matrices, in row blocks of about 1 MiB.

    ``vecdot`` forms the elementwise product first; in blocks that temporary stays small and in
    cache instead of being a fresh weight-sized allocation (page faults on CPU).
    """
    n = max(1, _ROWDOT_CHUNK_BYTES // max(1, u.shape[1] * u.element_size()))
    if n >= u.shape[0]:
        return torch.linalg.vecdot(u, v, dim=1)
    return torch.cat([torch.linalg.vecdot(x, y, dim=1) for x, y in zip(u.split(n), v.split(n))])


def dora_weight(w: Tensor, a: Tensor, b: Tensor, m: Tensor, scale: float, shape: tuple[int, ...],
                groups: int = 1, transposed: bool = False) -> tuple[Tensor, Tensor, Tensor]:
    """DoRA's ``(W', ||V||, m / ||V||)`` for ``V = W + s * B @ A``, without autograd.

    ``w`` is the base weight as the ``rows x cols`` matrix of ``B @ A`` and ``shape`` the
    weight's shape; the norm is per output channel, with 1 in place of a zero norm. One
    weight-sized tensor is allocated (``V``, rescaled in place into ``W'``). Every DoRA forward
    computes ``W'`` with this function, so they agree bit for bit. Called with autograd on (under
    ``torch.func`` transforms), it differentiates through ``V`` and ``m`` with the norm detached.

    Args:
        w: The base weight as the ``rows x cols`` matrix of ``B @ A``, in the compute dtype.
        a: ``lora_A``.
        b: ``lora_B``.
        m: ``lora_magnitude``, one value per output channel.
        scale: The scale ``s``.
        shape: The weight's shape.
        groups: The layer's groups.
        transposed: Whether the weight is a ``ConvTranspose``'s ``(in, out/groups, *kernel)``.

    Returns:
        ``(W', ||V||, m / ||V||)``: ``W'`` of ``shape``, the norm (1 where it is 0) and the ratio
        per output channel.
    """
    v = torch.addmm(w, b, a, alpha=scale).view(shape)
    norm = channel_norm(v.detach(), groups, transposed)  # detached: a constant in backward
    norm = torch.where(norm == 0, 1.0, norm)
    ratio = m / norm
    return _channel_scale_(v, ratio, groups, transposed), norm, ratio


class _DoRAWeight(torch.autograd.Function):
    """``W' = (m / ||V||) * V`` with ``V = W + s * B @ A``, the norm per output channel, detached.

    ``w`` is the base weight as the ``rows x cols`` matrix of ``B @ A`` and ``shape`` the
    weight's shape. The forward allocates one weight-sized tensor (``V``, rescaled in place into
    ``W'``). With ``keep_out`` it saves that output ``W'`` for backward (the layer's convolution
    keeps the same tensor, so this costs no memory); otherwise no weight-sized tensor besides
    ``w``. When the rows are the output channels (``Conv``/``Linear`` with ``"kernel"`` factors)
    the backward reads the weight gradient ``G`` three times and allocates nothing weight-sized:
    ``dA = s * (diag(r) @ B)^T @ G``, ``dB = s * diag(r) @ (G @ A^T)`` with ``r = m / ||V||``
    (``G @ A^T`` formed as ``(A @ G^T)^T``, the faster orientation on CPU), and
    ``dm = <G, V> / ||V||`` per row. With ``keep_out``, ``<G, V> = <G, W'> / r`` -- ``W'`` was
    just read by the convolution's backward and is still in cache, where ``W`` is not -- and for
    the rows with ``r = 0`` (``W'`` is zero there) ``<G, W> + s * <G @ A^T, B>``, which is the
    formula for every row without ``keep_out``. Otherwise (``ConvTranspose``, ``"loralib"``
    factors) it forms ``dL/dV = diag(r) G`` once and recomputes ``V`` for ``dm``.
    """

    @staticmethod
    def forward(ctx: Any, w: Tensor, a: Tensor, b: Tensor, m: Tensor, scale: float,
                shape: tuple[int, ...], groups: int, transposed: bool, keep_out: bool) -> Tensor:
        with no_autocast(w):  # in the compute dtype, as every method (the layer's conv may autocast)
            out, norm, ratio = dora_weight(w, a, b, m, scale, shape, groups, transposed)
            ctx.keep_out = keep_out and not transposed and w.shape[0] == shape[0]
            ctx.save_for_backward(w, a, b, norm, ratio, *([out] if ctx.keep_out else []))
            ctx.scale, ctx.shape, ctx.groups, ctx.transposed = scale, shape, groups, transposed
            return out

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        with no_autocast(grad):
            return _DoRAWeight._backward(ctx, grad.to(ctx.saved_tensors[0].dtype))

    @staticmethod
    def _backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        w, a, b, norm, ratio = ctx.saved_tensors[:5]
        scale, shape, groups, transposed = ctx.scale, ctx.shape, ctx.groups, ctx.transposed
        need_w, need_a, need_b, need_m = ctx.needs_input_grad[:4]
        g = grad.reshape(w.shape)
        gw = ga = gb = gm = None
        if not transposed and w.shape[0] == shape[0]:  # rows are the output channels
            col = ratio[:, None]
            col_s = col * scale
            gw = g * col if need_w else None
            ga = (b * col_s).T @ g if need_a else None
            if need_b or need_m:
                g_at = (a @ g.T).T  # G @ A^T, rows x rank
                gb = g_at * col_s if need_b else None
                if need_m:
                    gm = _DoRAWeight._magnitude_grad(ctx, g, w, b, g_at, norm, ratio, scale)
            return gw, ga, gb, gm, None, None, None, None, None
        if need_w or need_a or need_b:
            gv = (_grouped_view(grad, groups, transposed)
                  * _per_channel(ratio, groups, transposed)).reshape(w.shape)
            gw = gv if need_w else None
            ga = (b.T @ gv) * scale if need_a else None
            gb = (a @ gv.T).T * scale if need_b else None
        if need_m:
            v = torch.addmm(w, b, a, alpha=scale).view(shape)
            gm = _channel_dot(grad.reshape(shape), v, groups, transposed) / norm
        return gw, ga, gb, gm, None, None, None, None, None

    @staticmethod
    def _magnitude_grad(ctx: Any, g: Tensor, w: Tensor, b: Tensor, g_at: Tensor, norm: Tensor,
                        ratio: Tensor, scale: float) -> Tensor:
        """``<G, V> / ||V||`` per row (rows are output channels), ``V = W + s * B @ A``."""
        def from_factors(rows: slice | Tensor) -> Tensor:  # <G, V> = <G, W> + s * <G @ A^T, B>
            return (_rowdot(g[rows], w[rows]) + scale * torch.linalg.vecdot(g_at[rows], b[rows], dim=1)
                    ) / norm[rows]

        if not ctx.keep_out:
            return from_factors(slice(None))
        zero = ratio == 0
        out = ctx.saved_tensors[5].reshape(w.shape)
        gm = _rowdot(g, out) / torch.where(zero, 1.0, ratio) / norm
        if bool(zero.any()):  # W' is zero on these rows: <G, V> from W and the factors
            rows = zero.nonzero().flatten()
            gm[rows] = from_factors(rows)
        return gm


def dora_weight_autograd(w: Tensor, a: Tensor, b: Tensor, m: Tensor, scale: float,
                         shape: tuple[int, ...], groups: int = 1, transposed: bool = False,
                         keep_out: bool = False) -> Tensor:
    """DoRA's ``W'`` (as [`dora_weight`][convlora.dora.dora_weight]) with DoRA's own backward.

    The norm is detached. With ``keep_out`` the output ``W'`` is saved for backward, which costs
    no memory when the caller's convolution keeps the very same tensor; the backward then reads
    the weight gradient three times and allocates nothing weight-sized where the rows are the
    output channels (``Conv``/``Linear`` with ``"kernel"`` factors).

    Args:
        w: The base weight as the ``rows x cols`` matrix of ``B @ A``, in the compute dtype.
        a: ``lora_A``.
        b: ``lora_B``.
        m: ``lora_magnitude``, one value per output channel.
        scale: The scale ``s``.
        shape: The weight's shape.
        groups: The layer's groups.
        transposed: Whether the weight is a ``ConvTranspose``'s ``(in, out/groups, *kernel)``.
        keep_out: Save ``W'`` for backward (only where the caller keeps the same tensor, and the
            check on zero ratios may read a flag back: on CPU).

    Returns:
        ``W'`` of ``shape``, in ``w``'s dtype.
    """
    if functorch_transform_active():  # plain autograd through the same operations (norm detached)
        return dora_weight(w, a, b, m, scale, shape, groups, transposed)[0]
    out: Tensor = _DoRAWeight.apply(w, a, b, m, scale, shape, groups, transposed, keep_out)
    return out
