"""spandrel's SPAN layout: every ``Conv3XC`` stored with both its train branch and its ``eval_conv``.

[spandrel](https://github.com/chaiNNer-org/spandrel) is the model loader behind chaiNNer and
ComfyUI. Its SPAN (0.4.2) detects the architecture by keys that only the train+eval layout has
(``conv_1.sk.weight`` next to ``block_1.c1_r.eval_conv.weight`` ...), loads strictly (each
``Conv3XC`` needs ``sk``, ``conv.0``, ``conv.1``, ``conv.2`` and ``eval_conv``, each with weight and
bias: 204 tensors for six blocks), reads width and scale from tensor shapes, hard-codes
``conv_cat`` as ``4·C -> C`` and, in eval mode, re-fuses ``eval_conv`` from the train branch on
every forward. The stored ``eval_conv`` is therefore never used: what spandrel runs is the
fusion of the train branch.

[`to_spandrel`][examples.span_sr.spandrel_format.to_spandrel] turns a deploy state dict (one 3x3
``eval_conv`` per ``Conv3XC``, the official checkpoints' layout) into that layout with a train
branch whose fusion *is* the deploy 3x3, exactly; [`from_spandrel`][examples.span_sr.spandrel_format.from_spandrel]
reads any train-branch layout back to the deploy form with
[`fuse_branch`][examples.span_sr.spandrel_format.fuse_branch], the one ``Conv3XC`` fusion (also
behind ``Conv3XC.reparameterize()``). Only torch is needed here: the module works on state dicts,
so the model code can import it.

The preimage of a deploy conv ``(W, b)`` with ``c_in`` inputs and ``c_out`` outputs:

* ``conv.0`` (1x1 expand to ``2·c_in``): identity onto the first ``c_in`` channels, zero bias;
* ``conv.1`` (valid 3x3, ``2·c_in -> 2·c_out``): ``W`` in the top-left block of zeros, ``b`` in the
  first ``c_out`` bias entries, zeros after;
* ``conv.2`` (1x1 reduce to ``c_out``): identity from the first ``c_out`` channels, zero bias;
* ``sk`` (1x1 skip): zero weight, zero bias.

The train forward pads ``x`` with zeros before the expand conv; with a zero expand bias the
padded taps stay zero, so the branch equals ``conv2d(x, W, b, padding=1)`` at the borders too.
The fusion (``W_f[o,i] = sum_{n,m} R[o,n] K[n,m] E[m,i] + S[o,i]·centre``,
``b_f[o] = sum_n R[o,n] (sum_{m,taps} K[n,m] b_E[m] + b_K[n]) + b_R[o] + b_S[o]``) then has one
product ``1·W`` per entry and otherwise adds exact zeros, so in any float format and any
summation order it gives ``W`` and ``b`` back bit for bit (a ``-0.0`` entry may come back as
``+0.0``, equal in value).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

import torch

import convlora

__all__ = [
    "CONV3XC_PREFIXES",
    "SUFFIXES",
    "from_spandrel",
    "fuse_branch",
    "is_spandrel_format",
    "save_spandrel",
    "to_spandrel",
]

SUFFIXES = (".safetensors", ".pth")
"""File types written by [`save_spandrel`][examples.span_sr.spandrel_format.save_spandrel] (both read by spandrel)."""

CONV3XC_PREFIXES: tuple[str, ...] = (
    "conv_1",
    *(f"block_{i}.c{j}_r" for i in range(1, 7) for j in (1, 2, 3)),
    "conv_2",
)
"""The ``Conv3XC`` layers of SPAN, in spandrel's module order."""

_BRANCH = ("sk", "conv.0", "conv.1", "conv.2")  # the train branch's convs, spandrel's key order
_PLAIN = ("conv_cat", "upsampler.0")  # plain convs, identical in every layout


def is_spandrel_format(state: Mapping[str, object]) -> bool:
    """Whether ``state`` stores train branches *and* ``eval_conv`` (the layout spandrel needs).

    Args:
        state: A flat SPAN state dict.

    Returns:
        True when ``conv_1`` has both ``sk.weight`` and ``eval_conv.weight``.
    """
    return "conv_1.sk.weight" in state and "conv_1.eval_conv.weight" in state


