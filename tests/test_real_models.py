"""Real architectures from timm (random weights): inject, train a few steps, merge, unload."""

from __future__ import annotations

import copy

import pytest
import timm
import torch

import convlora
from tests._core_helpers import keys_and_shapes, module_types


@pytest.mark.parametrize("arch", ["resnet18", "efficientnet_b0", "convnext_atto"])
def test_timm_inject_train_merge_unload(arch: str) -> None:
    torch.manual_seed(0)
    model = timm.create_model(arch, pretrained=False, num_classes=10).eval()
    with torch.no_grad():  # undo timm's zero-init of the last norm in each residual block, so that
        for m in model.modules():  # every conv gets a gradient, as in a trained network
            if isinstance(m, torch.nn.BatchNorm2d):
                m.weight.fill_(1.0)
    original = copy.deepcopy(model)
    x = torch.randn(2, 3, 32, 32)
    y0 = model(x)
    names = convlora.inject(model, rank=2)
    assert names and torch.equal(model(x), y0)
    if arch == "efficientnet_b0":
        depthwise = [n for n, m in convlora.lora_layers(model).items() if m.groups > 1]
        assert depthwise, "efficientnet's depthwise convs must be adapted too"
    opt = torch.optim.Adam(convlora.lora_parameters(model), lr=1e-2)  # scale-free steps
    target = torch.randint(0, 10, (2,))
    # BatchNorm stays in eval mode: with batch 2 and 1x1 maps at the end of the network, train-mode
    # statistics are degenerate; the point here is the adapters' training, merge and unload.
    for _ in range(3):
        loss = torch.nn.functional.cross_entropy(model(x), target)
        opt.zero_grad()
        loss.backward()
        opt.step()
    y1 = model(x)
    assert torch.isfinite(y1).all()
    assert all(m.lora_B["default"].abs().sum() > 0 for m in convlora.lora_layers(model).values())
    assert (y1 - y0).abs().max() > 1e-3 * y0.abs().max(), "training must have changed the output"
    with convlora.merged(model):
        torch.testing.assert_close(model(x), y1, atol=1e-4 * y1.abs().max().item(), rtol=1e-4)
    deployed = convlora.unload(model)
    assert module_types(deployed) == module_types(original)
    assert keys_and_shapes(deployed) == keys_and_shapes(original)
    torch.testing.assert_close(deployed(x), y1, atol=1e-4 * y1.abs().max().item(), rtol=1e-4)


def test_timm_vit_linear_layers_opt_in() -> None:
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8,
                              num_classes=4).eval()
    x = torch.randn(1, 3, 32, 32)
    names = convlora.inject(model, rank=2, targets=["patch_embed.proj", "blocks.*.attn.qkv"])
    assert names[0] == "patch_embed.proj" and len(names) == 13
    for p in convlora.lora_parameters(model):
        torch.nn.init.normal_(p, std=0.02)
    y = model(x)
    torch.testing.assert_close(convlora.unload(model)(x), y, atol=1e-4, rtol=1e-4)
