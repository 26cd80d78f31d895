r"""The adapter methods: LoRA, DoRA, LoHa and LoKr as weight-space updates of one layer.

Every method here turns a base weight ``W`` and a few trainable factors into an *effective
weight* ``W'`` of the same shape. The layer runs one convolution (or linear map) with ``W'``
through its own settings, and merging writes the same ``W'`` (the same function,
[`effective_weight`][convlora.methods.effective_weight], computes it), so merged and unmerged
outputs agree for every setting the layer accepts: padding modes, dilation, groups, stride,
transposed convolutions. This module holds the methods' registry and dispatch: their names,
their factors' names and shapes, which layers each one takes, initialisation, and the choice of
how ``W'`` is built. Each method's own math lives in a module of its own: [convlora.functional][]
(LoRA), [convlora.dora][], [convlora.loha][] and [convlora.lokr][], with the Tucker product of
LoHa and LoKr in [convlora.tucker][].

Notation: ``W`` is viewed as a matrix with ``rows = W.shape[0]`` and ``cols = prod(W.shape[1:])``
(for ``Conv`` the output channels by ``in/groups * kernel``; for ``ConvTranspose``, whose weight
is ``(in, out/groups, *kernel)``, the input channels by ``out/groups * kernel``; for ``Linear``
``out`` by ``in``). ``s`` is the scale: ``alpha / rank``, or ``alpha / sqrt(rank)`` with rsLoRA.

* ``"lora"``: ``W' = W + s * reshape(B @ A)`` in one of the two factorisations of
  [convlora.functional][] (``A``: ``lora_A``, ``B``: ``lora_B``).
* ``"dora"`` (Liu et al. 2024, as PEFT implements it): ``V = W + s * reshape(B @ A)`` and
  ``W' = m * V / ||V||`` with the L2 norm (detached) taken per *output channel* and a trainable
  magnitude ``m`` (``lora_magnitude``, one value per output channel) started at ``||W||``; see
  [convlora.dora][].
* ``"loha"`` (LyCORIS/PEFT LoHa, flattened form): ``delta = s * (W1a @ W1b) * (W2a @ W2b)``
  (Hadamard product) reshaped to ``W.shape``, with ``W1a, W2a: rows x rank`` and
  ``W1b, W2b: rank x cols`` (``hada_w1_a`` ... ``hada_w2_b``); ``W' = W + delta``.
  Init as PEFT: ``W2b = 0``, the others Kaiming-uniform. See [convlora.loha][].
* ``"lokr"`` (LyCORIS/PEFT LoKr): ``delta = s * kron(W1, W2)`` reshaped to ``W.shape`` with
  ``W1: a x c`` (``lokr_w1``) and ``W2: b x (d * prod(kernel))`` for ``rows = a*b`` and
  ``W.shape[1] = c*d`` split into their most balanced factors; ``W2`` is either full
  (``lokr_w2``, stored ``(b, d, *kernel)``) when ``rank >= max(b, d) / 2``, or low-rank
  ``W2 = W2a @ W2b`` (``lokr_w2_a: b x rank``, ``lokr_w2_b: rank x (d * prod(kernel))``), PEFT's
  rule. Init as PEFT: ``W1 = 0``, ``W2`` (or its factors) Kaiming-uniform. See [convlora.lokr][].

**Tucker form** (``tucker=True``; PEFT's ``use_effective_conv2d``, LyCORIS's CP/Tucker
decomposition) of LoHa and LoKr, on a convolution weight ``(rows, ch, *kernel)`` whose kernel
has more than one tap (see [tucker_applies][convlora.methods.tucker_applies]): a low-rank
product is the [Tucker product][convlora.tucker] ``tucker(T, U, V)`` of a core
``T: rank x rank x kernel`` and two factors ``U: rank x rows``, ``V: rank x ch``.

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
delta exactly zero, and DoRA's fresh ``m / ||V||`` is 1 (exactly for float32/float64 weights;
within the magnitude's rounding for fp16/bf16, see [convlora.dora][]).

All arithmetic runs in [`compute_dtype`][convlora.functional.compute_dtype] (at least float32,
float64 stays float64), with autocast off (the layer's convolution still autocasts ``W'`` inside
an autocast region, so merged and unmerged agree there too), and ``W'`` is cast to the weight's
dtype once.

How ``W'`` is computed (the same math, arranged to touch the weight-sized tensors as few times as
possible, since that traffic is what a weight-space method adds to a training step): LoRA by one
``addmm`` ([convlora.functional][]); LoHa with ``rank <= 8`` by one ``addmm`` of its Khatri-Rao
factors ([convlora.loha][]); LoKr by one broadcasting ``addcmul`` with a backward of its own
([convlora.lokr][]); DoRA by one autograd function that allocates one weight-sized tensor and
whose backward reads the weight gradient three times ([convlora.dora][]). Tucker LoHa runs
LoHa's Khatri-Rao path on the cores contracted with their ``W*b``; Tucker LoKr rebuilds ``W2``
and runs LoKr's path.

While training, large ``Conv1d/2d/3d`` layers with LoRA, DoRA, LoHa (rank <= 8) or LoKr
(``groups=1``), flattened or Tucker, skip all of these backward passes: [convlora.lowrank_conv][] runs the same ``W'`` forward with a backward
in activation space that never forms the weight gradient ``G``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
from torch import Tensor, nn

from ._autocast import no_autocast
from .dora import channel_norm, dora_weight_autograd
from .functional import compute_dtype, lora_shapes, max_rank, merged_weight
from .loha import LOHA_KHATRI_RAO_MAX_RANK, loha_khatri_rao, loha_product, loha_rank
from .lokr import lokr_dims, lokr_w2, lokr_weight_autograd

__all__ = [
    "FACTOR_NAMES",
    "METHODS",
    "effective_weight",
    "factor_shapes",
    "init_factors_",
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
    return method == "loha" or not lokr_dims(shape, rank)[4]


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
        a, b, c, d, _ = lokr_dims(shape, rank)
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
        a, b, c, d, full = lokr_dims(shape, rank)
        kernel = shape[2:]
        if full:
            return {"lokr_w1": (a, c), "lokr_w2": (b, d, *kernel)}
        return {"lokr_w1": (a, c), "lokr_w2_a": (b, rank), "lokr_w2_b": (rank, d * math.prod(kernel))}
    raise ValueError(f"unknown method {method!r}; choose one of {METHODS}")


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
    with no_autocast(next(iter(factors.values()))):
        return _method_delta(method, factors, weight_shape, scale)


def _method_delta(method: str, factors: Mapping[str, Tensor], weight_shape: tuple[int, ...] | torch.Size,
                  scale: float) -> Tensor:
    shape = tuple(weight_shape)
    dtype = compute_dtype(*factors.values())
    f = {k: v.to(dtype) for k, v in factors.items()}
    if method == "lora":
        return (f["lora_B"] @ f["lora_A"] * scale).reshape(shape)
    if method == "loha":
        return (loha_product(f) * scale).reshape(shape)
    if method == "lokr":
        return (torch.kron(f["lokr_w1"], lokr_w2(f)) * scale).reshape(shape)
    raise ValueError(f"method {method!r} has no additive delta; choose one of ('lora', 'loha', 'lokr')")


def effective_weight(method: str, weight: Tensor, factors: Mapping[str, Tensor], scale: float,
                     groups: int = 1, transposed: bool = False) -> Tensor:
    """The weight the layer runs with (and merge writes): computed in the compute dtype, cast to ``weight``'s.

    The unmerged forward, [merge][convlora.merge] and
    [merge_state_dict][convlora.state_dict.merge_state_dict] all call this function, so they
    agree bit for bit. It runs with autocast off (inside an autocast region the layer's
    convolution still autocasts ``W'``), so an unmerged forward under autocast computes the same
    ``W'`` as a merge outside it.
    """
    with no_autocast(weight):
        return _effective_weight(method, weight, factors, scale, groups, transposed)


def _effective_weight(method: str, weight: Tensor, factors: Mapping[str, Tensor], scale: float,
                      groups: int, transposed: bool) -> Tensor:
    if method == "lora":
        return merged_weight(weight, factors["lora_A"], factors["lora_B"], scale)
    dtype = compute_dtype(weight, *factors.values())
    f = {k: v.to(dtype) for k, v in factors.items()}
    w = weight.to(dtype)
    if method == "loha" and loha_rank(f) <= LOHA_KHATRI_RAO_MAX_RANK:
        kra, krb = loha_khatri_rao(f)
        out = torch.addmm(w.reshape(kra.shape[0], krb.shape[1]), kra, krb, alpha=scale)
        return out.view(weight.shape).to(weight.dtype)
    if method == "lokr":
        w1, w2 = f["lokr_w1"], lokr_w2(f)
        (a1, c1), (b2, d2) = w1.shape, w2.shape
        out = lokr_weight_autograd(w.reshape(a1, b2, c1, d2), w1, w2, scale)
        return out.view(weight.shape).to(weight.dtype)
    if method == "dora":
        a, b = f["lora_A"], f["lora_B"]
        flat = w.reshape(b.shape[0], a.shape[1])
        # W' saved for backward only where the conv keeps the very same tensor (no cast after) and
        # on CPU (its zero-ratio check reads a flag back, a synchronisation on an accelerator),
        # and not under torch.compile
        keep = (weight.dtype == dtype and weight.device.type == "cpu"
                and not torch.compiler.is_compiling())  # the check is data-dependent: no graph
        out = dora_weight_autograd(flat, a, b, f["lora_magnitude"], scale, tuple(weight.shape),
                                   groups, transposed, keep)
        return out.to(weight.dtype)
    return (w + method_delta(method, factors, weight.shape, scale)).to(weight.dtype)
