"""How PEFT's factors map onto convlora's layers, against the real PEFT package: grouped convs
(block-diagonal lora_A both ways, dense lora_A refused), Conv1d/Conv3d, the layers PEFT computes
differently (padding modes, dilation) and loralib refused both ways."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from torch import nn

import convlora
from convlora import UnsupportedLayerError
from tests._core_helpers import randomize_adapters
from tests._peft_helpers import (
    PEFT_MISHANDLES,
    close,
    peft_model,
    refused_load,
    same_adapters,
    small_net,
    timm_model,
)

peft = pytest.importorskip("peft")

pytestmark = [pytest.mark.usefixtures("one_thread"),
              pytest.mark.filterwarnings("ignore::UserWarning")]  # PEFT warns about grouped convs


@pytest.mark.parametrize("arch, layer", [("mobilenetv3_small_050", "blocks.1.0.conv_dw"),
                                         ("convnext_atto", "stages.0.blocks.0.conv_dw")])
def test_peft_adapter_on_a_depthwise_conv_is_refused(arch: str, layer: str, tmp_path: Path) -> None:
    base = timm_model(arch)
    groups = base.get_submodule(layer).groups
    pm = peft_model(base, r=groups, lora_alpha=groups, target_modules=[layer, "conv_pwl", "fc1"])
    pm.save_pretrained(tmp_path / "peft")
    refused_load(copy.deepcopy(base), tmp_path / "peft", UnsupportedLayerError, rf"{layer}.*groups={groups}.*dense")


def test_grouped_export_is_rank_r_times_groups_block_diagonal(tmp_path: Path) -> None:
    torch.manual_seed(0)
    base = nn.Sequential(nn.Conv2d(4, 6, 3, padding=1, groups=2), nn.ReLU(), nn.Conv2d(6, 6, 1))
    model = copy.deepcopy(base)
    convlora.inject(model, rank=2, alpha=3.0, targets=["0"])
    randomize_adapters(model, seed=3)
    folder = convlora.save_peft_adapter(model, tmp_path / "p")
    from safetensors.torch import load_file
    a = load_file(str(folder / "adapter_model.safetensors"))["base_model.model.0.lora_A.weight"]
    cfg = json.loads((folder / "adapter_config.json").read_text())
    assert tuple(a.shape) == (4, 4, 3, 3) and cfg["r"] == 4 and cfg["lora_alpha"] == 6.0
    assert a[:2, 2:].count_nonzero() == 0 and a[2:, :2].count_nonzero() == 0
    assert torch.equal(a[:2, :2], a[2:, 2:])
    x = torch.randn(2, 4, 7, 7)
    pm = peft.PeftModel.from_pretrained(copy.deepcopy(base), folder).eval()
    close(pm(x), model(x), base(x))


@pytest.mark.parametrize("conv", [nn.Conv1d, nn.Conv3d])
def test_conv1d_and_conv3d(conv: type[nn.Module], tmp_path: Path) -> None:
    torch.manual_seed(0)
    base = nn.Sequential(conv(3, 6, 3, padding=1), nn.ReLU(), conv(6, 4, 3, stride=2, padding="valid"))
    x = torch.randn((1, 3) + (6,) * (1 if conv is nn.Conv1d else 3))
    model = copy.deepcopy(base)
    convlora.inject(model, rank=2, alpha=3.0)
    randomize_adapters(model, seed=7, std=0.3)
    folder = convlora.save_peft_adapter(model, tmp_path / "p")
    pm = peft.PeftModel.from_pretrained(copy.deepcopy(base), folder).eval()
    close(pm(x), model(x), base(x))
    back = copy.deepcopy(base)
    convlora.load_peft_adapter(back, folder)
    same_adapters(model, back)


def test_grouped_import_with_block_diagonal_lora_a_is_exact(tmp_path: Path) -> None:
    """A PEFT adapter on a grouped conv whose lora_A has zeros off the group blocks (different
    blocks per group) is a weight delta: convlora holds it at rank r with a block-diagonal B."""
    from safetensors.torch import load_file, save_file
    torch.manual_seed(0)
    base = nn.Sequential(nn.Conv2d(4, 6, 3, padding=1, groups=2), nn.ReLU(), nn.Conv2d(6, 6, 1))
    pm = peft_model(base, r=4, lora_alpha=2, target_modules=["0"])
    with torch.no_grad():
        a = pm.base_model.model[0].lora_A["default"].weight
        a[:2, 2:] = 0
        a[2:, :2] = 0
    pm.save_pretrained(tmp_path / "p")
    x = torch.randn(2, 4, 7, 7)
    model = copy.deepcopy(base)
    convlora.load_peft_adapter(model, tmp_path / "p")
    assert convlora.lora_layers(model)["0"].rank["default"] == 4
    close(model(x), pm(x), base(x))
    convlora.merge(model)  # PEFT cannot merge a grouped conv; convlora can, with the same output
    close(model(x), pm(x), base(x))
    weights = tmp_path / "p" / "adapter_model.safetensors"  # one off-block entry: refused
    tensors = load_file(str(weights))
    tensors["base_model.model.0.lora_A.weight"][0, 3, 1, 1] = 1e-3
    save_file(tensors, str(weights))
    with pytest.raises(UnsupportedLayerError, match="'0' is a grouped conv"):
        convlora.load_peft_adapter(copy.deepcopy(base), tmp_path / "p")


@pytest.mark.parametrize("layer, match", PEFT_MISHANDLES)
def test_layers_peft_mishandles_are_refused_both_ways(layer: nn.Module, match: str,
                                                      tmp_path: Path) -> None:
    base = small_net()
    base[2] = layer
    model = copy.deepcopy(base)
    convlora.inject(model, rank=2, targets=["0", "2"])
    with pytest.raises(UnsupportedLayerError, match=rf"layer '2'.*{match}"):
        convlora.save_peft_adapter(model, tmp_path / "out")
    assert not (tmp_path / "out").exists() and not list(tmp_path.iterdir())
    convlora.save_adapter(model, tmp_path / "a.safetensors")
    with pytest.raises(UnsupportedLayerError, match=match):
        convlora.peft.convlora_to_peft(tmp_path / "a.safetensors", tmp_path / "out")
    assert not (tmp_path / "out").exists()
    # A PEFT folder on such a layer (PEFT computes something else there) is refused on import.
    ok = copy.deepcopy(base)
    ok[2] = nn.Conv2d(8, 8, 3, padding=1)
    peft_model(ok, r=2, target_modules=["0", "2"]).save_pretrained(tmp_path / "p")
    refused_load(copy.deepcopy(base), tmp_path / "p", UnsupportedLayerError, rf"layer '2'.*{match}")


def test_loralib_factorization_is_refused_on_export(tmp_path: Path) -> None:
    model = small_net()
    convlora.inject(model, rank=2, factorization="loralib", targets=["2"])
    with pytest.raises(UnsupportedLayerError, match="'loralib' factorization, which PEFT's format cannot hold"):
        convlora.save_peft_adapter(model, tmp_path / "out")
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("mode", ["reflect", "circular"])
def test_peft_itself_is_not_a_weight_delta_on_padded_or_dilated_convs(mode: str) -> None:
    """Why those layers are refused: PEFT's side path pads with zeros (its unmerged output is not
    its own merged output) and ignores dilation (its side path has another output size)."""
    torch.manual_seed(0)
    x = torch.randn(1, 3, 8, 8)
    pm = peft_model(nn.Sequential(nn.Conv2d(3, 4, 3, padding=1, padding_mode=mode)), r=2,
                     target_modules=["0"])
    unmerged = pm(x)
    merged = pm.merge_and_unload()(x)
    assert (unmerged - merged).abs().max() > 1e-3
    dilated = peft_model(nn.Sequential(nn.Conv2d(3, 4, 3, padding=2, dilation=2)), r=2,
                          target_modules=["0"])
    with pytest.raises(RuntimeError, match="size"):
        dilated(x)

