"""Target selection, injection, unload and their errors."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import convlora
from convlora import LoRAConfig, TargetError, UnsupportedLayerError
from tests._core_helpers import keys_and_shapes, module_types, randomize_adapters


class Block(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(c, c, 3, padding=1)
        self.c2 = nn.Conv2d(c, c, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.c2(torch.relu(self.c1(x)))


class TinySR(nn.Module):
    """A small SR network with a pixel-shuffle tail and an attention-free trunk."""

    def __init__(self, c: int = 8, scale: int = 2) -> None:
        super().__init__()
        self.head = nn.Conv2d(3, c, 3, padding=1)
        self.body = nn.Sequential(Block(c), Block(c))
        self.fuse = nn.Conv2d(c, c, 1)
        self.proj = nn.Linear(c, c)
        self.up = nn.Sequential(nn.Conv2d(c, 3 * scale * scale, 3, padding=1), nn.PixelShuffle(scale))
        self.tail = nn.Conv2d(c, 3 * 4, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        f = self.fuse(self.body(self.head(x)))
        f = self.proj(f.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        return self.up(f) + nn.functional.pixel_shuffle(self.tail(f), 2)


def test_pixel_shuffle_selector_finds_exactly_the_upsampler_convs() -> None:
    model = TinySR()
    assert convlora.inject(model, targets="pixel_shuffle") == ["up.0", "tail"]


def test_pixel_shuffle_fallback_when_tracing_fails() -> None:
    class Dynamic(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.up = nn.Sequential(nn.Conv2d(3, 12, 3, padding=1), nn.PixelShuffle(2))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            if x.sum() > 0:  # data-dependent control flow: torch.fx cannot trace this
                x = x * 2
            return self.up(x)

    assert convlora.inject(Dynamic(), targets="pixel_shuffle") == ["up.0"]


def test_globs_containers_predicates_and_exclude() -> None:
    model = TinySR()
    names = convlora.inject(copy.deepcopy(model), targets="body")
    assert names == ["body.0.c1", "body.0.c2", "body.1.c1", "body.1.c2"]
    names = convlora.inject(copy.deepcopy(model), targets=["body.*.c1", "head"], exclude="body.1*")
    assert names == ["head", "body.0.c1"]
    names = convlora.inject(copy.deepcopy(model), targets=lambda n, m: getattr(m, "kernel_size", 0) == (1, 1))
    assert names == ["fuse"]
    # Default: every conv, no linear. A container pattern does not pick up linears either.
    assert "proj" not in convlora.inject(copy.deepcopy(model))
    assert convlora.inject(copy.deepcopy(model), targets="proj") == ["proj"]


def test_patterns_give_per_layer_rank_alpha_factorization() -> None:
    model = TinySR()
    cfg = LoRAConfig(rank=2, alpha=4, targets=["body", "pixel_shuffle"], rank_pattern={"up": 8},
                     alpha_pattern={"up": 16}, factorization="loralib",
                     factorization_pattern={"tail": "kernel"})
    convlora.inject(model, cfg)
    layers = convlora.lora_layers(model)
    assert layers["body.0.c1"].rank["default"] == 2 and layers["body.0.c1"].alpha["default"] == 4
    assert layers["up.0"].rank["default"] == 8 and layers["up.0"].alpha["default"] == 16
    assert layers["tail"].factorization["default"] == "kernel"
    assert layers["up.0"].lora_A["default"].shape == (8 * 3, 8 * 3)  # loralib: (r*k, in*k)
    # alpha=None means alpha = the layer's own rank
    m2 = TinySR()
    convlora.inject(m2, rank=2, rank_pattern={"head": 3}, targets=["head", "fuse"])
    assert convlora.lora_layers(m2)["head"].alpha["default"] == 3.0


def test_inject_freezes_everything_else_and_keeps_keys() -> None:
    model = TinySR()
    keys_before = list(model.state_dict())
    convlora.inject(model)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(".lora_" in n for n in trainable)
    for k in keys_before:
        assert k in model.state_dict(), f"base key {k} must keep its name"


def test_train_merge_unload_on_small_sr_network() -> None:
    torch.manual_seed(0)
    model = TinySR().eval()
    original = copy.deepcopy(model)
    x, y = torch.rand(2, 3, 12, 12), torch.rand(2, 3, 24, 24)
    convlora.inject(model, rank=2, targets=["body", "pixel_shuffle"])
    opt = torch.optim.Adam(convlora.lora_parameters(model), lr=1e-2)
    losses = []
    for _ in range(5):
        loss = (model(x) - y).abs().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    y_unmerged = model(x)
    deployed = convlora.unload(model)
    assert module_types(deployed) == module_types(original)
    assert keys_and_shapes(deployed) == keys_and_shapes(original)
    torch.testing.assert_close(deployed(x), y_unmerged, atol=1e-5, rtol=1e-5)
    fresh = copy.deepcopy(original)
    fresh.load_state_dict(deployed.state_dict(), strict=True)


def test_unload_without_merge_restores_the_base() -> None:
    model = TinySR()
    x = torch.rand(1, 3, 8, 8)
    y0 = model(x)
    convlora.inject(model)
    randomize_adapters(model)
    convlora.merge(model)
    out = convlora.unload(model, merge=False)
    assert torch.equal(out(x), y0)


# -- errors ---------------------------------------------------------------------------------------
def test_pattern_matching_nothing_names_candidates() -> None:
    with pytest.raises(TargetError, match=r"pattern 'bdy' matched no module; similar names: \['body'"):
        convlora.inject(TinySR(), targets="bdy")


def test_no_target_matched_lists_layers() -> None:
    with pytest.raises(TargetError, match="no target layer matched.*head"):
        convlora.inject(TinySR(), targets="body", exclude="body")


def test_pixel_shuffle_selector_without_pixel_shuffle() -> None:
    with pytest.raises(TargetError, match="found no conv feeding an nn.PixelShuffle"):
        convlora.inject(nn.Sequential(nn.Conv2d(3, 3, 3)), targets="pixel_shuffle")


@pytest.mark.parametrize("rank", [0, -1, 1.5, True])
def test_invalid_rank(rank: object) -> None:
    with pytest.raises(convlora.ConvLoRAError, match="rank must be an integer >= 1"):
        convlora.inject(TinySR(), rank=rank)  # type: ignore[arg-type]


def test_rank_larger_than_layer_allows() -> None:
    model = TinySR()
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(UnsupportedLayerError, match=r"layer 'fuse': rank 9 is larger than this layer allows \(8"):
        convlora.inject(model, rank=2, rank_pattern={"fuse": 9}, targets=["head", "fuse"])
    assert not convlora.lora_layers(model), "nothing may change on failure"
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_loralib_refuses_grouped_and_non_square() -> None:
    model = nn.Sequential(nn.Conv2d(4, 4, 3, groups=2), nn.Conv2d(4, 4, (1, 3)))
    with pytest.raises(UnsupportedLayerError, match="layer '0'.*needs groups=1"):
        convlora.inject(model, rank=1, factorization="loralib", targets="0")
    with pytest.raises(UnsupportedLayerError, match="layer '1'.*needs a square kernel"):
        convlora.inject(model, rank=1, factorization="loralib", targets="1")
    with pytest.raises(convlora.ConvLoRAError, match="'svd' is not a known factorization"):
        convlora.inject(model, factorization="svd")


def test_transposed_conv_adapted_and_subclass_overriding_forward_refused() -> None:
    model = nn.Sequential(nn.Conv2d(3, 3, 3), nn.ConvTranspose2d(3, 3, 2))
    assert convlora.inject(model, rank=2) == ["0", "1"]

    class Odd(nn.ConvTranspose2d):
        def forward(self, x: torch.Tensor, output_size: list[int] | None = None) -> torch.Tensor:
            return super().forward(x, output_size) * 2

    odd = nn.Sequential(nn.Conv2d(3, 3, 3), Odd(3, 3, 2))
    with pytest.raises(UnsupportedLayerError, match=r"layer '1'.*overrides forward.*exclude=\['1'\]"):
        convlora.inject(odd, rank=2)
    assert convlora.inject(odd, rank=2, exclude="1") == ["0"]


def test_parametrized_and_hooked_convs_refused() -> None:
    wn = nn.Sequential(nn.utils.parametrizations.weight_norm(nn.Conv2d(3, 3, 3)))
    with pytest.raises(UnsupportedLayerError, match="parametrization"):
        convlora.inject(wn, rank=2)
    old = nn.Sequential(nn.utils.weight_norm(nn.Conv2d(3, 3, 3)))
    with pytest.raises(UnsupportedLayerError, match="pre-hooks"):
        convlora.inject(old, rank=2)


def test_timm_conv_subclasses_refused() -> None:
    from timm.layers import Conv2dSame, StdConv2d

    for layer in (Conv2dSame(3, 8, 3, stride=2), StdConv2d(3, 8, 3)):
        model = nn.Sequential(layer)
        with pytest.raises(UnsupportedLayerError, match=r"overrides forward\(\)"):
            convlora.inject(model)
        assert not convlora.lora_layers(model)


def test_bad_adapter_name_and_duplicate() -> None:
    model = TinySR()
    with pytest.raises(convlora.ConvLoRAError, match="must be a Python identifier"):
        convlora.inject(model, adapter_name="a.b")
    convlora.inject(model, targets="head")
    with pytest.raises(convlora.MergeStateError, match="already has an adapter named 'default'"):
        convlora.inject(model, targets="head")
