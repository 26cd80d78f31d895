"""Adapter composition: a strength knob, mixed-adapter batches, and combining adapters into a new one.

Several adapters active at once are set with [`set_adapter`][convlora.set_adapter]
(``set_adapter(model, ["a", "b"], weights=[1.0, 0.5])``): each layer then runs one convolution
with ``W + sum_i w_i * delta_i``. How each method composes: ``delta_i = W'_i - W``, the exact
change adapter ``i`` makes on its own. For LoRA, LoHa and LoKr (and rsLoRA) this is their
additive delta; for DoRA, whose ``W'`` rescales ``W + BA`` per output channel, it is the DoRA
update at weight 1, so a weight ``w`` interpolates linearly between ``W`` and the DoRA weight
(``w = 1`` alone is exactly the DoRA adapter). Biases are shared model parameters: a
composition does not weight them.

* [`scaled`][convlora.composition.scaled] multiplies the active weights for a ``with`` block.
  While merged it re-merges exactly: unmerge (bit for bit), merge the scaled combination, and on
  exit unmerge and merge the original combination again.
* [`per_sample`][convlora.composition.per_sample] gives each sample of the batch its own adapter
  for a ``with`` block; each layer groups the batch by adapter and runs one weight-space
  convolution per group.
* [`combine_adapters`][convlora.composition.combine_adapters] writes ``sum_i w_i * delta_i`` as a
  new LoRA adapter, saved and merged like any other.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Literal

import torch
from torch import Tensor, nn

from .errors import ConvLoRAError, MergeStateError
from .functional import compute_dtype, max_rank
from .layer import LoRALayer
from .management import list_adapters
from .surgery import lora_layers

__all__ = ["CombineMode", "combine_adapters", "per_sample", "scaled"]

CombineMode = Literal["linear", "cat", "svd"]


def _layers(model: nn.Module, op: str) -> dict[str, LoRALayer]:
    layers = lora_layers(model)
    if not layers:
        raise ConvLoRAError(f"{op}(): the model has no LoRA layers; call convlora.inject() first.")
    return layers


@contextmanager
def scaled(model: nn.Module, strength: float) -> Iterator[nn.Module]:
    """Multiply the weights of the active adapters by ``strength`` for the duration of the block.

    ``strength`` 0 gives the base model, 1 the adapters as set. A single adapter at strength
    ``s`` runs ``W + s * delta``. While the model is merged, the layers are re-merged exactly with
    the scaled combination and, on exit, with the original one (``unmerge`` restores ``W`` bit
    for bit in between, so the weights after the block equal those before).

    Raises:
        ConvLoRAError: ``strength`` is not a finite number.
    """
    if not isinstance(strength, (int, float)) or not math.isfinite(strength):
        raise ConvLoRAError(f"scaled(): strength={strength!r} must be a finite number, e.g. 0.5.")
    layers = [layer for layer in _layers(model, "scaled").values()
              if layer.active_adapter is not None]
    previous = {id(layer): layer.adapter_weights for layer in layers}

    def apply(weights_of: dict[int, dict[str, float] | None]) -> None:
        for layer in layers:
            was_merged = layer.merged_adapter is not None
            if was_merged:
                layer.unmerge()
            layer.adapter_weights = weights_of[id(layer)]
            if was_merged:
                layer.merge()

    new: dict[int, dict[str, float] | None] = {}
    for layer in layers:
        base = layer.composition() or {layer.active_adapter: 1.0}  # type: ignore[dict-item]
        new[id(layer)] = (layer.adapter_weights if strength == 1
                          else {n: w * strength for n, w in base.items()})
    apply(new)
    try:
        yield model
    finally:
        apply(previous)


@contextmanager
def per_sample(model: nn.Module, names: Sequence[str | None]) -> Iterator[nn.Module]:
    """Give sample ``i`` of the batch adapter ``names[i]`` (``None``: the base model) inside the block.

    Each LoRA layer splits its input batch by adapter name, runs one convolution per group with
    that adapter's own weight ``W'`` (exactly as [`set_adapter`][convlora.set_adapter] with that
    one name would) and puts the outputs back in sample order. Layers that do not carry a name
    run their base weight for those samples. The active adapters set before are restored on exit.

    Raises:
        MergeStateError: the model is merged (a merged weight belongs to one adapter).
        ConvLoRAError: a name is not an adapter of the model.
    """
    layers = _layers(model, "per_sample")
    if any(layer.merged_adapter is not None for layer in layers.values()):
        raise MergeStateError("per_sample(): the model is merged; call convlora.unmerge() first.")
    known = set(list_adapters(model))
    bad = sorted({n for n in names if n is not None and n not in known})
    if bad:
        raise ConvLoRAError(f"per_sample(): no adapter named {bad}; this model has {sorted(known)}.")
    chosen = tuple(names)
    previous = {id(layer): layer.sample_adapters for layer in layers.values()}
    for layer in layers.values():
        layer.sample_adapters = chosen
    try:
        yield model
    finally:
        for layer in layers.values():
            layer.sample_adapters = previous[id(layer)]


def _target(layer: LoRALayer, terms: dict[str, float]) -> Tensor:
    dtype = compute_dtype(layer.weight)
    out = torch.zeros(layer.weight.shape, dtype=dtype, device=layer.weight.device)
    for n, w in terms.items():
        out = out + layer.delta(n).to(dtype) * w
    return out


def _rel_error(made: Tensor, target: Tensor) -> float:
    norm = float(torch.linalg.vector_norm(target))
    diff = float(torch.linalg.vector_norm(made - target))
    return diff / norm if norm > 0 else diff


def _plan(layer: LoRALayer, lname: str, terms: dict[str, float], mode: str,
          rank: int | None) -> tuple[int, str, dict[str, Tensor], float | None]:
    """Rank, factorization, factors and (for svd) the predicted relative error of the new adapter."""
    dtype = compute_dtype(layer.weight)
    if mode in ("linear", "cat"):
        others = sorted({layer.method[n] for n in terms} - {"lora"})
        if others:
            raise ConvLoRAError(f"combine_adapters(mode={mode!r}): layer {lname!r} has adapters of "
                                f"method {others}; only 'lora' factors combine this way. Use "
                                "mode='svd' (any method, through its effective delta).")
        facts = {layer.factorization[n] for n in terms}
        if len(facts) != 1:
            raise ConvLoRAError(f"combine_adapters(mode={mode!r}): layer {lname!r} mixes "
                                f"factorizations {sorted(facts)}; use mode='svd'.")
        fact = facts.pop()
        a = {n: layer.factors(n)["lora_A"].detach().to(dtype) for n in terms}
        b = {n: layer.factors(n)["lora_B"].detach().to(dtype) for n in terms}
        if mode == "cat":
            new_a = torch.cat([a[n] for n in terms], 0)
            new_b = torch.cat([b[n] * (w * layer.scale(n)) for n, w in terms.items()], 1)
            return sum(layer.rank[n] for n in terms), fact, {"lora_A": new_a, "lora_B": new_b}, None
        ranks = {layer.rank[n] for n in terms}
        if len(ranks) != 1:
            raise ConvLoRAError(f"combine_adapters(mode='linear'): layer {lname!r} has ranks "
                                f"{sorted(ranks)}; linear needs equal ranks. Use mode='cat'.")
        coef = {n: w * layer.scale(n) for n, w in terms.items()}
        if any(c < 0 for c in coef.values()):
            raise ConvLoRAError(f"combine_adapters(mode='linear'): weights {list(terms.values())} "
                                "must be >= 0 (it uses sqrt(w * scale)); use mode='cat'.")
        new_a = torch.stack([a[n] * math.sqrt(c) for n, c in coef.items()]).sum(0)
        new_b = torch.stack([b[n] * math.sqrt(c) for n, c in coef.items()]).sum(0)
        return ranks.pop(), fact, {"lora_A": new_a, "lora_B": new_b}, None
    target = _target(layer, terms)
    shape = tuple(layer.weight.shape)
    rows, cols = shape[0], math.prod(shape[1:])
    limit = max_rank("kernel", shape, layer.groups)
    r = min(int(rank), limit, rows, cols)  # type: ignore[arg-type]
    u, s, vh = torch.linalg.svd(target.reshape(rows, cols), full_matrices=False)
    total = float(torch.linalg.vector_norm(s))
    rest = float(torch.linalg.vector_norm(s[r:]))
    predicted = rest / total if total > 0 else 0.0
    return r, "kernel", {"lora_A": vh[:r].contiguous(), "lora_B": (u[:, :r] * s[:r]).contiguous()}, predicted


def combine_adapters(model: nn.Module, names: Sequence[str], weights: Sequence[float], name: str,
                     mode: CombineMode = "linear", rank: int | None = None) -> dict[str, float]:
    """Add a new LoRA adapter ``name`` whose delta is ``sum_i w_i * delta_i`` of ``names``.

    Modes, as PEFT's ``add_weighted_adapter``:

    * ``"linear"``: LoRA adapters of equal rank and factorization; the new factors are
      ``A = sum_i sqrt(w_i s_i) A_i`` and ``B = sum_i sqrt(w_i s_i) B_i`` (weights ``>= 0``). Same
      rank, but *not* the weighted sum (cross terms ``B_i A_j``), unless one adapter.
    * ``"cat"``: LoRA adapters of one factorization; the factors are stacked (ranks add) and the
      delta is the weighted sum exactly (up to float rounding).
    * ``"svd"``: any method (DoRA, LoHa, LoKr too): the weighted sum of the effective deltas
      ``W'_i - W`` is truncated by SVD to ``rank`` (capped per layer at the layer's largest LoRA
      rank) into a ``"kernel"`` LoRA adapter; the error reported is the Eckart-Young one,
      ``||discarded singular values|| / ||all singular values||``.

    The new adapter has scale 1 (``alpha = rank``), no dropout, and is not activated. A layer
    carrying none of ``names`` gets no factors. Biases are shared model parameters and are left
    alone. Nothing changes when the call fails.

    Returns:
        Per layer, the relative Frobenius error ``||delta_new - sum_i w_i delta_i|| / ||sum_i w_i delta_i||``:
        measured for ``"linear"`` and ``"cat"``, predicted from the singular values for ``"svd"``.

    Raises:
        ConvLoRAError: unknown adapter or mode, ``name`` taken, mismatched weights, a method or
            rank the mode cannot combine, or ``mode="svd"`` without ``rank``.
        MergeStateError: the model is merged.
    """
    layers = _layers(model, "combine_adapters")
    names, ws = list(names), [float(w) for w in weights]
    if mode not in ("linear", "cat", "svd"):
        raise ConvLoRAError(f"combine_adapters(): mode={mode!r} is not one of 'linear', 'cat', 'svd'.")
    if not names or len(ws) != len(names) or len(set(names)) != len(names) or \
            not all(math.isfinite(w) for w in ws):
        raise ConvLoRAError(f"combine_adapters(): need distinct names and one finite weight each, "
                            f"got names={names}, weights={list(weights)}.")
    present = list_adapters(model)
    missing = [n for n in names if n not in present]
    if missing:
        raise ConvLoRAError(f"combine_adapters(): no adapter named {missing}; this model has {present}.")
    if name in present:
        raise ConvLoRAError(f"combine_adapters(): an adapter named {name!r} exists; pick another "
                            "name or delete_adapter() it first.")
    if mode == "svd" and (not isinstance(rank, int) or rank < 1):
        raise ConvLoRAError(f"combine_adapters(mode='svd'): rank={rank!r} must be a positive int.")
    if any(layer.merged_adapter is not None for layer in layers.values()):
        raise MergeStateError("combine_adapters(): the model is merged; call convlora.unmerge() first.")
    plans = {}
    with torch.no_grad():
        for lname, layer in layers.items():
            terms = {n: w for n, w in zip(names, ws) if n in layer.rank}
            if terms:
                plans[lname] = (layer, terms, _plan(layer, lname, terms, mode, rank))
        for lname, (layer, _, (r, fact, _f, _p)) in plans.items():
            problem = layer.adapter_problem(r, fact, "lora")
            if problem:
                raise ConvLoRAError(f"combine_adapters(): layer {lname!r}: {problem}; or use "
                                    "mode='svd' with a smaller rank.")
        report: dict[str, float] = {}
        for lname, (layer, terms, (r, fact, factors, predicted)) in plans.items():
            layer.add_adapter(name, r, float(r), fact, 0.0, lname, "lora", False)
            for f, t in factors.items():
                layer.factors(name)[f].copy_(t)
            report[lname] = (predicted if predicted is not None
                             else _rel_error(layer.delta(name), _target(layer, terms)))
    return report
