"""Independent reference formulas of the adapter methods for the tests (not a test module).

Written from the papers' / PEFT's definitions with other tensor operations than
convlora's method modules use (einsum, permutes), so a test comparing the two checks the math.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


def out_major(w: Tensor, groups: int, transposed: bool) -> Tensor:
    """The weight as an ``(out_channels, -1)`` matrix, one row per output channel."""
    if not transposed:
        return w.reshape(w.shape[0], -1)
    cin, og = w.shape[0], w.shape[1]
    g = w.reshape(groups, cin // groups, og, -1).permute(0, 2, 1, 3)
    return g.reshape(groups * og, -1)


def from_out_major(m: Tensor, shape: tuple[int, ...], groups: int, transposed: bool) -> Tensor:
    if not transposed:
        return m.reshape(shape)
    cin, og = shape[0], shape[1]
    g = m.reshape(groups, og, cin // groups, -1).permute(0, 2, 1, 3)
    return g.reshape(shape)


def tucker_product(t: Tensor, u: Tensor, v: Tensor) -> Tensor:
    """``sum_{i, j} t[i, j, *k] u[i, p] v[j, q]`` -> ``(p, q, *k)``, by one einsum over flattened taps."""
    flat = torch.einsum("ijk,ip,jq->pqk", t.reshape(t.shape[0], t.shape[1], -1), u, v)
    return flat.reshape(u.shape[1], v.shape[1], *t.shape[2:])


def reference_weight(method: str, w: Tensor, f: dict[str, Tensor], scale: float, groups: int = 1,
                     transposed: bool = False, detach_norm: bool = False) -> Tensor:
    """``W'`` in float64 from the method's definition (DoRA's norm detached from autograd if asked)."""
    w = w.double()
    f = {k: v.double() for k, v in f.items()}
    shape = tuple(w.shape)
    if method in ("lora", "dora"):
        v = w + scale * torch.einsum("or,rc->oc", f["lora_B"], f["lora_A"]).reshape(shape)
        if method == "lora":
            return v
        rows = out_major(v, groups, transposed)
        norm = rows.pow(2).sum(dim=1).sqrt()
        norm = norm.detach() if detach_norm else norm
        return from_out_major(rows * (f["lora_magnitude"] / norm)[:, None], shape, groups, transposed)
    if method == "loha" and "hada_t1" in f:  # Tucker form: core r x r x kernel, factors r x rows / r x ch
        h = tucker_product(f["hada_t1"], f["hada_w1_a"], f["hada_w1_b"]) * tucker_product(
            f["hada_t2"], f["hada_w2_a"], f["hada_w2_b"])
        return w + scale * h.reshape(shape)
    if method == "loha":
        h = torch.einsum("or,rc->oc", f["hada_w1_a"], f["hada_w1_b"]) * torch.einsum(
            "or,rc->oc", f["hada_w2_a"], f["hada_w2_b"])
        return w + scale * h.reshape(shape)
    if method == "lokr":
        w1 = f["lokr_w1"]
        if "lokr_t2" in f:
            w2 = tucker_product(f["lokr_t2"], f["lokr_w2_a"], f["lokr_w2_b"])
            w2 = w2.reshape(w2.shape[0], -1)
        elif "lokr_w2" in f:
            w2 = f["lokr_w2"].reshape(f["lokr_w2"].shape[0], -1)
        else:
            w2 = f["lokr_w2_a"] @ f["lokr_w2_b"]
        a, c = w1.shape
        b, d = w2.shape
        kron = torch.einsum("il,jm->ijlm", w1, w2).reshape(a * b, c * d)
        return w + scale * kron.reshape(shape)
    raise ValueError(method)


def scale_of(alpha: float, rank: int, rslora: bool) -> float:
    return alpha / math.sqrt(rank) if rslora else alpha / rank
