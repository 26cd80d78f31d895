"""Helpers shared by the PEFT folder tests (not a test module): timm and PEFT models with random
non-zero factors, and the checks the tests share."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

import convlora
from tests._core_helpers import module_types

peft = pytest.importorskip("peft")
timm = pytest.importorskip("timm")

X = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(0))

# Layers (for position 2 of small_net()) where PEFT's side path is not a weight delta of the conv,
# with what convlora's refusal says about each: PEFT's lora_A conv pads with zeros and ignores dilation.
PEFT_MISHANDLES = [
    (nn.Conv2d(8, 8, 3, padding=1, padding_mode=mode), f"padding_mode='{mode}', while PEFT's lora_A conv pads with zeros")
    for mode in ("reflect", "circular", "replicate")
] + [(nn.Conv2d(8, 8, 3, padding=2, dilation=2), r"dilation \(2, 2\), which PEFT's lora_A conv ignores")]


def timm_model(arch: str) -> nn.Module:
    torch.manual_seed(0)
    kw: dict[str, Any] = {"ls_init_value": 1.0} if arch.startswith("convnext") else {}
    if arch.startswith("resnet"):
        kw["zero_init_last"] = False  # timm zeroes each block's last BN scale: conv2 would not matter
    model = timm.create_model(arch, pretrained=False, num_classes=10, **kw).eval()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.1, 0.1)
    return model


def peft_model(base: nn.Module, seed: int = 1, **config: Any) -> nn.Module:
    """A PEFT model of a copy of ``base`` with random non-zero LoRA factors (and, with
    ``use_dora=True``, DoRA magnitudes 1.5 to 2.5 times each output channel's ``||W||``)."""
    pm = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(**config)).eval()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if ".lora_A." in n or ".lora_B." in n:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
            elif ".lora_magnitude_vector." in n:
                p.mul_(1.5 + torch.rand(p.shape, generator=gen))
    return pm


def close(out: torch.Tensor, ref: torch.Tensor, base_out: torch.Tensor) -> None:
    """Same outputs up to float rounding, and the adapter visibly changes them."""
    scale = ref.abs().max().item()
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5 * scale)
    assert (ref - base_out).abs().max().item() > 1e-2 * scale, "the adapter must change the output"


def state_copy(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def unchanged(model: nn.Module, before: dict[str, torch.Tensor], types: list[tuple[str, type]]) -> None:
    assert module_types(model) == types
    after = model.state_dict()
    assert set(after) == set(before) and all(torch.equal(after[k], before[k]) for k in before)


def refused_load(model: nn.Module, folder: Path, error: type[Exception], match: str) -> None:
    """``load_peft_adapter(model, folder)`` raises ``error`` matching ``match`` and leaves ``model`` as it was."""
    before, types = state_copy(model), module_types(model)
    with pytest.raises(error, match=match):
        convlora.load_peft_adapter(model, folder)
    unchanged(model, before, types)


def same_adapters(a: nn.Module, b: nn.Module, name: str = "default") -> None:
    la, lb = convlora.lora_layers(a), convlora.lora_layers(b)
    assert set(la) == set(lb) and la
    for n in la:
        assert la[n].rank[name] == lb[n].rank[name] and la[n].alpha[name] == lb[n].alpha[name]
        assert la[n].method[name] == lb[n].method[name] and la[n].rslora[name] == lb[n].rslora[name]
        fa, fb = la[n].factors(name), lb[n].factors(name)
        assert set(fa) == set(fb) and {"lora_A", "lora_B"} <= set(fa), (n, sorted(fa), sorted(fb))
        for factor in fa:
            assert torch.equal(fa[factor], fb[factor]), (n, factor)


def small_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1),
                         nn.ReLU(), nn.Conv2d(8, 4, 1))



def small_peft_folder(tmp_path: Path) -> Path:
    """A PEFT folder (rank 2, alpha 4) on layers ``0`` and ``2`` of ``small_net()``."""
    base = small_net()
    peft_model(base, r=2, lora_alpha=4, target_modules=["0", "2"]).save_pretrained(tmp_path / "p")
    return tmp_path / "p"
