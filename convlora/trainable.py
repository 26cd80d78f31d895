"""Which parameters belong with an adapter: its factors, and the biases a bias mode names.

The bias modes are PEFT's: ``"none"`` (no bias), ``"lora_only"`` (the biases of the layers that
carry the adapter), ``"all"`` (every parameter named ``bias`` in the model, normalisation layers
included). The same mode means the same biases when training
([mark_only_lora_trainable][convlora.mark_only_lora_trainable]) and when saving
([lora_state_dict][convlora.lora_state_dict], [save_adapter][convlora.save_adapter]).
"""

from __future__ import annotations

from typing import Literal

from torch import nn

from .errors import ConvLoRAError
from .layer import LoRALayer
from .methods import FACTOR_NAMES

__all__ = ["BIAS_MODES", "BiasMode", "bias_names", "check_bias_mode", "is_lora_factor",
           "mark_only_lora_trainable"]

BiasMode = Literal["none", "lora_only", "all"]
BIAS_MODES: tuple[str, ...] = ("none", "lora_only", "all")


def check_bias_mode(bias: object, where: str) -> None:
    """Raise a one-line [ConvLoRAError][convlora.ConvLoRAError] unless ``bias`` is a bias mode."""
    if not isinstance(bias, str) or bias not in BIAS_MODES:
        raise ConvLoRAError(f"{where}: bias={bias!r} is not one of {BIAS_MODES}.")


def is_lora_factor(param_name: str, adapter: str | None = None) -> bool:
    """True for ``...<factor>.<adapter>`` of any method's factor (``lora_A``, ``lora_B``, ...;
    see [convlora.methods][]), of any adapter when ``adapter`` is ``None``."""
    owner, _, leaf = param_name.rpartition(".")
    return owner.rpartition(".")[2] in FACTOR_NAMES and adapter in (None, leaf)


def bias_names(model: nn.Module, bias: BiasMode, adapter: str | None = None) -> list[str]:
    """Qualified names of the bias parameters that ``bias`` selects, in module order.

    Args:
        model: A model with LoRA layers.
        bias: ``"none"``, ``"lora_only"`` or ``"all"``.
        adapter: For ``"lora_only"``: only layers carrying this adapter (default: every LoRA
            layer).
    """
    check_bias_mode(bias, "bias_names()")
    if bias == "none":
        return []
    carriers = {n for n, m in model.named_modules() if isinstance(m, LoRALayer)
                and (adapter is None or adapter in m.rank)}
    out = []
    for pname, _ in model.named_parameters():
        owner, _, leaf = pname.rpartition(".")
        if leaf == "bias" and (bias == "all" or owner in carriers):
            out.append(pname)
    return out


def mark_only_lora_trainable(model: nn.Module, bias: BiasMode = "none",
                             adapter: str | None = None) -> None:
    """Freeze everything except adapter factors, and the biases ``bias`` names.

    [inject][convlora.inject] calls this (``bias="none"``, its new adapter) unless
    ``freeze=False``; call it yourself to train biases too. Save with the same ``bias`` mode so
    the adapter file holds what was trained. Biases are shared by all adapters of a model: train
    them only for single-adapter models.

    Args:
        model: A model with LoRA layers.
        bias: ``"none"``, ``"lora_only"`` (biases of the layers carrying the adapter) or
            ``"all"`` (every bias in the model).
        adapter: Only this adapter's factors train (default: every adapter's).
    """
    check_bias_mode(bias, "mark_only_lora_trainable()")
    biases = set(bias_names(model, bias, adapter))
    for pname, p in model.named_parameters():
        p.requires_grad_(is_lora_factor(pname, adapter) or pname in biases)
