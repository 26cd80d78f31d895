"""Helpers shared by the core tests (not a test module)."""

from __future__ import annotations

import copy
import json
import struct
from pathlib import Path

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


def three_convs(seed: int = 0) -> nn.Module:
    """A plain conv, a grouped conv and a conv before a pixel shuffle (the adapter-file tests' base)."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1, groups=2),
                         nn.ReLU(), nn.Conv2d(8, 12, 3, padding=1), nn.PixelShuffle(2))


def adapted(base: nn.Module, seed: int, **kw) -> nn.Module:
    """A copy of ``base`` with a rank-2 adapter on every conv, random non-zero factors."""
    model = copy.deepcopy(base)
    convlora.inject(model, rank=2, **kw)
    randomize_adapters(model, seed)
    return model


def rewrite_metadata(path: Path, out: Path, **changes: str) -> Path:
    data = path.read_bytes()
    n = struct.unpack("<Q", data[:8])[0]
    header = json.loads(data[8:8 + n])
    header["__metadata__"].update(changes)
    new = json.dumps(header).encode()
    out.write_bytes(struct.pack("<Q", len(new)) + new + data[8 + n:])
    return out
