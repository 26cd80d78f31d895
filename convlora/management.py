"""Named adapters of a model with LoRA layers: switching, deleting, their tensors, a summary."""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence

from torch import Tensor, nn

from .errors import ConvLoRAError, MergeStateError
from .surgery import lora_layers
from .trainable import BiasMode, bias_names, check_bias_mode, is_lora_factor

__all__ = [
    "active_adapter",
    "delete_adapter",
    "list_adapters",
    "lora_parameters",
    "lora_state_dict",
    "set_adapter",
    "summary",
]

def list_adapters(model: nn.Module) -> list[str]:
    """Names of all adapters present on any layer, in order of first appearance."""
    seen: dict[str, None] = {}
    for layer in lora_layers(model).values():
        seen.update(dict.fromkeys(layer.rank))
    return list(seen)


def set_adapter(model: nn.Module, name: str | Sequence[str],
                weights: Sequence[float] | None = None) -> None:
    """Make ``name`` the active adapter, or several adapters active at once with ``weights``.

    With one name (and no weights) each layer runs ``W'`` of that adapter. With a list of names
    each layer runs one convolution with ``W + sum_i w_i * delta_i`` over the listed adapters it
    carries, where ``delta_i = W'_i - W`` (for DoRA too: its ``delta`` is taken at weight 1, see
    [convlora.composition][]); ``weights`` defaults to all ones. Layers with none of the adapters
    run their base weights. Biases are the model's own parameters, shared by every adapter:
    a composition uses the biases currently loaded and does not weight them.

    Switching only changes which factors the forward reads: it is exact and costs nothing.

    Raises:
        MergeStateError: the model is merged (unmerge first).
        ConvLoRAError: no layer has an adapter of that name, a name is repeated, or ``weights``
            does not give one finite number per name.
    """
    names = [name] if isinstance(name, str) else list(name)
    if weights is None:
        ws = [1.0] * len(names)
    else:
        ws = [float(w) for w in weights]
        if len(ws) != len(names) or not all(math.isfinite(w) for w in ws):
            raise ConvLoRAError(f"set_adapter(): weights={list(weights)} must give one finite "
                                f"number per adapter of {names}.")
    layers = lora_layers(model)
    if any(layer.merged_adapter is not None for layer in layers.values()):
        raise MergeStateError(f"set_adapter({name!r}): the model is merged; call "
                              "convlora.unmerge() before switching adapters.")
    if not names or len(set(names)) != len(names):
        raise ConvLoRAError(f"set_adapter(): adapter names {names} must be non-empty and distinct.")
    for n in names:
        if not any(n in layer.rank for layer in layers.values()):
            raise ConvLoRAError(f"no adapter named {n!r}; this model has {list_adapters(model)}.")
    single = len(names) == 1 and ws[0] == 1.0
    for layer in layers.values():
        mine = {n: w for n, w in zip(names, ws) if n in layer.rank}
        layer.active_adapter = next(iter(mine), None)
        layer.adapter_weights = None if single or not mine else mine


def delete_adapter(model: nn.Module, name: str) -> None:
    """Remove adapter ``name`` from every layer (it must not be merged)."""
    layers = [layer for layer in lora_layers(model).values() if name in layer.rank]
    if not layers:
        raise ConvLoRAError(f"no adapter named {name!r}; this model has {list_adapters(model)}.")
    if any(layer.merged_adapter == name or (layer.merged_adapter is not None
                                            and name in (layer.composition() or {}))
           for layer in layers):
        raise MergeStateError(f"adapter {name!r} is merged; call convlora.unmerge() first.")
    for layer in layers:
        layer.delete_adapter(name)


def active_adapter(model: nn.Module) -> str | None:
    """Name of the active adapter, or ``None`` when no layer has one active.

    With several adapters active at once (``set_adapter`` with a list) this is the first name of
    the mix; each layer's ``composition()`` gives the mix itself.
    """
    for layer in lora_layers(model).values():
        if layer.active_adapter is not None:
            return layer.active_adapter
    return None


def lora_parameters(model: nn.Module, adapter: str | None = None) -> Iterator[nn.Parameter]:
    """Adapter factors of ``adapter`` (default: every adapter), e.g. for an optimizer.

    Every factor of the adapter's method: ``lora_A``/``lora_B`` for LoRA, plus the magnitude
    for DoRA, the Hadamard or Kronecker factors for LoHa/LoKr.
    """
    for layer in lora_layers(model).values():
        for name in layer.rank:
            if adapter is None or name == adapter:
                yield from layer.factors(name).values()


def lora_state_dict(model: nn.Module, adapter: str | None = None, *,
                    bias: BiasMode = "none") -> dict[str, Tensor]:
    """Tensors of one adapter: ``<layer>.<factor>`` (``lora_A``/``lora_B`` ...), plus the biases ``bias`` names.

    What is returned depends only on the arguments, never on ``requires_grad``.

    Args:
        model: A model with LoRA layers.
        adapter: Which adapter (default: the active one).
        bias: ``"none"`` (factors only), ``"lora_only"`` (also the biases of the layers carrying
            this adapter) or ``"all"`` (also every bias of the model), under their parameter
            names (``<module>.bias``).

    Raises:
        ConvLoRAError: no such adapter, no active adapter, or an unknown bias mode.
    """
    check_bias_mode(bias, "lora_state_dict()")
    name = adapter or active_adapter(model)
    if name is None:
        raise ConvLoRAError("lora_state_dict(): the model has no active adapter; pass adapter=.")
    out: dict[str, Tensor] = {}
    for lname, layer in lora_layers(model).items():
        if name in layer.rank:
            for factor, t in layer.factors(name).items():
                out[f"{lname}.{factor}"] = t.detach()
    if not out:
        raise ConvLoRAError(f"no adapter named {name!r}; this model has {list_adapters(model)}.")
    params = dict(model.named_parameters())
    for pname in bias_names(model, bias, name):
        out[pname] = params[pname].detach()
    return out


def summary(model: nn.Module) -> str:
    """A text table: layer, base shape, rank, alpha, method, factorisation, trainable params, merged."""
    rows = [("layer", "type", "shape", "adapter", "rank", "alpha", "method", "factorization",
             "params", "merged")]
    total = 0
    for lname, layer in lora_layers(model).items():
        for name in layer.rank:
            n = sum(t.numel() for t in layer.factors(name).values())
            total += n
            rows.append((lname, layer.base_type, "x".join(map(str, layer.weight.shape)),
                         name + ("*" if name == layer.active_adapter else ""), str(layer.rank[name]),
                         f"{layer.alpha[name]:g}",
                         layer.method[name] + ("+tucker" if layer.tucker[name] else "")
                         + ("+rs" if layer.rslora[name] else ""),
                         layer.factorization[name], f"{n:,}",
                         "yes" if layer.merged_adapter == name else "no"))
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    base = sum(p.numel() for n, p in model.named_parameters() if not is_lora_factor(n))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    lines.append(f"adapter params: {total:,}  trainable: {trainable:,}  base params: {base:,}  "
                 "(* = active)")
    return "\n".join(lines)
