"""Spatial-affinity distillation loss (FAKD), exact and without N x N matrices.

``F̂`` is a ``(C, H, W)`` map flattened to ``C x N`` with unit-norm columns
(``f̂_i = f_i / (||f_i|| + eps)``); its affinity ``A = F̂ᵀF̂`` is ``N x N`` and
independent of ``C``. The loss is the mean of ``|A_s - A_t|^p`` over ``B·N·N``.
``p=1`` runs in row blocks inside a custom autograd function (memory
``O(B·N·block)``), ``p=2`` through the Gram identity (only ``C x C`` matrices);
both kernels live in the private ``_affinity_kernels`` module.
Both equal the naive formula; ``pool`` is the only approximation. The math is
in ``docs/distillation.md``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from ._affinity_kernels import BlockedL1, GramL2, exact_fp32

__all__ = ["affinity_loss", "spatial_affinity"]

_EPS = 1e-7  # same constant as the FAKD reference code
_BLOCK_BYTES = 64 * 2**20  # target size of one (B, block, N) fp32 block


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
        Memory is ``B·N²`` floats: use [`affinity_loss`][convlora.distill.affinity_loss] for losses.
    """
    x = _prepare(feat, pool, eps, "feat")
    with exact_fp32(x.device):
        return torch.bmm(x.transpose(1, 2), x)


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
        gram: Tensor = GramL2.apply(s, t, torch.promote_types(dtype, wide))
        return gram
    if block_size is None:
        block_size = _default_block_size(s.shape[0], s.shape[2])
    elif isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1:
        raise ValueError(f"block_size={block_size!r} is not a positive integer; pass e.g. 256 "
                         "or None for the default.")
    out: Tensor = BlockedL1.apply(s, t, block_size)
    return out
