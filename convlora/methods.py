r"""The adapter methods: LoRA, DoRA, LoHa and LoKr as weight-space updates of one layer.

Every method here turns a base weight ``W`` and a few trainable factors into an *effective
weight* ``W'`` of the same shape. The layer runs one convolution (or linear map) with ``W'``
through its own settings, and merging writes the same ``W'`` (the same function computes it), so
merged and unmerged outputs agree for every setting the layer accepts: padding modes, dilation,
groups, stride, transposed convolutions.

Notation: ``W`` is viewed as a matrix with ``rows = W.shape[0]`` and ``cols = prod(W.shape[1:])``
(for ``Conv`` the output channels by ``in/groups * kernel``; for ``ConvTranspose``, whose weight
is ``(in, out/groups, *kernel)``, the input channels by ``out/groups * kernel``; for ``Linear``
``out`` by ``in``). ``s`` is the scale: ``alpha / rank``, or ``alpha / sqrt(rank)`` with rsLoRA.

* ``"lora"``: ``W' = W + s * reshape(B @ A)`` in one of the two factorisations of
  [convlora.functional][] (``A``: ``lora_A``, ``B``: ``lora_B``).
* ``"dora"`` (Liu et al. 2024, as PEFT implements it): ``V = W + s * reshape(B @ A)`` and
  ``W' = m * V / ||V||`` with the L2 norm taken per *output channel* and a trainable magnitude
  ``m`` (``lora_magnitude``, one value per output channel) started at ``||W||``. The norm is
  detached (treated as a constant in backward), as in the paper and PEFT. Output channel ``o``
  of a ``Conv``/``Linear`` weight is ``W[o]``; of a ``ConvTranspose`` weight with ``g`` groups
  it is ``W[j*in/g:(j+1)*in/g, o % (out/g)]`` with ``j = o // (out/g)`` -- the slice along
  axis 1 within its group. A channel whose ``V`` is all zero has norm 0: its effective weight
  is zero (the division uses 1 in place of 0 there, never producing NaN or inf); a channel
  that is zero in the base starts with ``m = 0`` and stays zero.
* ``"loha"`` (LyCORIS/PEFT LoHa, flattened form): ``delta = s * (W1a @ W1b) * (W2a @ W2b)``
  (Hadamard product) reshaped to ``W.shape``, with ``W1a, W2a: rows x rank`` and
  ``W1b, W2b: rank x cols`` (``hada_w1_a`` ... ``hada_w2_b``); ``W' = W + delta``.
  Init as PEFT: ``W2b = 0``, the others Kaiming-uniform.
* ``"lokr"`` (LyCORIS/PEFT LoKr): ``rows = a*b`` and ``W.shape[1] = c*d`` are split into the two
  most balanced factors (``a <= b``, ``c <= d``, as PEFT's ``factorization(n, -1)``);
  ``delta = s * kron(W1, W2)`` reshaped to ``W.shape`` with ``W1: a x c`` (``lokr_w1``) and
  ``W2: b x (d * prod(kernel))``, which is either full (``lokr_w2``, stored ``(b, d, *kernel)``)
  when ``rank >= max(b, d) / 2``, or low-rank ``W2 = W2a @ W2b`` (``lokr_w2_a: b x rank``,
  ``lokr_w2_b: rank x (d * prod(kernel))``), PEFT's rule. Init as PEFT: ``W1 = 0``, ``W2``
  (or its factors) Kaiming-uniform.

**Tucker form** (``tucker=True``; PEFT's ``use_effective_conv2d``, LyCORIS's CP/Tucker
decomposition) of LoHa and LoKr, on a convolution weight ``(rows, ch, *kernel)`` whose kernel
has more than one tap (see [tucker_applies][convlora.methods.tucker_applies]): a low-rank
product is built as ``tucker(T, U, V)[p, q, k] = sum_{i, j} T[i, j, k] * U[i, p] * V[j, q]``
with a core ``T: rank x rank x kernel`` and two factors ``U: rank x rows``, ``V: rank x ch``
(``k`` runs over the kernel taps). So the kernel gets its own small factor, where the flattened
form spends ``rank * ch * prod(kernel)`` parameters on the ``cols`` axis.

* ``"loha"``: ``delta = s * tucker(T1, W1a, W1b) * tucker(T2, W2a, W2b)``, factors
  ``hada_t1``, ``hada_t2`` (``rank x rank x kernel``), ``hada_w1_a``, ``hada_w2_a``
  (``rank x rows``), ``hada_w1_b``, ``hada_w2_b`` (``rank x ch``). Init as PEFT: ``W2b = 0``,
  the others Kaiming-uniform.
* ``"lokr"``, where ``W2`` is low-rank: ``W2 = tucker(T2, W2a, W2b)`` of shape
  ``(b, d, *kernel)`` with ``lokr_t2: rank x rank x kernel``, ``lokr_w2_a: rank x b``,
  ``lokr_w2_b: rank x d``; where ``W2`` is full the option changes nothing, as in PEFT.

The layouts are PEFT's, except that PEFT stores a ``Conv1d`` core as ``rank x rank x k x 1``
(convlora: ``rank x rank x k``) and has no ``Conv3d``/``ConvTranspose`` LoHa/LoKr. On a
``ConvTranspose`` weight ``(in, out/groups, *kernel)`` the same formula runs over its axes 0
and 1.

A fresh adapter leaves the output unchanged: ``B = 0``, ``W2b = 0`` and ``W1 = 0`` make the
delta exactly zero. For DoRA, ``m = ||W||`` and ``||V|| = ||W||`` are computed by the same
function on the same tensor, so ``m / ||V|| = 1`` exactly and ``W' = W`` bit for bit when the
magnitude is stored in the compute dtype's precision (float32/float64 weights). For fp16/bf16
weights the magnitude is stored in the weight's dtype, so ``m / ||V||`` is 1 within that
rounding (relative ``2**-11`` / ``2**-8``) and ``W'`` may differ from ``W`` by one unit in the last
place of some entries.

All arithmetic runs in [`compute_dtype`][convlora.functional.compute_dtype] (at least float32,
float64 stays float64), with autocast off (the layer's convolution still autocasts ``W'`` inside
an autocast region, so merged and unmerged agree there too), and ``W'`` is cast to the weight's
dtype once.

How ``W'`` is computed (the same math, arranged to touch the weight-sized tensors as few times as
possible, since that traffic is what a weight-space method adds to a training step):

* LoHa with ``rank <= 8`` uses the Khatri-Rao identity
  ``(W1a @ W1b) * (W2a @ W2b) = KRa @ KRb`` with ``KRa[i, (p, q)] = W1a[i, p] * W2a[i, q]`` and
  ``KRb[(p, q), j] = W1b[p, j] * W2b[q, j]``: one ``addmm`` of inner size ``rank**2`` builds ``W'``
  (a LoRA of rank ``rank**2`` whose factors are built from the small LoHa factors), and its
  backward reads the weight gradient twice instead of materialising the two products.
* Tucker LoHa contracts each core with its ``W*b`` first (``C: rank x cols``, small), so each
  product is ``W*a^T @ C``; for ``rank <= 8`` it then runs the Khatri-Rao ``addmm`` above on
  ``(W1a^T, C1, W2a^T, C2)``. Tucker LoKr rebuilds ``W2`` (``W2a^T @ C``) and then runs LoKr's
  path below.
* LoKr adds ``s * W1[i, l] * W2[j, m]`` to ``W`` viewed as ``(a, b, c, d * prod(kernel))`` in one
  broadcasting ``addcmul``, without materialising the Kronecker product; its backward reads the
  weight gradient twice (``dW1`` in cache-sized blocks, ``dW2`` as one batched product) instead of
  forming two weight-sized products as autograd of the ``addcmul`` would.
* DoRA runs one autograd function. Its forward allocates one weight-sized tensor: ``V`` from one
  ``addmm``, rescaled in place into ``W'`` after the norm; for backward it keeps ``W`` and, on
  CPU with float32/float64 weights, ``W'`` itself (the very tensor the convolution keeps, so no
  extra memory). On ``Conv``/``Linear`` with ``"kernel"`` factors its backward forms the factor
  gradients as ``s * diag(m / ||V||) @ (G @ A^T)`` and ``s * (diag(m / ||V||) @ B)^T @ G`` and the
  magnitude's as ``<G, V> / ||V|| = <G, W'> / (r * ||V||)`` row by row with ``r = m / ||V||``
  (``W'`` was just read by the convolution's backward, so it is still in cache where ``W`` is
  not; rows with ``r = 0`` use
  ``(<G, W> + s * <G @ A^T, B>) / ||V||``): three reads of the weight gradient ``G``, nothing
  weight-sized allocated. (A fresh weight-sized allocation costs as much as several passes over
  warm memory on CPU, so the count of those is what this minimises.)

While training, large ``Conv1d/2d/3d`` layers with LoRA, DoRA, LoHa (rank <= 8) or LoKr
(``groups=1``), flattened or Tucker, skip all of these backward passes: [convlora.lowrank_conv][] runs the same ``W'`` forward with a backward
in activation space that never forms the weight gradient ``G``.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

from .functional import compute_dtype, lora_shapes, max_rank, merged_weight

__all__ = [
    "FACTOR_NAMES",
    "METHODS",
    "channel_norm",
    "dora_weight",
    "effective_weight",
    "factor_shapes",
    "init_factors_",
    "kron_split",
    "loha_khatri_rao",
    "lokr_w2",
    "lokr_weight",
    "LOHA_KHATRI_RAO_MAX_RANK",
    "method_delta",
    "method_problem",
    "output_channels",
    "scale_for",
    "tucker_applies",
]

METHODS: tuple[str, ...] = ("lora", "dora", "loha", "lokr")
FACTOR_NAMES: tuple[str, ...] = ("lora_A", "lora_B", "lora_magnitude", "hada_w1_a", "hada_w1_b",
                                 "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2", "lokr_w1",
                                 "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2")
"""Every factor name any method uses: the ``<layer>.<factor>.<adapter>`` state-dict keys."""


def scale_for(alpha: float, rank: int, rslora: bool = False) -> float:
    """``alpha / rank``, or ``alpha / sqrt(rank)`` with rsLoRA (Kalajdzievski 2023)."""
    return alpha / math.sqrt(rank) if rslora else alpha / rank


def kron_split(n: int) -> tuple[int, int]:
    """``(m, n // m)`` with ``m`` the largest divisor of ``n`` not above ``sqrt(n)``."""
    m = max(d for d in range(1, math.isqrt(n) + 1) if n % d == 0)
    return m, n // m


def output_channels(weight_shape: tuple[int, ...], groups: int, transposed: bool) -> int:
    """Number of output channels of a layer with this weight."""
    return weight_shape[1] * groups if transposed else weight_shape[0]


def tucker_applies(method: str, weight_shape: tuple[int, ...], rank: int) -> bool:
    """Whether the Tucker form changes the factors of this adapter (else ``tucker`` is ignored).

    True for ``"loha"`` and ``"lokr"`` on a convolution weight (``Conv`` or ``ConvTranspose``,
    1-3 spatial dims) whose kernel has more than one tap, except a ``"lokr"`` whose ``W2`` is
    full (``rank >= max(b, d) / 2``). Where it is false -- ``"lora"``/``"dora"``, ``Linear``,
    ``1x1`` kernels, a full LoKr ``W2`` -- PEFT's ``use_effective_conv2d`` is ignored too.
    """
    shape = tuple(int(s) for s in weight_shape)
    if method not in ("loha", "lokr") or len(shape) < 3 or math.prod(shape[2:]) <= 1:
        return False
    return method == "loha" or not _lokr_dims(shape, rank)[4]


def method_problem(method: str, factorization: str, weight_shape: tuple[int, ...], groups: int,
                   rank: int, tucker: bool = False) -> str | None:
    """Why ``method`` cannot go on a layer with this weight, or ``None`` when it can."""
    if method not in METHODS:
        return f"unknown method {method!r}; choose one of {METHODS}"
    if tucker and not tucker_applies(method, weight_shape, rank):
        return (f"tucker=True does not apply to method {method!r} with rank {rank} on this weight (only 'loha'/'lokr' on a conv kernel with more than one tap, "
                "and a low-rank LoKr W2); use tucker=False")
    if method in ("loha", "lokr") and factorization != "kernel":
        return (f"method {method!r} has its own factor layout; use factorization='kernel' "
                f"(got {factorization!r})")
    if method == "loha":
        limit = max_rank("kernel", weight_shape, groups)
        if rank > limit:
            return (f"rank {rank} is larger than this layer allows ({limit} for 'loha' on weight "
                    f"{weight_shape}); use rank <= {limit}")
    return None


def _lokr_dims(weight_shape: tuple[int, ...], rank: int) -> tuple[int, int, int, int, bool]:
    a, b = kron_split(weight_shape[0])
    c, d = kron_split(weight_shape[1])
    return a, b, c, d, rank >= max(b, d) / 2


def factor_shapes(method: str, factorization: str, weight_shape: tuple[int, ...], rank: int,
                  groups: int = 1, transposed: bool = False,
                  tucker: bool = False) -> dict[str, tuple[int, ...]]:
    """Names and shapes of the factors of one adapter, in creation order.

    ``tucker=True`` gives the Tucker form's factors; it must apply
    ([tucker_applies][convlora.methods.tucker_applies]).
    """
    shape = tuple(int(s) for s in weight_shape)
    if tucker:
        if not tucker_applies(method, shape, rank):
            raise ValueError(f"the Tucker form does not apply to {method!r} on weight {shape}, rank {rank}")
        kernel = shape[2:]
        if method == "loha":
            return {"hada_t1": (rank, rank, *kernel), "hada_w1_a": (rank, shape[0]),
                    "hada_w1_b": (rank, shape[1]), "hada_t2": (rank, rank, *kernel),
                    "hada_w2_a": (rank, shape[0]), "hada_w2_b": (rank, shape[1])}
        a, b, c, d, _ = _lokr_dims(shape, rank)
        return {"lokr_w1": (a, c), "lokr_t2": (rank, rank, *kernel), "lokr_w2_a": (rank, b),
                "lokr_w2_b": (rank, d)}
    if method in ("lora", "dora"):
        sa, sb = lora_shapes(factorization, shape, rank, groups)
        out: dict[str, tuple[int, ...]] = {"lora_A": sa, "lora_B": sb}
        if method == "dora":
            out["lora_magnitude"] = (output_channels(shape, groups, transposed),)
        return out
    rows, cols = shape[0], math.prod(shape[1:])
    if method == "loha":
        return {"hada_w1_a": (rows, rank), "hada_w1_b": (rank, cols),
                "hada_w2_a": (rows, rank), "hada_w2_b": (rank, cols)}
    if method == "lokr":
        a, b, c, d, full = _lokr_dims(shape, rank)
        kernel = shape[2:]
        if full:
            return {"lokr_w1": (a, c), "lokr_w2": (b, d, *kernel)}
        return {"lokr_w1": (a, c), "lokr_w2_a": (b, rank), "lokr_w2_b": (rank, d * math.prod(kernel))}
    raise ValueError(f"unknown method {method!r}; choose one of {METHODS}")


def _grouped_view(v: Tensor, groups: int, transposed: bool) -> Tensor:
    """``v`` viewed so that axis 1 (after the group axis 0) indexes output channels.

    Conv/Linear: ``(1, out, rest)``. ConvTranspose: ``(g, in/g, out/g, rest)`` -- the norm then
    runs over axes 1 and 3.
    """
    if transposed:
        return v.reshape(groups, v.shape[0] // groups, v.shape[1], -1)
    return v.reshape(1, v.shape[0], -1)


def channel_norm(v: Tensor, groups: int = 1, transposed: bool = False) -> Tensor:
    """L2 norm of ``v`` per output channel, shape ``(out,)``, in ``v``'s dtype."""
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


def _no_autocast(t: Tensor) -> Any:
    """A context with autocast off for ``t``'s device (a no-op where autocast does not exist)."""
    device = t.device.type
    if torch.amp.is_autocast_available(device):
        return torch.autocast(device, enabled=False)
    return contextlib.nullcontext()


def dora_weight(w: Tensor, a: Tensor, b: Tensor, m: Tensor, scale: float, shape: tuple[int, ...],
                groups: int = 1, transposed: bool = False) -> tuple[Tensor, Tensor, Tensor]:
    """DoRA's ``(W', ||V||, m / ||V||)`` for ``V = W + s * B @ A``, without autograd.

    ``w`` is the base weight as the ``rows x cols`` matrix of ``B @ A`` and ``shape`` the
    weight's shape; the norm is per output channel, with 1 in place of a zero norm. One
    weight-sized tensor is allocated (``V``, rescaled in place into ``W'``). Every DoRA forward
    computes ``W'`` with this function, so they agree bit for bit.
    """
    v = torch.addmm(w, b, a, alpha=scale).view(shape)
    norm = channel_norm(v, groups, transposed)
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
        with _no_autocast(w):  # in the compute dtype, as every method (the layer's conv may autocast)
            out, norm, ratio = dora_weight(w, a, b, m, scale, shape, groups, transposed)
            ctx.keep_out = keep_out and not transposed and w.shape[0] == shape[0]
            ctx.save_for_backward(w, a, b, norm, ratio, *([out] if ctx.keep_out else []))
            ctx.scale, ctx.shape, ctx.groups, ctx.transposed = scale, shape, groups, transposed
            return out

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        with _no_autocast(grad):
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


def lokr_w2(factors: Mapping[str, Tensor]) -> Tensor:
    """LoKr's ``W2`` as a ``b x (d * prod(kernel))`` matrix (``W2a @ W2b`` when low-rank, the
    Tucker product of ``lokr_t2``, ``W2a``, ``W2b`` in the Tucker form), with autograd."""
    if "lokr_w2" in factors:
        w2 = factors["lokr_w2"]
    elif "lokr_t2" in factors:
        w2 = _tucker(factors["lokr_t2"], factors["lokr_w2_a"], factors["lokr_w2_b"])
    else:
        w2 = factors["lokr_w2_a"] @ factors["lokr_w2_b"]
    return w2.reshape(w2.shape[0], -1)


def lokr_weight(w: Tensor, w1: Tensor, w2: Tensor, scale: float) -> Tensor:
    """``W + s * kron(W1, W2)`` for ``W`` viewed as ``(a, b, c, D)``: one broadcasting ``addcmul``.

    Every LoKr forward computes ``W'`` with this function, so they agree bit for bit.
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
        with _no_autocast(grad):
            g = grad.to(w1.dtype).reshape(w1.shape[0], w2.shape[0], w1.shape[1], w2.shape[1])
            g1 = g2 = None
            if need_1:
                n = max(1, _LOKR_BLOCK_BYTES // max(1, g[0].numel() * g.element_size()))
                w2b = w2[None, :, None, :]
                g1 = torch.cat([(blk * w2b).sum((1, 3)) for blk in g.split(n)]).mul_(ctx.scale)
            if need_2:
                g2 = torch.matmul(w1[:, None, None, :], g).sum(0).squeeze(-2).mul_(ctx.scale)
        return (g if need_w else None), g1, g2, None


def _tucker_cols(t: Tensor, v: Tensor) -> Tensor:
    """``c[i, (q, k)] = sum_j t[i, j, k] * v[j, q]``: the core with ``v`` contracted in, ``(i, q * K)``.

    Small (``rank x ch * prod(kernel)``); ``u^T @ c`` is the Tucker product as a
    ``rows x cols`` matrix. Plain 2-D products (the same kernels whether or not the factors
    require grad, so a merge from a file computes what the layer computes).
    """
    r1, r2, taps = t.shape[0], t.shape[1], math.prod(t.shape[2:])
    c = t.reshape(r1, r2, taps).transpose(1, 2).reshape(r1 * taps, r2) @ v  # (i*K, q)
    return c.reshape(r1, taps, v.shape[1]).transpose(1, 2).reshape(r1, -1)


def _tucker(t: Tensor, u: Tensor, v: Tensor) -> Tensor:
    """``out[p, q, k] = sum_{i, j} t[i, j, k] * u[i, p] * v[j, q]``, shape ``(p, q, *kernel)``."""
    return (u.T @ _tucker_cols(t, v)).reshape(u.shape[1], v.shape[1], *t.shape[2:])


def init_factors_(method: str, factors: Mapping[str, Tensor], weight: Tensor, groups: int = 1,
                  transposed: bool = False) -> None:
    """Initialise fresh factors in place so that the adapter starts as the identity."""
    with torch.no_grad():
        for name, t in factors.items():
            if name in ("lora_B", "hada_w2_b", "lokr_w1"):
                nn.init.zeros_(t)
            elif name == "lora_magnitude":
                w = weight.to(compute_dtype(weight))
                t.copy_(channel_norm(w, groups, transposed))
            else:
                nn.init.kaiming_uniform_(t, a=math.sqrt(5))


def method_delta(method: str, factors: Mapping[str, Tensor], weight_shape: tuple[int, ...] | torch.Size,
                 scale: float) -> Tensor:
    """The additive delta ``W' - W`` of ``"lora"``, ``"loha"`` or ``"lokr"``, in the compute dtype.

    DoRA has no delta independent of ``W`` (it rescales ``W + delta``); use
    [`effective_weight`][convlora.methods.effective_weight]. Runs with autocast off, as
    [`effective_weight`][convlora.methods.effective_weight].
    """
    with _no_autocast(next(iter(factors.values()))):
        return _method_delta(method, factors, weight_shape, scale)


def _method_delta(method: str, factors: Mapping[str, Tensor], weight_shape: tuple[int, ...] | torch.Size,
                  scale: float) -> Tensor:
    shape = tuple(weight_shape)
    dtype = compute_dtype(*factors.values())
    f = {k: v.to(dtype) for k, v in factors.items()}
    if method == "lora":
        return (f["lora_B"] @ f["lora_A"] * scale).reshape(shape)
    if method == "loha" and "hada_t1" in f:
        h = (_tucker(f["hada_t1"], f["hada_w1_a"], f["hada_w1_b"])
             * _tucker(f["hada_t2"], f["hada_w2_a"], f["hada_w2_b"]))
        return (h * scale).reshape(shape)
    if method == "loha":
        h = (f["hada_w1_a"] @ f["hada_w1_b"]) * (f["hada_w2_a"] @ f["hada_w2_b"])
        return (h * scale).reshape(shape)
    if method == "lokr":
        return (torch.kron(f["lokr_w1"], lokr_w2(f)) * scale).reshape(shape)
    raise ValueError(f"method {method!r} has no additive delta; choose one of ('lora', 'loha', 'lokr')")


LOHA_KHATRI_RAO_MAX_RANK = 8
"""LoHa ranks up to this one build ``W'`` as one product of inner size ``rank**2``."""


def _loha_rank(factors: Mapping[str, Tensor]) -> int:
    return int(factors["hada_t1"].shape[0] if "hada_t1" in factors else factors["hada_w1_a"].shape[1])


def loha_khatri_rao(factors: Mapping[str, Tensor]) -> tuple[Tensor, Tensor]:
    """``(KRa, KRb)`` with ``(W1a @ W1b) * (W2a @ W2b) = KRa @ KRb`` (inner size ``rank**2``).

    ``KRa[i, (p, q)] = W1a[i, p] * W2a[i, q]`` and ``KRb[(p, q), j] = W1b[p, j] * W2b[q, j]``;
    built from the small factors with autograd, so gradients reach them through the product.
    In the Tucker form each product is ``W*a^T @ C*`` with ``C*`` the core with ``W*b``
    contracted in (``rank x cols``, small), and those four matrices take the places of
    ``W1a, W1b, W2a, W2b``.
    """
    if "hada_t1" in factors:
        w1a, w2a = factors["hada_w1_a"].T, factors["hada_w2_a"].T
        w1b = _tucker_cols(factors["hada_t1"], factors["hada_w1_b"])
        w2b = _tucker_cols(factors["hada_t2"], factors["hada_w2_b"])
    else:
        w1a, w1b = factors["hada_w1_a"], factors["hada_w1_b"]
        w2a, w2b = factors["hada_w2_a"], factors["hada_w2_b"]
    kra = (w1a[:, :, None] * w2a[:, None, :]).reshape(w1a.shape[0], -1)
    krb = (w1b[:, None, :] * w2b[None, :, :]).reshape(-1, w1b.shape[1])
    return kra, krb


def effective_weight(method: str, weight: Tensor, factors: Mapping[str, Tensor], scale: float,
                     groups: int = 1, transposed: bool = False) -> Tensor:
    """The weight the layer runs with (and merge writes): computed in the compute dtype, cast to ``weight``'s.

    The unmerged forward, [merge][convlora.merge] and
    [merge_state_dict][convlora.state_dict.merge_state_dict] all call this function, so they
    agree bit for bit. It runs with autocast off (inside an autocast region the layer's
    convolution still autocasts ``W'``), so an unmerged forward under autocast computes the same
    ``W'`` as a merge outside it.
    """
    with _no_autocast(weight):
        return _effective_weight(method, weight, factors, scale, groups, transposed)


def _effective_weight(method: str, weight: Tensor, factors: Mapping[str, Tensor], scale: float,
                      groups: int, transposed: bool) -> Tensor:
    if method == "lora":
        return merged_weight(weight, factors["lora_A"], factors["lora_B"], scale)
    dtype = compute_dtype(weight, *factors.values())
    f = {k: v.to(dtype) for k, v in factors.items()}
    w = weight.to(dtype)
    if method == "loha" and _loha_rank(f) <= LOHA_KHATRI_RAO_MAX_RANK:
        kra, krb = loha_khatri_rao(f)
        out = torch.addmm(w.reshape(kra.shape[0], krb.shape[1]), kra, krb, alpha=scale)
        return out.view(weight.shape).to(weight.dtype)
    if method == "lokr":
        w1, w2 = f["lokr_w1"], lokr_w2(f)
        (a1, c1), (b2, d2) = w1.shape, w2.shape
        out = _LoKrWeight.apply(w.reshape(a1, b2, c1, d2), w1, w2, scale)
        return out.view(weight.shape).to(weight.dtype)
    if method == "dora":
        a, b = f["lora_A"], f["lora_B"]
        flat = w.reshape(b.shape[0], a.shape[1])
        # W' saved for backward only where the conv keeps the very same tensor (no cast after) and
        # on CPU (its zero-ratio check reads a flag back, a synchronisation on an accelerator),
        # and not under torch.compile
        keep = (weight.dtype == dtype and weight.device.type == "cpu"
                and not torch.compiler.is_compiling())  # the check is data-dependent: no graph
        out = _DoRAWeight.apply(flat, a, b, f["lora_magnitude"], scale, tuple(weight.shape), groups,
                                transposed, keep)
        return out.to(weight.dtype)
    return (w + method_delta(method, factors, weight.shape, scale)).to(weight.dtype)
