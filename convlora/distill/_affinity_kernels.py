"""Custom autograd kernels behind `convlora.distill.affinity_loss` (private).

Both take features already validated and normalised by ``affinity.py`` (``(B, C, N)``
with unit-norm columns, one dtype, one device) and return the exact mean over
``B·N·N`` of ``|A_s - A_t|^p`` without forming an ``N x N`` matrix:

* `BlockedL1` (``p=1``) in row blocks, memory ``O(B·N·block)``;
* `GramL2` (``p=2``) through the Gram identity, only ``C x C`` matrices.

`exact_fp32` switches off autocast and TF32/bf16 matmul shortcuts for the
duration of a computation. The math is in ``docs/distillation.md``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

__all__ = ["BlockedL1", "GramL2", "exact_fp32"]

_CHUNK_BYTES = 16 * 2**20  # size of one fp64 chunk of features for the p=2 Gram products


@contextlib.contextmanager
def exact_fp32(device: torch.device) -> Iterator[None]:
    """Disable autocast and TF32/bf16 matmul shortcuts; restore everything after.

    Args:
        device: device whose autocast is turned off inside the block.
    """
    mkldnn_matmul = getattr(torch.backends.mkldnn, "matmul", None)
    backends = [b for b in (torch.backends.cuda.matmul, mkldnn_matmul)
                if b is not None and hasattr(b, "fp32_precision")]
    saved = [b.fp32_precision for b in backends]
    legacy = None if backends else torch.backends.cuda.matmul.allow_tf32
    try:
        for b in backends:
            b.fp32_precision = "ieee"
        if legacy is not None:
            torch.backends.cuda.matmul.allow_tf32 = False
        with torch.autocast(device_type=device.type, enabled=False):
            yield
    finally:
        for b, value in zip(backends, saved):
            b.fp32_precision = value
        if legacy is not None:
            torch.backends.cuda.matmul.allow_tf32 = legacy


def _blocks(x: Tensor, y: Tensor, block: int) -> Iterator[tuple[Tensor, Tensor]]:
    """Yield ``(X[:, :, r], D_r = X[:, :, r]ᵀ Y)`` for consecutive row blocks ``r``.

    All blocks are written into one reused buffer: a fresh allocation per block
    would page-fault the whole ``N x N`` volume on CPU, like the naive version.
    """
    b, _, n = x.shape
    buf = torch.empty(b * min(block, n) * n, dtype=x.dtype, device=x.device)
    for start in range(0, n, block):
        x_r = x[:, :, start:start + block]
        d = buf[: b * x_r.shape[2] * n].view(b, x_r.shape[2], n)
        torch.bmm(x_r.transpose(1, 2), y, out=d)
        yield x_r, d


class BlockedL1(torch.autograd.Function):
    """mean |F̂sᵀF̂s - F̂tᵀF̂t| over B·N·N, computed and differentiated in row blocks.

    With ``X = [F̂s; F̂t]`` and ``Y = [F̂s; -F̂t]`` the difference is ``D = XᵀY``.
    ``D`` is symmetric, so with ``G = sign(D)`` the gradient is
    ``dL/dF̂s = 2 F̂s G / (B N²)`` and ``dL/dF̂t = -2 F̂t G / (B N²)``, and
    ``X G = Σ_r X[:, r] G[r, :]`` accumulates block by block.
    """

    @staticmethod
    def forward(ctx, s: Tensor, t: Tensor, block: int) -> Tensor:  # type: ignore[override]
        x = torch.cat([s, t], dim=1)
        y = torch.cat([s, -t], dim=1)
        total = torch.zeros((), dtype=torch.float64, device=x.device)
        with exact_fp32(x.device):
            for _, d in _blocks(x, y, block):
                # Row sums first: one fp32 reduction over the whole block drifts (0.5 % at 16M).
                total += torch.linalg.vector_norm(d, 1, dim=2).sum(dtype=torch.float64)
        ctx.save_for_backward(x, y)
        ctx.block = block
        ctx.cs = s.shape[1]
        b, _, n = x.shape
        return (total / (b * n * n)).to(x.dtype)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: Tensor) -> tuple[Tensor | None, Tensor | None, None]:  # type: ignore[override]
        x, y = ctx.saved_tensors
        need_s, need_t = ctx.needs_input_grad[:2]
        b, _, n = x.shape
        # Only accumulate the rows of X whose gradient is wanted (usually just the student's).
        lo = 0 if need_s else ctx.cs
        hi = x.shape[1] if need_t else ctx.cs
        acc = x.new_zeros(b, hi - lo, n)
        with exact_fp32(x.device):
            for x_r, d in _blocks(x, y, ctx.block):
                acc.baddbmm_(x_r[:, lo:hi], d.sign_())
        acc *= grad * (2.0 / (b * n * n))
        grad_s = acc[:, : ctx.cs - lo] if need_s else None
        grad_t = -acc[:, ctx.cs - lo:] if need_t else None
        return grad_s, grad_t, None


def _wide_chunks(s: Tensor, t: Tensor, wide: torch.dtype) -> Iterator[tuple[slice, Tensor]]:
    """Yield ``(samples, Z)`` with ``Z = [F̂s; F̂t]`` of a few samples, converted to ``wide``."""
    b, cs, n = s.shape
    step = max(1, _CHUNK_BYTES // ((cs + t.shape[1]) * n * 8))
    for start in range(0, b, step):
        rows = slice(start, start + step)
        z = s.new_empty(s[rows].shape[0], cs + t.shape[1], n, dtype=wide)
        z[:, :cs].copy_(s[rows])
        z[:, cs:].copy_(t[rows])
        yield rows, z


class GramL2(torch.autograd.Function):
    """mean (F̂sᵀF̂s - F̂tᵀF̂t)² over B·N·N from the Gram matrix ``K = ZZᵀ``, ``Z = [F̂s; F̂t]``.

    ``K = [[S, M], [Mᵀ, T]]`` with ``S = F̂sF̂sᵀ``, ``T = F̂tF̂tᵀ``, ``M = F̂sF̂tᵀ``, so
    ``L·B·N² = ||S||² + ||T||² - 2||M||² = tr(JKJK)`` with ``J = diag(I, -I)``, and
    ``dL/dZ = 4 JKJ Z / (B N²)`` (top rows ``4(S F̂s - M F̂t)``, bottom ``4(T F̂t - Mᵀ F̂s)``).
    ``K`` is accumulated in ``wide`` (fp64) a few samples at a time, so no wide copy of
    the whole batch is held; the backward runs in the features' dtype.
    """

    @staticmethod
    def forward(ctx, s: Tensor, t: Tensor, wide: torch.dtype) -> Tensor:  # type: ignore[override]
        b, cs, n = s.shape
        k = s.new_empty(b, cs + t.shape[1], cs + t.shape[1], dtype=wide)
        with exact_fp32(s.device):
            for rows, z in _wide_chunks(s, t, wide):
                torch.bmm(z, z.transpose(1, 2), out=k[rows])
        ctx.save_for_backward(s, t, k)
        sq = k.square()
        total = sq[:, :cs, :cs].sum() + sq[:, cs:, cs:].sum() - 2.0 * sq[:, :cs, cs:].sum()
        return (total / (b * n * n)).to(torch.promote_types(s.dtype, t.dtype))

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: Tensor) -> tuple[Tensor | None, Tensor | None, None]:  # type: ignore[override]
        s, t, k = ctx.saved_tensors
        b, cs, n = s.shape
        # JKJ (negated off-diagonal blocks), scaled, in the features' dtype: the gradient
        # 4(S F̂s - M F̂t) only cancels down to O(N·|D|), as in the naive fp32 backward.
        w = k * (grad.to(k.dtype) * (4.0 / (b * n * n)))
        w[:, :cs, cs:] *= -1
        w[:, cs:, :cs] *= -1
        w = w.to(s.dtype)
        grad_s = grad_t = None
        with exact_fp32(s.device):
            if ctx.needs_input_grad[0]:
                grad_s = torch.bmm(w[:, :cs, :cs], s).baddbmm_(w[:, :cs, cs:], t)
            if ctx.needs_input_grad[1]:
                grad_t = torch.bmm(w[:, cs:, cs:], t).baddbmm_(w[:, cs:, :cs], s)
        return grad_s, grad_t, None
