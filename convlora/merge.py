"""Merge adapters into the weights and back, permanently or for the span of a ``with`` block."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from torch import nn

from .errors import MergeStateError
from .surgery import lora_layers

__all__ = ["disabled", "is_merged", "merge", "merged", "unmerge"]


def _layers(model: nn.Module, op: str) -> dict:
    layers = lora_layers(model)
    if not layers:
        raise MergeStateError(f"{op}(): the model has no LoRA layers; call convlora.inject() first.")
    return layers


def is_merged(model: nn.Module) -> bool:
    """True when any LoRA layer of ``model`` has an adapter folded into its weight."""
    return any(layer.merged_adapter is not None for layer in lora_layers(model).values())


def merge(model: nn.Module) -> None:
    """Fold each layer's active adapter into its weight (float32 sum, cast back).

    Raises:
        MergeStateError: the model is already merged (a second merge would add the delta twice).
    """
    layers = _layers(model, "merge")
    already = [n for n, layer in layers.items() if layer.merged_adapter is not None]
    if already:
        raise MergeStateError(f"merge(): layers {already[:5]} are already merged; merging again "
                              "would add their deltas twice. Call convlora.unmerge() first.")
    for layer in layers.values():
        layer.merge()


def unmerge(model: nn.Module) -> None:
    """Restore the exact original weights of every merged layer.

    Raises:
        MergeStateError: nothing is merged.
    """
    layers = _layers(model, "unmerge")
    if not any(layer.merged_adapter is not None for layer in layers.values()):
        raise MergeStateError("unmerge(): the model is not merged.")
    for layer in layers.values():
        layer.unmerge()


@contextmanager
def merged(model: nn.Module) -> Iterator[nn.Module]:
    """Merge for the duration of the block; unmerge on exit, even on error."""
    merge(model)
    try:
        yield model
    finally:
        unmerge(model)


@contextmanager
def disabled(model: nn.Module) -> Iterator[nn.Module]:
    """Run the base model (adapters off) for the duration of the block; restore state on exit.

    Merged layers are unmerged inside the block and merged again afterwards.
    """
    layers = _layers(model, "disabled")
    was_merged = [layer for layer in layers.values() if layer.merged_adapter is not None]
    previous = {id(layer): layer.disabled for layer in layers.values()}
    for layer in was_merged:
        layer.unmerge()
    try:
        for layer in layers.values():
            layer.disabled = True
        yield model
    finally:
        for layer in layers.values():
            layer.disabled = previous[id(layer)]
        for layer in was_merged:
            layer.merge()
