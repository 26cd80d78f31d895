"""The restoration example's two networks: shapes, receptive fields, files, and exact merging."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import convlora
from examples.restoration.model import (
    ResidualCNN,
    SmallUNet,
    build_model,
    load_model,
    receptive_field,
    save_model,
)

DILATED = [1, 2, 3, 4, 5, 4, 3, 2, 1, 1]


def _models() -> list[torch.nn.Module]:
    torch.manual_seed(0)
    return [ResidualCNN(), ResidualCNN(dilations=DILATED), SmallUNet()]


def _perturb(model: torch.nn.Module) -> torch.nn.Module:
    """Non-trivial weights everywhere (the tail starts near zero, which would hide errors)."""
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model


@pytest.mark.parametrize("hw", [(40, 40), (37, 45), (5, 6)])
def test_output_keeps_the_input_shape(hw: tuple[int, int]) -> None:
    for model in _models():
        x = torch.rand(2, 3, *hw)
        assert model(x).shape == x.shape


def test_receptive_fields() -> None:
    plain, dilated, unet = _models()
    assert receptive_field(plain) == 1 + 2 * 10  # ten 3x3 convs
    assert receptive_field(dilated) == 1 + 2 * sum(DILATED)
    assert receptive_field(unet) > 2 * receptive_field(plain)  # and wider than Levin's largest kernel (27x27)


def test_unet_crop_is_exact_on_sizes_divisible_by_four() -> None:
    """Padding happens only when needed: a 4k-sized crop of a bigger image sees the same pixels
    inside, away from the border, as the bigger image does (translation by a multiple of 4)."""
    unet = _perturb(SmallUNet()).eval()
    x = torch.rand(1, 3, 96, 96)
    with torch.no_grad():
        full, part = unet(x), unet(x[..., 16:80, 16:80])
    r = receptive_field(unet) // 2 + 4
    torch.testing.assert_close(part[..., r:-r, r:-r], full[..., 16 + r:80 - r, 16 + r:80 - r])


@pytest.mark.parametrize("index", [0, 1, 2])
def test_save_load_round_trip(tmp_path: Path, index: int) -> None:
    model = _perturb(_models()[index])
    path = save_model(model, tmp_path / "m.safetensors", extra={"task": "noise25"})
    back = load_model(path)
    assert type(back) is type(model)
    x = torch.rand(1, 3, 20, 28)
    torch.testing.assert_close(back(x), model.eval()(x), rtol=0, atol=0)


def test_loads_files_written_before_the_unet(tmp_path: Path) -> None:
    model = _perturb(ResidualCNN(channels=8, depth=4))
    old = tmp_path / "old.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(old),
              metadata={"arch": "ResidualCNN", "channels": "8", "depth": "4", "extra": json.dumps({})})
    back = load_model(old)
    assert isinstance(back, ResidualCNN) and back.dilations == [1, 1, 1, 1]
    x = torch.rand(1, 3, 12, 12)
    torch.testing.assert_close(back(x), model(x), rtol=0, atol=0)


def test_clear_errors(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="arch='VGG'"):
        build_model("VGG")
    with pytest.raises(ValueError, match="one positive dilation per conv layer"):
        ResidualCNN(depth=4, dilations=[1, 2])
    with pytest.raises(ValueError, match="three positive channel counts"):
        SmallUNet(channels=(8, 0, 8))
    bad = tmp_path / "bad.safetensors"
    save_file({"w": torch.zeros(1)}, str(bad), metadata={"arch": "SPAN"})
    with pytest.raises(ValueError, match="arch='SPAN'"):
        load_model(bad)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_model(tmp_path / "missing.safetensors")
    lora = SmallUNet()
    convlora.inject(lora, rank=1)
    with pytest.raises(ValueError, match="unload"):
        save_model(lora, tmp_path / "x.safetensors")


@pytest.mark.parametrize("index", [1, 2])
def test_adapters_merge_exactly_on_dilated_and_pixel_shuffle_convs(index: int) -> None:
    """Every conv (dilated, stride 2, and the convs feeding PixelShuffle) takes an adapter, and
    the merged, unloaded model is the original architecture with the same output."""
    model = _perturb(_models()[index]).eval()
    keys = list(model.state_dict())
    lora = copy.deepcopy(model)
    convlora.inject(lora, rank=2)
    for name, p in lora.named_parameters():
        if ".lora_B." in name:
            with torch.no_grad():
                p.normal_(0, 0.05)  # trained-looking adapters: B starts at zero
    assert sum(isinstance(m, convlora.LoRALayer) for m in lora.modules()) == \
        sum(isinstance(m, torch.nn.Conv2d) for m in model.modules())
    x = torch.rand(2, 3, 30, 34)
    with torch.no_grad():
        ref = lora(x)
        assert (ref - model(x)).abs().max() > 1e-3  # the adapter changes the output
        deploy = convlora.unload(lora, merge=True)
        assert list(deploy.state_dict()) == keys and type(deploy) is type(model)
        torch.testing.assert_close(deploy(x), ref, rtol=0, atol=1e-5)
