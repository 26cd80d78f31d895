r"""The training convolution of a low-rank adapter: one conv with ``W'`` forward, activation-space backward.

The unmerged forward of a [`LoRALayer`][convlora.LoRALayer] is one convolution with the
effective weight ``W'``. Letting autograd differentiate it forms the gradient of ``W'`` -- a
weight-sized correlation of the input with the output gradient, the most expensive part of full
fine-tuning's backward -- only to project it onto the small factors. This module's autograd
function computes the same forward (the same ``W'``, bit for bit, so merged = unmerged still
holds) but a backward that never forms a weight-sized gradient.

For a ``Conv1d/2d/3d`` with ``g`` groups and ``"kernel"`` factors ``A: r x (in/g * k)`` and
``B: out x r`` (scale ``s``), ``conv(x, s * reshape(B @ A)) = conv1x1_g(conv_g(x, A^g), B)``,
where ``A^g`` repeats ``A`` once per group (``g * r`` channels) and ``conv1x1_g`` is the grouped
1x1 conv with weight ``B``. With ``e = dL/dy`` and ``c`` the per-channel factor of DoRA
(``c = m / ||V||``; 1 for LoRA):

* ``u = conv_g(x, A^g)`` (``g * r`` channels, recomputed in backward, not kept);
* ``dB = s * wgrad_1x1(c * e, u)``; ``du = s * conv1x1_g^T(c * e, B)``;
* ``dA = sum over groups of wgrad(x, du)``; ``dx = conv^T(c * e, W) + conv_g^T(du, A^g)``;
* DoRA's magnitude: ``dm = <e, conv(x, V)> / ||V|| = <e, y - bias> / m`` per output channel
  (``y`` is the layer's output, kept as ``y - bias`` in a tensor of its own, so in-place ops on
  the output stay allowed). A channel with ``m = 0`` has ``y - bias = 0`` there and takes
  ``(<G, W> + s * <G @ A^T, B>) / ||V||`` with ``G`` the weight gradient, formed only when such
  a channel exists.

The extra convolutions have ``r`` (LoRA, DoRA) or ``r**2`` (LoHa, through its Khatri-Rao
factors) channels where the weight gradient has ``out`` (LoKr's are ``W2``'s ``b`` channels over
the input's ``c`` blocks, see its function), and nothing weight-sized is kept for
backward: autograd keeps ``x`` (as it does for full fine-tuning), the factors and, for DoRA,
``y - bias``.

[`activation_backward_conv`][convlora.lowrank_conv.activation_backward_conv] is the entry point;
[`activation_backward_kron_conv`][convlora.lowrank_conv.activation_backward_kron_conv] is LoKr's.
The layer calls them for ``Conv1d/2d/3d`` with ``"kernel"`` factors, a float32/float64 batch, a
frozen base weight and autocast off, and otherwise differentiates ``W'`` as before.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from .dora import dora_weight
from .lokr import lokr_weight

__all__ = ["ACTIVATION_BACKWARD_MIN_WEIGHT", "ConvSpec", "activation_backward_conv",
           "activation_backward_kron_conv", "activation_backward_pays", "conv_output_numel",
           "conv_spec"]

_CONV_FN = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}
_CONV_T_FN = {1: F.conv_transpose1d, 2: F.conv_transpose2d, 3: F.conv_transpose3d}

ConvSpec = tuple[int, tuple[int, ...], tuple[int, ...], tuple[int, ...], int]
"""``(ndim, stride, padding, dilation, groups)`` of a convolution with numeric, symmetric padding."""


ACTIVATION_BACKWARD_MIN_WEIGHT = 1 << 17
"""Weights with fewer entries (e.g. 3x3 convs under 128 channels) keep the weight-space backward."""


def activation_backward_pays(weight_shape: tuple[int, ...], groups: int, rank: int,
                             kept: int = 0) -> bool:
    """Whether this module's backward is the faster one for a conv with this weight and rank.

    ``kept`` is the number of entries of the activation-sized tensor the path keeps for backward
    besides the input (DoRA's ``y - bias``; 0 for the other methods). The path applies only where
    that is at most the weight's entries: the weight-space backward keeps ``W'`` instead, so the
    activation-space one never keeps more memory.

    It skips the weight gradient (a correlation as costly as the forward) and every weight-sized
    pass of the weight-space backward, and pays for three convolutions with ``groups * rank``
    output channels. Measured on CPU (``benchmarks/bench_backward_paths.py``, one conv, and
    ``bench_methods.py``, whole models; docs/benchmarks.md), it wins where the weight is large --
    from about ``128 x 128 x 3 x 3`` (0.56-0.88 of the weight-space time) -- and loses on small
    convs (1.02-1.86 at 48-64 channels), whose weight-space passes are cheap and whose
    few-channel convolutions run far below the machine's peak; so it applies from
    [`ACTIVATION_BACKWARD_MIN_WEIGHT`][convlora.lowrank_conv.ACTIVATION_BACKWARD_MIN_WEIGHT]
    entries, and only while ``3 * groups * rank < out`` (depthwise and near-full-rank adapters
    keep the weight-space backward). The threshold has not been measured on a GPU; it is a
    module attribute, so it can be set (``0``: every eligible conv takes this path).
    """
    numel = 1
    for n in weight_shape:
        numel *= n
    return (numel >= ACTIVATION_BACKWARD_MIN_WEIGHT and 3 * groups * rank < weight_shape[0]
            and kept <= numel)


def conv_output_numel(x_shape: tuple[int, ...], weight_shape: tuple[int, ...], spec: ConvSpec) -> int:
    """Entries of ``conv(x, W)``'s output for an input of ``x_shape`` (already padded as ``spec`` expects)."""
    _, stride, padding, dilation, _ = spec
    numel = x_shape[0] * weight_shape[0]
    for n, k, s, p, d in zip(x_shape[2:], weight_shape[2:], stride, padding, dilation):
        numel *= max(0, (n + 2 * p - d * (k - 1) - 1) // s + 1)
    return numel


def conv_spec(ndim: int, kernel_size: tuple[int, ...], stride: tuple[int, ...], padding: Any,
              dilation: tuple[int, ...], groups: int) -> ConvSpec | None:
    """The layer's settings with ``padding`` as numbers, or ``None`` where they are not symmetric.

    ``'valid'`` is zero padding; ``'same'`` is symmetric when ``dilation * (kernel - 1)`` is even
    on every axis (otherwise torch pads one side more, which this function's convolutions do not
    express, and the layer keeps its plain path).
    """
    if padding == "valid":
        pad: tuple[int, ...] = (0,) * ndim
    elif padding == "same":
        total = [d * (k - 1) for d, k in zip(dilation, kernel_size)]
        if any(t % 2 for t in total):
            return None
        pad = tuple(t // 2 for t in total)
    else:
        pad = tuple(int(p) for p in padding)
    return ndim, tuple(stride), pad, tuple(dilation), int(groups)


def activation_backward_conv(x: Tensor, weight: Tensor, bias: Tensor | None, lora_a: Tensor,
                             lora_b: Tensor, scale: float, spec: ConvSpec,
                             magnitude: Tensor | None = None) -> Tensor:
    """``conv(x, W', bias)`` with ``W' = W + s * reshape(B @ A)`` (or DoRA's ``W'`` given ``magnitude``).

    The forward is the one convolution the merged layer runs, with ``W'`` computed by the same
    operations as [`effective_weight`][convlora.methods.effective_weight] (so the output is the
    same bit for bit); the backward is the activation-space one of this module. ``x`` is already
    padded for padding modes other than zeros.

    Args:
        x: Batched input ``(N, in, *spatial)``.
        weight: The frozen base weight ``(out, in/groups, *kernel)``.
        bias: The bias or ``None``.
        lora_a: ``A``, ``r x (in/groups * prod(kernel))``.
        lora_b: ``B``, ``out x r``.
        scale: ``s``.
        spec: The convolution's settings, from [`conv_spec`][convlora.lowrank_conv.conv_spec].
        magnitude: DoRA's magnitude ``m`` (one per output channel), or ``None`` for LoRA.

    Returns:
        The layer's output.
    """
    out: Tensor = _ActivationBackwardConv.apply(x, weight, bias, lora_a, lora_b, magnitude, scale,
                                                spec)
    return out


def _channel_view(ndim: int) -> tuple[int, ...]:
    return (1, -1) + (1,) * ndim


def _conv_backward(grad: Tensor, inp: Tensor, weight: Tensor, spec: ConvSpec,
                   mask: list[bool]) -> tuple[Tensor | None, Tensor | None]:
    """``(d input, d weight)`` of ``conv(inp, weight)`` with ``spec``'s settings, as ``mask`` asks."""
    ndim, stride, padding, dilation, groups = spec
    dx, dw, _ = torch.ops.aten.convolution_backward(
        grad, inp, weight, None, list(stride), list(padding), list(dilation), False, [0] * ndim,
        groups, [*mask, False])
    return dx, dw


class _ActivationBackwardConv(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: Tensor, weight: Tensor, bias: Tensor | None, a: Tensor, b: Tensor,
                magnitude: Tensor | None, scale: float, spec: ConvSpec) -> Tensor:
        ndim, stride, padding, dilation, groups = spec
        flat = weight.reshape(b.shape[0], a.shape[1])
        if magnitude is None:
            w_eff = torch.addmm(flat, b, a, alpha=scale).view(weight.shape)
            norm = ratio = None
        else:
            w_eff, norm, ratio = dora_weight(flat, a, b, magnitude, scale, tuple(weight.shape))
        y = _CONV_FN[ndim](x, w_eff, bias, stride, padding, dilation, groups)
        ctx.spec, ctx.scale = spec, scale
        keep_y = magnitude is not None and ctx.needs_input_grad[5]
        shifted = None
        if keep_y:  # y - bias in its own tensor: in-place ops on the output stay allowed
            shifted = y - bias.view(_channel_view(ndim)) if bias is not None else y.clone()
        ctx.save_for_backward(x, weight, a, b, magnitude, norm, ratio, shifted)
        return y

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        x, weight, a, b, magnitude, norm, ratio, shifted = ctx.saved_tensors
        ndim, stride, padding, dilation, groups = ctx.spec
        s = ctx.scale
        need_x, need_w, need_bias, need_a, need_b, need_m = ctx.needs_input_grad[:6]
        if need_w:  # the layer never routes a trainable base weight here
            raise RuntimeError("activation_backward_conv: the base weight must be frozen")
        view = _channel_view(ndim)
        dims = (0, *range(2, grad.dim()))
        e = grad if ratio is None else grad * ratio.view(view).to(grad.dtype)
        r = a.shape[0]
        a_conv = a.view(r, *weight.shape[1:])
        if groups > 1:
            a_conv = a_conv.repeat(groups, *([1] * (weight.dim() - 1)))
        b_conv = b.view(*b.shape, *([1] * ndim))
        one_by_one: ConvSpec = (ndim, (1,) * ndim, (0,) * ndim, (1,) * ndim, groups)
        dx = da = db = dbias = dm = None
        du = None
        if need_b:
            u = _CONV_FN[ndim](x, a_conv, None, stride, padding, dilation, groups)
            du, gb = _conv_backward(e, u, b_conv, one_by_one, [need_a or need_x, True])
            assert gb is not None
            db = gb.view(b.shape).mul_(s)
        elif need_a or need_x:
            du = _CONV_T_FN[ndim](e, b_conv, None, 1, 0, 0, groups)
        if du is not None:
            dx_lora, ga = _conv_backward(du.mul_(s), x, a_conv, ctx.spec, [need_x, need_a])
            if need_a:
                assert ga is not None
                da = ga.reshape(groups, r, -1).sum(0) if groups > 1 else ga.reshape(r, -1)
            if need_x:
                dx_base = _conv_backward(e, x, weight, ctx.spec, [True, False])[0]
                assert dx_base is not None and dx_lora is not None
                dx = dx_base.add_(dx_lora)
        if need_bias:
            dbias = grad.sum(dims)
        if need_m:
            dm = _magnitude_grad(grad, x, weight, a, b, magnitude, norm, shifted, s, ctx.spec)
        return dx, None, dbias, da, db, dm, None, None


def _magnitude_grad(grad: Tensor, x: Tensor, weight: Tensor, a: Tensor, b: Tensor, magnitude: Tensor,
                    norm: Tensor, shifted: Tensor, scale: float, spec: ConvSpec) -> Tensor:
    """``<e, y - bias> / m`` per output channel; ``(<G, W> + s <G A^T, B>) / ||V||`` where ``m = 0``."""
    dims = (0, *range(2, grad.dim()))
    zero = magnitude == 0
    dm = (grad * shifted).sum(dims) / torch.where(zero, 1.0, magnitude)
    if bool(zero.any()):  # y - bias is zero on these channels: the dot product from the weight gradient
        gw = _conv_backward(grad, x, weight, spec, [False, True])[1]
        assert gw is not None
        g = gw.reshape(b.shape[0], -1)
        rows = zero.nonzero().flatten()
        g_rows = g[rows]
        dot = (torch.linalg.vecdot(g_rows, weight.reshape(b.shape[0], -1)[rows], dim=1)
               + scale * torch.linalg.vecdot(g_rows @ a.T, b[rows], dim=1))
        dm[rows] = dot / norm[rows]
    return dm


def activation_backward_kron_conv(x: Tensor, weight: Tensor, bias: Tensor | None, w1: Tensor,
                                  w2: Tensor, scale: float, spec: ConvSpec) -> Tensor:
    """``conv(x, W + s * reshape(kron(W1, W2)), bias)`` (LoKr, ``groups == 1``), activation-space backward.

    With ``out = a * b`` and ``in = c * d`` (``W1: a x c``, ``W2: b x (d * prod(kernel))``),
    ``conv(x, s * kron(W1, W2))`` mixes, with ``W1``, the ``c`` blocks of
    ``z = conv(x_l, W2)``: each block ``x_l`` of ``d`` input channels through ``W2`` as a conv
    with ``b`` output channels (the ``c`` blocks run as one batch of ``N * c``). So
    ``dW1[i, l] = s * <e_i, z_l>``, ``dz_l = s * sum_i W1[i, l] e_i``, and ``dW2`` and the input's
    share come from one convolution backward of ``z`` -- with ``1/a`` of the layer's
    multiply-adds, and no weight gradient. The forward is the merged layer's convolution with
    ``W'`` from [`lokr_weight`][convlora.lokr.lokr_weight], bit for bit.

    Args:
        x: Batched input ``(N, in, *spatial)``, already padded for padding modes other than zeros.
        weight: The frozen base weight ``(out, in, *kernel)``.
        bias: The bias or ``None``.
        w1: ``W1``, ``a x c``.
        w2: ``W2`` as a ``b x (d * prod(kernel))`` matrix.
        scale: ``s``.
        spec: The convolution's settings (``groups`` must be 1).

    Returns:
        The layer's output.
    """
    if spec[4] != 1:
        raise ValueError(f"activation_backward_kron_conv needs groups=1, got groups={spec[4]}")
    out: Tensor = _ActivationBackwardKronConv.apply(x, weight, bias, w1, w2, scale, spec)
    return out


class _ActivationBackwardKronConv(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: Tensor, weight: Tensor, bias: Tensor | None, w1: Tensor, w2: Tensor,
                scale: float, spec: ConvSpec) -> Tensor:
        ndim, stride, padding, dilation, _ = spec
        (a, c), (b, cols) = w1.shape, w2.shape
        w_eff = lokr_weight(weight.reshape(a, b, c, cols), w1, w2, scale).view(weight.shape)
        ctx.spec, ctx.scale = spec, scale
        ctx.save_for_backward(x, weight, w1, w2)
        return _CONV_FN[ndim](x, w_eff, bias, stride, padding, dilation, 1)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        x, weight, w1, w2 = ctx.saved_tensors
        ndim, stride, padding, dilation, _ = ctx.spec
        s = ctx.scale
        need_x, need_w, need_bias, need_1, need_2 = ctx.needs_input_grad[:5]
        if need_w:  # the layer never routes a trainable base weight here
            raise RuntimeError("activation_backward_kron_conv: the base weight must be frozen")
        (a, c), b = w1.shape, w2.shape[0]
        n, d = x.shape[0], x.shape[1] // c
        blocks = x.reshape(n * c, d, *x.shape[2:])  # input channel l * d + m is block l, channel m
        w2_conv = w2.view(b, d, *weight.shape[2:])
        e = grad.reshape(n, a, -1)  # output channel i * b + j: row i, then (j, position)
        dx = dbias = d1 = d2 = None
        if need_1:
            z = _CONV_FN[ndim](blocks, w2_conv, None, stride, padding, dilation, 1)
            d1 = torch.einsum("nix,nlx->il", e, z.reshape(n, c, -1)).mul_(s)
        if need_x or need_2:
            dz = torch.matmul(w1.T * s, e).reshape(n * c, b, *grad.shape[2:])
            dblocks, g2 = _conv_backward(dz, blocks, w2_conv, ctx.spec, [need_x, need_2])
            d2 = g2.reshape(w2.shape) if g2 is not None else None
            if need_x:
                dx = _conv_backward(grad, x, weight, ctx.spec, [True, False])[0]
                assert dx is not None and dblocks is not None
                dx.add_(dblocks.reshape(x.shape))
        if need_bias:
            dbias = grad.sum((0, *range(2, grad.dim())))
        return dx, None, dbias, d1, d2, None, None
