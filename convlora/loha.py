r"""LoHa's Hadamard product (LyCORIS/PEFT LoHa): ``W' = W + s * (W1a @ W1b) * (W2a @ W2b)``.

In the flattened form the Hadamard product of two low-rank products is reshaped to ``W.shape``,
with ``W1a, W2a: rows x rank`` and ``W1b, W2b: rank x cols`` (``hada_w1_a`` ... ``hada_w2_b``).
In the Tucker form each product is a [Tucker product][convlora.tucker],
``delta = s * tucker(T1, W1a, W1b) * tucker(T2, W2a, W2b)`` with cores ``hada_t1``, ``hada_t2``
(``rank x rank x kernel``), ``hada_w1_a``, ``hada_w2_a`` (``rank x rows``) and ``hada_w1_b``,
``hada_w2_b`` (``rank x ch``). A fresh adapter has ``W2b = 0``, so the delta is exactly zero.
[`loha_product`][convlora.loha.loha_product] forms the product as it reads.

How ``W'`` is computed for ``rank <= 8``
([`LOHA_KHATRI_RAO_MAX_RANK`][convlora.loha.LOHA_KHATRI_RAO_MAX_RANK]): the Khatri-Rao identity
``(W1a @ W1b) * (W2a @ W2b) = KRa @ KRb`` with ``KRa[i, (p, q)] = W1a[i, p] * W2a[i, q]`` and
``KRb[(p, q), j] = W1b[p, j] * W2b[q, j]`` ([`loha_khatri_rao`][convlora.loha.loha_khatri_rao])
lets one ``addmm`` of inner size ``rank**2`` build ``W'`` (a LoRA of rank ``rank**2`` whose
factors are built from the small LoHa factors), and its backward reads the weight gradient twice
instead of materialising the two products. The Tucker form contracts each core with its ``W*b``
first (``C: rank x cols``, small), so each product is ``W*a^T @ C``, and runs the same
Khatri-Rao ``addmm`` on ``(W1a^T, C1, W2a^T, C2)``.
"""

from __future__ import annotations

from collections.abc import Mapping

from torch import Tensor

from .tucker import tucker_cols, tucker_product

__all__ = ["LOHA_KHATRI_RAO_MAX_RANK", "loha_khatri_rao", "loha_product", "loha_rank"]

LOHA_KHATRI_RAO_MAX_RANK = 8
"""LoHa ranks up to this one build ``W'`` as one product of inner size ``rank**2``."""


def loha_rank(factors: Mapping[str, Tensor]) -> int:
    """The rank of a LoHa adapter, in either form.

    Args:
        factors: The adapter's factors by name.

    Returns:
        The rank.
    """
    return int(factors["hada_t1"].shape[0] if "hada_t1" in factors else factors["hada_w1_a"].shape[1])


def loha_khatri_rao(factors: Mapping[str, Tensor]) -> tuple[Tensor, Tensor]:
    """``(KRa, KRb)`` with ``(W1a @ W1b) * (W2a @ W2b) = KRa @ KRb`` (inner size ``rank**2``).

    ``KRa[i, (p, q)] = W1a[i, p] * W2a[i, q]`` and ``KRb[(p, q), j] = W1b[p, j] * W2b[q, j]``;
    built from the small factors with autograd, so gradients reach them through the product.
    In the Tucker form each product is ``W*a^T @ C*`` with ``C*`` the core with ``W*b``
    contracted in (``rank x cols``, small), and those four matrices take the places of
    ``W1a, W1b, W2a, W2b``.

    Args:
        factors: The adapter's factors by name, flattened or Tucker form.

    Returns:
        ``(KRa, KRb)``: ``rows x rank**2`` and ``rank**2 x cols``.
    """
    if "hada_t1" in factors:
        w1a, w2a = factors["hada_w1_a"].T, factors["hada_w2_a"].T
        w1b = tucker_cols(factors["hada_t1"], factors["hada_w1_b"])
        w2b = tucker_cols(factors["hada_t2"], factors["hada_w2_b"])
    else:
        w1a, w1b = factors["hada_w1_a"], factors["hada_w1_b"]
        w2a, w2b = factors["hada_w2_a"], factors["hada_w2_b"]
    kra = (w1a[:, :, None] * w2a[:, None, :]).reshape(w1a.shape[0], -1)
    krb = (w1b[:, None, :] * w2b[None, :, :]).reshape(-1, w1b.shape[1])
    return kra, krb


def loha_product(factors: Mapping[str, Tensor]) -> Tensor:
    """The Hadamard product ``(W1a @ W1b) * (W2a @ W2b)``, or of the two Tucker products.

    Formed as written, with autograd: the delta without its scale. (The layer's ``W'`` comes from
    [`loha_khatri_rao`][convlora.loha.loha_khatri_rao] up to
    [`LOHA_KHATRI_RAO_MAX_RANK`][convlora.loha.LOHA_KHATRI_RAO_MAX_RANK], from this product above.)

    Args:
        factors: The adapter's factors by name, flattened or Tucker form.

    Returns:
        ``rows x cols`` in the flattened form, ``(rows, ch, *kernel)`` in the Tucker form.
    """
    if "hada_t1" in factors:
        return (tucker_product(factors["hada_t1"], factors["hada_w1_a"], factors["hada_w1_b"])
                * tucker_product(factors["hada_t2"], factors["hada_w2_a"], factors["hada_w2_b"]))
    return (factors["hada_w1_a"] @ factors["hada_w1_b"]) * (factors["hada_w2_a"] @ factors["hada_w2_b"])
