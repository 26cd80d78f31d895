"""Spatial-affinity distillation loss (FAKD), exact and without N x N matrices.

``F̂`` is a ``(C, H, W)`` map flattened to ``C x N`` with unit-norm columns
(``f̂_i = f_i / (||f_i|| + eps)``); its affinity ``A = F̂ᵀF̂`` is ``N x N`` and
independent of ``C``. The loss is the mean of ``|A_s - A_t|^p`` over ``B·N·N``.
``p=1`` runs in row blocks inside a custom autograd function (memory
``O(B·N·block)``), ``p=2`` through the Gram identity (only ``C x C`` matrices).
Both equal the naive formula; ``pool`` is the only approximation. The math is
in ``docs/distillation.md``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import once_differentiable

__all__ = ["affinity_loss", "spatial_affinity"]

_EPS = 1e-7  # same constant as the FAKD reference code
_BLOCK_BYTES = 64 * 2**20  # target size of one (B, block, N) fp32 block
_CHUNK_BYTES = 16 * 2**20  # size of one fp64 chunk of features for the p=2 Gram products


@contextlib.contextmanager
def _exact_fp32(device: torch.device) -> Iterator[None]:
    """Disable autocast and TF32/bf16 matmul shortcuts; restore everything after."""
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


def _prepare(feat: Tensor, pool: int | None, eps: float, what: str) -> Tensor:
    """Validate, pool, upcast to at least fp32, flatten to (B, C, N), normalise columns."""
    if not isinstance(feat, Tensor) or not feat.is_floating_point():
        got = feat.dtype if isinstance(feat, Tensor) else type(feat).__name__
        raise TypeError(f"{what} must be a floating-point tensor, got {got}.")
    if feat.ndim not in (3, 4):
        raise ValueError(
            f"{what} has shape {tuple(feat.shape)}; expected (B, C, H, W) or (B, C, N). "
            "Reshape the feature map or pick a `select` that returns a feature tensor."
        )
    if pool is not None:
        if isinstance(pool, bool) or not isinstance(pool, int) or pool < 1:
            raise ValueError(f"pool={pool!r} is not a positive integer; pass e.g. pool=2 or None.")
        if feat.ndim != 4:
            raise ValueError(f"pool={pool} needs a (B, C, H, W) map, {what} has shape "
                             f"{tuple(feat.shape)}.")
        if pool > 1:
            feat = F.avg_pool2d(feat, pool)
    dtype = torch.promote_types(feat.dtype, torch.float32)
    x = feat.to(dtype).flatten(2)
    return x / (torch.linalg.vector_norm(x, dim=1, keepdim=True) + eps)


def _check_pair(s: Tensor, t: Tensor) -> None:
    if s.shape[0] != t.shape[0] or s.shape[2] != t.shape[2]:
        raise ValueError(
            f"student features (B={s.shape[0]}, N={s.shape[2]}) and teacher features "
            f"(B={t.shape[0]}, N={t.shape[2]}) must have the same batch size and number of "
            "spatial positions (channels may differ). Tap layers at the same resolution "
            "or resize one map before the loss."
        )


def spatial_affinity(feat: Tensor, *, pool: int | None = None, eps: float = _EPS) -> Tensor:
    """Full spatial affinity ``F̂ᵀF̂`` of a feature map, for small maps and plots.

    Args:
        feat: features ``(B, C, H, W)`` or ``(B, C, N)``.
        pool: optional integer average-pooling factor applied first.
        eps: added to each position's norm so zero vectors give zero rows.

    Returns:
        ``(B, N, N)`` cosine similarities in fp32 (fp64 for fp64 input).
        Memory is ``B·N²`` floats: use :func:`affinity_loss` for losses.
    """
    x = _prepare(feat, pool, eps, "feat")
    with _exact_fp32(x.device):
        return torch.bmm(x.transpose(1, 2), x)


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


class _BlockedL1(torch.autograd.Function):
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
        with _exact_fp32(x.device):
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
        with _exact_fp32(x.device):
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


class _GramL2(torch.autograd.Function):
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
        with _exact_fp32(s.device):
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
        with _exact_fp32(s.device):
            if ctx.needs_input_grad[0]:
                grad_s = torch.bmm(w[:, :cs, :cs], s).baddbmm_(w[:, :cs, cs:], t)
            if ctx.needs_input_grad[1]:
                grad_t = torch.bmm(w[:, cs:, cs:], t).baddbmm_(w[:, cs:, :cs], s)
        return grad_s, grad_t, None


def _default_block_size(batch: int, n: int) -> int:
    """Rows per block so one ``(batch, block, n)`` fp32 block is about 64 MiB."""
    return max(1, min(n, _BLOCK_BYTES // (4 * batch * n)))


def affinity_loss(
    student_feat: Tensor,
    teacher_feat: Tensor,
    *,
    p: int = 1,
    pool: int | None = None,
    block_size: int | None = None,
    eps: float = _EPS,
) -> Tensor:
    """Exact FAKD spatial-affinity loss between two feature maps.

    ``mean over (b, i, j) of |A_s[b, i, j] - A_t[b, i, j]| ** p`` with
    ``A = F̂ᵀF̂`` the cosine-similarity matrix of the ``N`` spatial positions,
    never forming an ``N x N`` matrix. Gradients flow to both inputs (detach
    the teacher yourself if it should not get any). The computation runs in
    fp32 (fp64 for fp64 inputs) with autocast and TF32 disabled inside, so
    bf16/fp16 features accumulate in fp32.

    Args:
        student_feat: ``(B, Cs, H, W)`` or ``(B, Cs, N)``.
        teacher_feat: ``(B, Ct, H, W)`` or ``(B, Ct, N)``; ``Ct`` may differ from
            ``Cs`` but batch size and spatial size must match.
        p: 1 for the FAKD mean absolute difference (blockwise custom autograd,
            memory ``O(B·N·block)``), 2 for the mean squared difference (Gram
            identity, memory ``O(B·C·N + B·C²)``).
        pool: optional integer average-pooling factor applied to both maps first
            (an approximation that divides ``N`` by ``pool²``).
        block_size: rows per block for ``p=1``; default sizes one
            ``(B, block, N)`` fp32 block to about 64 MiB.
        eps: added to each position's L2 norm; zero vectors give zero affinities
            instead of NaN.

    Returns:
        A scalar tensor in the compute dtype (fp32, or fp64 for fp64 inputs).
    """
    if p not in (1, 2) or isinstance(p, bool):
        raise ValueError(f"p={p!r} is not supported; use p=1 (FAKD L1) or p=2 (squared error).")
    s = _prepare(student_feat, pool, eps, "student_feat")
    t = _prepare(teacher_feat, pool, eps, "teacher_feat")
    _check_pair(s, t)
    if s.device != t.device:
        raise ValueError(f"student features are on {s.device}, teacher features on {t.device}; "
                         "move them to the same device.")
    dtype = torch.promote_types(s.dtype, t.dtype)
    s, t = s.to(dtype), t.to(dtype)
    if p == 2:
        # The three Gram terms are O(N²) and cancel down to the (small) loss, so fp32
        # loses most digits when student and teacher are close (measured: 30 % error at
        # noise 1e-3, N=4096). The C x C products are cheap; accumulate them in fp64
        # where the device has it.
        wide = torch.float32 if s.device.type == "mps" else torch.float64
        gram: Tensor = _GramL2.apply(s, t, torch.promote_types(dtype, wide))
        return gram
    if block_size is None:
        block_size = _default_block_size(s.shape[0], s.shape[2])
    elif isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1:
        raise ValueError(f"block_size={block_size!r} is not a positive integer; pass e.g. 256 "
                         "or None for the default.")
    out: Tensor = _BlockedL1.apply(s, t, block_size)
    return out
