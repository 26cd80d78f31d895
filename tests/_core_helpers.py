"""Helpers shared by the core tests (not a test module)."""

from __future__ import annotations

import copy

import torch
from torch import nn

import convlora

ATOL = {torch.float32: 1e-5, torch.bfloat16: 2e-2}


def randomize_adapters(model: nn.Module, seed: int = 0, std: float = 0.1) -> None:
    """Give every adapter non-zero factors so merge tests test something."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in convlora.lora_parameters(model):
            p.copy_(torch.randn(p.shape, generator=gen) * std)


def clone(model: nn.Module) -> nn.Module:
    return copy.deepcopy(model)


def keys_and_shapes(model: nn.Module) -> list[tuple[str, tuple[int, ...]]]:
    return [(k, tuple(v.shape)) for k, v in model.state_dict().items()]


def module_types(model: nn.Module) -> list[tuple[str, type]]:
    return [(n, type(m)) for n, m in model.named_modules()]