def _deploy_keys() -> list[str]:
    keys = [f"{p}.eval_conv.{t}" for p in CONV3XC_PREFIXES for t in ("weight", "bias")]
    return keys + [f"{p}.{t}" for p in _PLAIN for t in ("weight", "bias")]


def _check_deploy(state: Mapping[str, torch.Tensor]) -> int:
    """Refuse a state dict spandrel's SPAN cannot represent; return the width ``C``."""
    if "conv_1.sk.weight" in state:
        raise ValueError(
            "the state dict already has a train branch (conv_1.sk.weight); to_spandrel() takes "
            "the deploy form: load it with load_span(...) and pass model.state_dict()."
        )
    expected = _deploy_keys()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in set(expected)]
    if missing or unexpected:
        raise ValueError(
            f"not a deploy SPAN state dict: missing keys {missing[:6]}, unexpected keys "
            f"{unexpected[:6]} (spandrel loads exactly the 44 deploy keys of SPAN, turned into 204)."
        )
    first = state["conv_1.eval_conv.weight"]
    width, in_ch = int(first.shape[0]), int(first.shape[1])
    if in_ch != 3:
        raise ValueError(f"conv_1 takes {in_ch} input channels; spandrel's SPAN subtracts an RGB "
                         "mean, so it represents 3-channel models only.")
    cat = tuple(state["conv_cat.weight"].shape)
    if cat != (width, 4 * width, 1, 1):
        raise ValueError(
            f"conv_cat maps {cat[1]} -> {cat[0]} channels; spandrel's SPAN hard-codes conv_cat as "
            f"4·C -> C = {4 * width} -> {width} (C = {width}, the width of conv_1), so it cannot "
            "represent this model: use it with examples/span_sr (load_span) instead."
        )
    up = tuple(state["upsampler.0.weight"].shape)
    scale = round((up[0] / 3) ** 0.5)
    if up[1:] != (width, 3, 3) or 3 * scale * scale != up[0]:
        raise ValueError(f"upsampler.0.weight has shape {up}; spandrel's SPAN needs "
                         f"(3·scale², {width}, 3, 3).")
    for p in CONV3XC_PREFIXES:
        w, b = state[f"{p}.eval_conv.weight"], state[f"{p}.eval_conv.bias"]
        want = (width, in_ch if p == "conv_1" else width, 3, 3)
        if tuple(w.shape) != want or tuple(b.shape) != (width,):
            raise ValueError(f"{p}.eval_conv has weight {tuple(w.shape)} and bias "
                             f"{tuple(b.shape)}; a SPAN of width {width} has {want} and ({width},).")
        if not w.is_floating_point() or b.dtype != w.dtype:
            raise ValueError(f"{p}.eval_conv holds {w.dtype}/{b.dtype}; expected one float dtype.")
    return width


def _preimage(weight: torch.Tensor, bias: torch.Tensor) -> dict[str, torch.Tensor]:
    """The train branch of one ``Conv3XC`` whose fusion is exactly ``(weight, bias)``."""
    c_out, c_in = int(weight.shape[0]), int(weight.shape[1])

    def zeros(*size: int) -> torch.Tensor:
        return torch.zeros(size, dtype=weight.dtype, device=weight.device)

    def eye(n: int) -> torch.Tensor:
        return torch.eye(n, dtype=weight.dtype, device=weight.device)

    expand = zeros(2 * c_in, c_in, 1, 1)
    expand[:c_in, :, 0, 0] = eye(c_in)
    kernel = zeros(2 * c_out, 2 * c_in, 3, 3)
    kernel[:c_out, :c_in] = weight
    kernel_bias = zeros(2 * c_out)
    kernel_bias[:c_out] = bias
    reduce = zeros(c_out, 2 * c_out, 1, 1)
    reduce[:, :c_out, 0, 0] = eye(c_out)
    return {
        "sk.weight": zeros(c_out, c_in, 1, 1),
        "sk.bias": zeros(c_out),
        "conv.0.weight": expand,
        "conv.0.bias": zeros(2 * c_in),
        "conv.1.weight": kernel,
        "conv.1.bias": kernel_bias,
        "conv.2.weight": reduce,
        "conv.2.bias": zeros(c_out),
        "eval_conv.weight": weight.detach().clone(),
        "eval_conv.bias": bias.detach().clone(),
    }


