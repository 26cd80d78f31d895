"""Named adapters, trainability and introspection of a model with LoRA layers."""

from __future__ import annotations

from collections.abc import Iterator

from torch import Tensor, nn

from .config import LoRAConfig
from .errors import ConvLoRAError, MergeStateError
from .surgery import inject, lora_layers

__all__ = [
    "active_adapter",
    "add_adapter",
    "delete_adapter",
    "list_adapters",
    "lora_parameters",
    "lora_state_dict",
    "mark_only_lora_trainable",
    "set_adapter",
    "summary",
]

_BIAS_MODES = ("none", "all", "lora_only")


def _is_lora_param(name: str) -> bool:
    return ".lora_A." in f".{name}" or ".lora_B." in f".{name}"


def add_adapter(model: nn.Module, name: str, config: LoRAConfig) -> list[str]:
    """Add adapter ``name`` described by ``config`` (it becomes active); see [`inject`][convlora.inject]."""
    return inject(model, config, adapter_name=name)


def list_adapters(model: nn.Module) -> list[str]:
    """Names of all adapters present on any layer, in order of first appearance."""
    seen: dict[str, None] = {}
    for layer in lora_layers(model).values():
        seen.update(dict.fromkeys(layer.rank))
    return list(seen)


def set_adapter(model: nn.Module, name: str) -> None:
    """Make ``name`` the active adapter; layers without it run their base weights.

    Switching only changes which factors the forward reads: it is exact and costs nothing.

    Raises:
        MergeStateError: the model is merged (unmerge first).
        ConvLoRAError: no layer has an adapter ``name``.
    """
    layers = lora_layers(model)
    if any(layer.merged_adapter is not None for layer in layers.values()):
        raise MergeStateError(f"set_adapter({name!r}): the model is merged; call "
                              "convlora.unmerge() before switching adapters.")
    if not any(name in layer.rank for layer in layers.values()):
        raise ConvLoRAError(f"no adapter named {name!r}; this model has {list_adapters(model)}.")
    for layer in layers.values():
        layer.active_adapter = name if name in layer.rank else None


def delete_adapter(model: nn.Module, name: str) -> None:
    """Remove adapter ``name`` from every layer (it must not be merged)."""
    layers = [layer for layer in lora_layers(model).values() if name in layer.rank]
    if not layers:
        raise ConvLoRAError(f"no adapter named {name!r}; this model has {list_adapters(model)}.")
    if any(layer.merged_adapter == name for layer in layers):
        raise MergeStateError(f"adapter {name!r} is merged; call convlora.unmerge() first.")
    for layer in layers:
        layer.delete_adapter(name)


def active_adapter(model: nn.Module) -> str | None:
    """Name of the active adapter, or ``None`` when no layer has one active."""
    for layer in lora_layers(model).values():
        if layer.active_adapter is not None:
            return layer.active_adapter
    return None


def mark_only_lora_trainable(model: nn.Module, bias: str = "none", adapter: str | None = None) -> None:
    """Freeze everything except adapter factors (and biases, as ``bias`` says).

    Args:
        model: A model with LoRA layers.
        bias: ``"none"``, ``"all"`` (every bias in the model) or ``"lora_only"`` (biases of
            LoRA layers). Trainable biases are saved with the adapter. Biases are shared by all
            adapters of a model: train them only for single-adapter models.
        adapter: Only this adapter's factors train (default: every adapter's).
    """
    if bias not in _BIAS_MODES:
        raise ConvLoRAError(f"bias={bias!r} is not one of {_BIAS_MODES}.")
    lora_names = set(lora_layers(model))
    for pname, p in model.named_parameters():
        owner, _, leaf = pname.rpartition(".")
        is_factor = _is_lora_param(pname) and (adapter is None or pname.endswith(f".{adapter}"))
        train = is_factor or (leaf == "bias" and (
            bias == "all" or (bias == "lora_only" and owner in lora_names)))
        p.requires_grad_(train)


def lora_parameters(model: nn.Module, adapter: str | None = None) -> Iterator[nn.Parameter]:
    """Adapter factors of ``adapter`` (default: every adapter), e.g. for an optimizer."""
    for layer in lora_layers(model).values():
        for name in layer.rank:
            if adapter is None or name == adapter:
                yield layer.lora_A[name]
                yield layer.lora_B[name]


def lora_state_dict(model: nn.Module, adapter: str | None = None) -> dict[str, Tensor]:
    """Factors of one adapter (default: the active one) as ``<layer>.lora_A/B``, plus the
    trainable biases as ``<module>.bias``."""
    name = adapter or active_adapter(model)
    if name is None:
        raise ConvLoRAError("lora_state_dict(): the model has no active adapter; pass adapter=.")
    out: dict[str, Tensor] = {}
    for lname, layer in lora_layers(model).items():
        if name in layer.rank:
            out[f"{lname}.lora_A"] = layer.lora_A[name].detach()
            out[f"{lname}.lora_B"] = layer.lora_B[name].detach()
    if not out:
        raise ConvLoRAError(f"no adapter named {name!r}; this model has {list_adapters(model)}.")
    for pname, p in model.named_parameters():
        if pname.endswith(".bias") and p.requires_grad:
            out[pname] = p.detach()
    return out


def summary(model: nn.Module) -> str:
    """A text table: layer, base shape, rank, alpha, factorisation, trainable params, merged."""
    rows = [("layer", "type", "shape", "adapter", "rank", "alpha", "factorization", "params",
             "merged")]
    total = 0
    for lname, layer in lora_layers(model).items():
        for name in layer.rank:
            n = layer.lora_A[name].numel() + layer.lora_B[name].numel()
            total += n
            rows.append((lname, layer.base_type, "x".join(map(str, layer.weight.shape)),
                         name + ("*" if name == layer.active_adapter else ""), str(layer.rank[name]),
                         f"{layer.alpha[name]:g}", layer.factorization[name], f"{n:,}",
                         "yes" if layer.merged_adapter == name else "no"))
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    base = sum(p.numel() for n, p in model.named_parameters() if not _is_lora_param(n))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    lines.append(f"adapter params: {total:,}  trainable: {trainable:,}  base params: {base:,}  "
                 "(* = active)")
    return "\n".join(lines)