def to_spandrel(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A deploy SPAN state dict in spandrel's train+eval layout, fusing back to it exactly.

    Every ``eval_conv`` gets the train branch described in the module docstring; ``conv_cat``
    and ``upsampler.0`` are copied. The result has the 204 keys spandrel's SPAN loads strictly,
    in its module order, in the input's dtype and device.

    Args:
        state: The deploy state dict (the 44 keys of the official checkpoints, e.g.
            ``load_span(path).state_dict()`` after ``reparameterize()``).

    Returns:
        A new state dict (fresh tensors; the input is not modified).

    Raises:
        ValueError: the keys are not those of a deploy SPAN, or spandrel's SPAN cannot
            represent the model (not 3 input channels, or ``conv_cat`` not ``4·C -> C``).
    """
    _check_deploy(state)
    out: dict[str, torch.Tensor] = {}
    for p in CONV3XC_PREFIXES:
        branch = _preimage(state[f"{p}.eval_conv.weight"], state[f"{p}.eval_conv.bias"])
        out.update({f"{p}.{k}": v for k, v in branch.items()})
        if p == "block_6.c3_r":  # spandrel's order: blocks, conv_cat, conv_2, upsampler
            out.update({f"conv_cat.{t}": state[f"conv_cat.{t}"].detach().clone()
                        for t in ("weight", "bias")})
    out.update({f"upsampler.0.{t}": state[f"upsampler.0.{t}"].detach().clone()
                for t in ("weight", "bias")})
    return out


def save_spandrel(state: Mapping[str, torch.Tensor], path: str | os.PathLike[str]) -> Path:
    """Write a deploy SPAN state dict in spandrel's layout: ``.safetensors``, or ``.pth`` by suffix.

    The file is written atomically by [convlora.save_state_dict][] (a ``.pth`` is a
    ``torch.save`` of plain tensors); nothing is written when the suffix or the model is refused.

    Args:
        state: The deploy state dict, as for [`to_spandrel`][examples.span_sr.spandrel_format.to_spandrel].
        path: The file to write.

    Returns:
        ``path`` as a ``Path``.

    Raises:
        ValueError: another suffix, or a model spandrel's SPAN cannot represent (see
            [`to_spandrel`][examples.span_sr.spandrel_format.to_spandrel]).
    """
    path = Path(path)
    if path.suffix.lower() not in SUFFIXES:
        raise ValueError(f"{str(path)!r}: a spandrel file ends in .safetensors or .pth, not {path.suffix!r}.")
    return convlora.save_state_dict(to_spandrel(state), path)


def fuse_branch(branch: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """The one 3x3 conv ``(weight, bias)`` that a ``Conv3XC`` train branch computes, in float64.

    With ``y = R(K(E(pad(x)))) + S(x)``, where ``E`` (``conv.0``), ``R`` (``conv.2``) and ``S``
    (``sk``) are 1x1 convs and ``K`` (``conv.1``) a valid 3x3 conv, every step is affine, so the
    branch is one 3x3 conv on the zero-padded ``x``:
    ``W[o,i] = sum_{n,m} R[o,n] K[n,m] E[m,i] + S[o,i]·centre`` and
    ``b[o] = sum_n R[o,n] (sum_{m,taps} K[n,m] b_E[m] + b_K[n]) + b_R[o] + b_S[o]``. The padding
    is applied to ``x`` before the expand conv, so padded taps see ``b_E`` exactly as the fused
    bias assumes: the fusion is exact at the borders too. This is the fusion of
    [`Conv3XC.reparameterize`][examples.span_sr.arch.Conv3XC.reparameterize] and of
    [`from_spandrel`][examples.span_sr.spandrel_format.from_spandrel].

    Args:
        branch: The branch's tensors under ``sk``/``conv.0``/``conv.1``/``conv.2`` ``.weight``
            and ``.bias`` (a train-form ``Conv3XC``'s parameters or ``state_dict()``; other keys are ignored).

    Returns:
        ``(weight, bias)`` of shapes ``(out, in, 3, 3)`` and ``(out,)``, in float64 on the
        branch's device (cast them to the dtype wanted).
    """
    return _sums(branch, absolute=False)


def _sums(branch: Mapping[str, torch.Tensor], absolute: bool) -> tuple[torch.Tensor, torch.Tensor]:
    t = {k: (v.detach().double().abs() if absolute else v.detach().double()) for k, v in branch.items()}
    e_w, k_w, r_w, s_w = (t[f"{c}.weight"] for c in ("conv.0", "conv.1", "conv.2", "sk"))
    e_b, k_b, r_b, s_b = (t[f"{c}.bias"] for c in ("conv.0", "conv.1", "conv.2", "sk"))
    weight = torch.einsum("on,nmhw,mi->oihw", r_w[:, :, 0, 0], k_w, e_w[:, :, 0, 0])
    weight[:, :, 1, 1] += s_w[:, :, 0, 0]
    bias = r_w[:, :, 0, 0] @ (torch.einsum("nmhw,m->n", k_w, e_b) + k_b) + r_b + s_b
    return weight, bias


def _branch(state: Mapping[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    keys = [f"{c}.{t}" for c in _BRANCH for t in ("weight", "bias")]
    missing = [f"{prefix}.{k}" for k in keys if f"{prefix}.{k}" not in state]
    if missing:
        raise ValueError(f"{prefix}: the train branch is incomplete, missing {missing}.")
    branch = {k: state[f"{prefix}.{k}"] for k in keys}
    c_out, c_in = (int(s) for s in branch["sk.weight"].shape[:2])
    gain = int(branch["conv.0.weight"].shape[0]) // max(c_in, 1)
    shapes = {
        "sk.weight": (c_out, c_in, 1, 1), "sk.bias": (c_out,),
        "conv.0.weight": (gain * c_in, c_in, 1, 1), "conv.0.bias": (gain * c_in,),
        "conv.1.weight": (gain * c_out, gain * c_in, 3, 3), "conv.1.bias": (gain * c_out,),
        "conv.2.weight": (c_out, gain * c_out, 1, 1), "conv.2.bias": (c_out,),
    }
    bad = [f"{prefix}.{k} {tuple(branch[k].shape)} (expected {s})"
           for k, s in shapes.items() if tuple(branch[k].shape) != s]
    if bad:
        raise ValueError(f"{prefix}: the train branch is not a Conv3XC: {bad}.")
    return branch


def from_spandrel(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The deploy state dict of a SPAN stored with train branches (spandrel's layout, or train-only).

    Each ``Conv3XC``'s train branch is fused, as spandrel does before every eval forward: the
    result is the conv spandrel runs. The fusion is computed in float64 and cast to the stored
    dtype, so for a file written by [`to_spandrel`][examples.span_sr.spandrel_format.to_spandrel]
    it is the original deploy weights bit for bit. When an ``eval_conv`` is stored as well it
    must agree with the fusion within the worst-case round-off of a fusion in the stored dtype,
    or in TF32 on a GPU (see ``_check_agrees``; about ``2e-3`` of the fused weight's scale,
    a few ``1e-5`` of the bias's in float32); otherwise the file is inconsistent (``eval_conv`` stale,
    or edited) and is refused.

    Args:
        state: A flat SPAN state dict with ``<layer>.sk``/``conv.0``/``conv.1``/``conv.2``.

    Returns:
        A new state dict with one ``eval_conv`` per ``Conv3XC``; other keys are kept as they are.

    Raises:
        ValueError: a train branch is incomplete or mis-shaped, a stored ``eval_conv`` differs
            from its fusion (naming the layer, the difference and the bound), or the file
            disables SPAN's input normalisation (``no_norm``), which this SPAN does not implement.
    """
    if "no_norm" in state:
        raise ValueError("the state dict has 'no_norm': that SPAN runs without the RGB mean and "
                         "x255 input scaling, which examples.span_sr.arch.SPAN always applies.")
    own = {f"{c}.{t}" for c in (*_BRANCH, "eval_conv") for t in ("weight", "bias")}
    prefixes = {k.removesuffix(".sk.weight") for k in state if k.endswith(".sk.weight")}
    out: dict[str, torch.Tensor] = {}
    for key in state:
        prefix = next((p for p in prefixes if key.startswith(f"{p}.") and key[len(p) + 1:] in own), None)
        if prefix is None:
            out[key] = state[key]
        elif f"{prefix}.eval_conv.weight" not in out:
            out.update(_fused(state, prefix))
    return out


def _fused(state: Mapping[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """``{prefix}.eval_conv.weight/bias``: the fusion of the train branch, checked against a stored one."""
    branch = _branch(state, prefix)
    (weight, bias), (weight_abs, bias_abs) = fuse_branch(branch), _sums(branch, absolute=True)
    dtype = branch["sk.weight"].dtype
    stored_w, stored_b = state.get(f"{prefix}.eval_conv.weight"), state.get(f"{prefix}.eval_conv.bias")
    if stored_w is not None and stored_b is not None:
        _check_agrees(prefix, branch, (weight, bias), (weight_abs, bias_abs), (stored_w, stored_b))
        dtype = stored_w.dtype
    return {f"{prefix}.eval_conv.weight": weight.to(dtype), f"{prefix}.eval_conv.bias": bias.to(dtype)}


def _check_agrees(prefix: str, branch: Mapping[str, torch.Tensor],
                  fused: tuple[torch.Tensor, torch.Tensor], scale: tuple[torch.Tensor, torch.Tensor],
                  stored: tuple[torch.Tensor, torch.Tensor]) -> None:
    """Raise unless the stored ``eval_conv`` is the fusion up to the round-off of a float fusion.

    A fusion in a float format of unit round-off ``u`` that sums ``n`` products errs by at most
    about ``(n + 2)·u`` times the same sums over absolute values (``scale``), plus ``u`` for
    storing the result. The weight fusion is a pair of convolutions in the official code and in
    spandrel; on a GPU PyTorch runs them in TF32 by default (``torch.backends.cudnn.allow_tf32``),
    which rounds the four operands of each product to 10 mantissa bits: ``4·2^-11`` more.
    """
    c_mid_in = int(branch["conv.0.weight"].shape[0])
    c_mid_out = int(branch["conv.1.weight"].shape[0])
    u = max(torch.finfo(stored[0].dtype).eps, torch.finfo(branch["conv.1.weight"].dtype).eps) / 2
    rel = {
        "weight": 4 * max(u, 2.0**-11) + (c_mid_in + c_mid_out + 4) * u,
        "bias": (9 * c_mid_in + c_mid_out + 6) * u,  # elementwise products and sums: no TF32
    }
    for name, exact, size, kept in zip(("weight", "bias"), fused, scale, stored):
        if tuple(kept.shape) != tuple(exact.shape):
            raise ValueError(f"{prefix}.eval_conv.{name} has shape {tuple(kept.shape)}; the train "
                             f"branch fuses to {tuple(exact.shape)}.")
        diff = (kept.double() - exact).abs()
        bound = rel[name] * size + torch.finfo(kept.dtype).tiny
        if bool((diff > bound).any()):
            worst = int((diff - bound).argmax())
            raise ValueError(
                f"{prefix}.eval_conv.{name} differs from the fusion of its train branch by "
                f"{float(diff.flatten()[worst]):.3g} (float round-off allows "
                f"{float(bound.flatten()[worst]):.3g}): the file is inconsistent (a stale or edited "
                "eval_conv), and spandrel would run the fusion, not the stored eval_conv; "
                "re-export it from the trained network."
            )
