"""PEFT DoRA folders (``LoraConfig(use_dora=True)``) both ways, against the real PEFT package.

* PEFT -> convlora: a DoRA adapter PEFT made (random non-zero factors, magnitudes away from
  ``||W||``) loads as ``method="dora"`` and gives PEFT's outputs, unmerged and merged.
* convlora -> PEFT: a convlora DoRA adapter exported (from a model or a file) gives the same
  outputs in PEFT, and comes back bit for bit (factors and magnitudes).
* What PEFT's DoRA computes differently is refused, naming the layer and why: reflect/circular
  padding, dilation (PEFT's DoRA fails there), grouped convs whose lora_A blocks differ (PEFT's
  norm pairs channels with the wrong block); LoHa/LoKr and mixed LoRA/DoRA adapters are not
  exported. A refused call changes nothing and writes nothing.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

import convlora
from convlora import AdapterFormatError, AdapterMismatchError, UnsupportedLayerError
from tests._core_helpers import module_types
from tests._peft_helpers import (
    PEFT_MISHANDLES,
    X,
    close,
    peft_model,
    refused_load,
    same_adapters,
    small_net,
    state_copy,
    timm_model,
    unchanged,
)

peft = pytest.importorskip("peft")

pytestmark = [pytest.mark.usefixtures("one_thread"),
              pytest.mark.filterwarnings("ignore::UserWarning")]  # PEFT warns about grouped convs


def randomize_dora(model: nn.Module, seed: int, std: float = 0.3) -> None:
    """Random non-zero factors; every DoRA magnitude 1.5 to 2.5 times its channel's ``||W||``."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in convlora.lora_layers(model).values():
            for name in layer.rank:
                for factor, p in layer.factors(name).items():
                    if factor == "lora_magnitude":
                        norm = layer.weight.flatten(1).norm(dim=1)
                        p.copy_(norm * (1.5 + torch.rand(p.shape, generator=gen)))
                    else:
                        p.copy_(torch.randn(p.shape, generator=gen) * std)


def _peft_layers(pm: nn.Module) -> set[str]:
    return {n.removeprefix("base_model.model.") for n, m in pm.named_modules()
            if isinstance(m, peft.tuners.lora.LoraLayer)}


def test_peft_dora_adapter_gives_the_same_outputs_in_convlora(tmp_path: Path) -> None:
    base = timm_model("resnet18")
    pm = peft_model(base, r=4, lora_alpha=6, use_dora=True, target_modules=["conv1", "conv2", "fc"],
                    layers_to_transform=[0], layers_pattern="layer2", rank_pattern={"conv2": 2},
                    alpha_pattern={"fc": 1.5}, use_rslora=True, bias="lora_only", lora_dropout=0.1)
    with torch.no_grad():
        pm.base_model.model.fc.bias.add_(0.05)
    pm.save_pretrained(tmp_path / "peft")
    ref = pm(X)
    model = copy.deepcopy(base)
    with pytest.warns(UserWarning, match="lora_dropout=0.1 is not loaded: convlora's DoRA has no dropout"):
        convlora.load_peft_adapter(model, tmp_path / "peft")
    layers = convlora.lora_layers(model)
    assert set(layers) == _peft_layers(pm) == {"conv1", "layer2.0.conv1", "layer2.0.conv2", "fc"}
    assert {lyr.method["default"] for lyr in layers.values()} == {"dora"}
    assert layers["layer2.0.conv2"].rank["default"] == 2
    close(model(X), ref, base(X))
    convlora.merge(model)
    close(model(X), ref, base(X))


SMALL_NETS = {  # (layers, input shape): layers where PEFT's DoRA is exact
    "conv1d": (lambda: [nn.Conv1d(3, 6, 3, padding=1), nn.ReLU(), nn.Conv1d(6, 4, 1, stride=2)], (2, 3, 7)),
    "conv3d": (lambda: [nn.Conv3d(3, 6, 3, padding=1), nn.ReLU(), nn.Conv3d(6, 4, 1, stride=2)], (2, 3, 5, 5, 5)),
    "same_and_unpadded_reflect": (lambda: [nn.Conv2d(3, 6, 3, padding="same"), nn.ReLU(),
                                           nn.Conv2d(6, 4, 1, padding_mode="reflect")], (2, 3, 7, 7)),
}


@pytest.mark.parametrize("case", sorted(SMALL_NETS))
def test_peft_dora_on_small_convs_both_ways(case: str, tmp_path: Path) -> None:
    make, shape = SMALL_NETS[case]
    torch.manual_seed(0)
    base = nn.Sequential(*make())
    x = torch.randn(shape)
    pm = peft_model(base, r=2, lora_alpha=3, use_dora=True, target_modules=["0", "2"])
    pm.save_pretrained(tmp_path / "peft")
    model = copy.deepcopy(base)
    convlora.load_peft_adapter(model, tmp_path / "peft")
    close(model(x), pm(x), base(x))
    folder = convlora.save_peft_adapter(model, tmp_path / "back")  # PEFT's own tensors, bit for bit
    theirs, ours = load_file(str(tmp_path / "peft" / "adapter_model.safetensors")), load_file(
        str(folder / "adapter_model.safetensors"))
    assert set(theirs) == set(ours) and all(torch.equal(theirs[k], ours[k]) for k in theirs)
    convlora.merge(model)
    close(model(x), pm(x), base(x))


CONVLORA_CASES = {
    "resnet_conv_linear_patterns_bias": ("resnet18", dict(
        rank=3, alpha=5.0, targets=["layer1.0.*", "layer2.0.downsample.0", "fc"],
        rank_pattern={"layer1.0.conv2": 1}, alpha_pattern={"fc": 0.7}), "lora_only"),
    # depthwise and grouped-free pointwise convs: PEFT's DoRA is exact on the export's equal
    # lora_A blocks (PEFT cannot merge grouped convs, its unmerged output is right)
    "mobilenet_depthwise_and_pointwise": ("mobilenetv3_small_050", dict(
        rank=2, alpha=1.3, targets=["blocks.0.0.conv_dw", "blocks.1.0.conv_dw", "blocks.1.0.conv_pw*"]), "none"),
}


@pytest.mark.parametrize("case", sorted(CONVLORA_CASES))
def test_exported_dora_gives_the_same_outputs_in_peft_and_round_trips(case: str, tmp_path: Path) -> None:
    arch, kw, bias = CONVLORA_CASES[case]
    base = timm_model(arch)
    model = copy.deepcopy(base)
    convlora.inject(model, method="dora", **kw)
    randomize_dora(model, seed=2)
    if bias != "none":
        convlora.mark_only_lora_trainable(model, bias=bias)
        with torch.no_grad():
            model.fc.bias.add_(0.05)
    folder = convlora.save_peft_adapter(model, tmp_path / "peft", bias=bias)
    cfg = json.loads((folder / "adapter_config.json").read_text())
    assert cfg["use_dora"] is True and cfg["lora_dropout"] == 0.0
    pm = peft.PeftModel.from_pretrained(copy.deepcopy(base), folder).eval()
    assert _peft_layers(pm) == set(convlora.lora_layers(model))
    close(pm(X), model(X), base(X))
    back = copy.deepcopy(base)
    convlora.load_peft_adapter(back, folder)
    same_adapters(model, back)
    for k, v in model.state_dict().items():  # magnitudes and biases included
        assert torch.equal(back.state_dict()[k], v), k


def test_dora_file_conversion_round_trip_is_bit_exact(tmp_path: Path) -> None:
    base = timm_model("resnet18")
    model = copy.deepcopy(base)
    convlora.inject(model, rank=2, alpha=0.3, targets=["layer3.*", "fc"], rank_pattern={"fc": 4},
                    method="dora")
    randomize_dora(model, seed=4)
    src = convlora.save_adapter(model, tmp_path / "a.safetensors")
    folder = convlora.peft.convlora_to_peft(src, tmp_path / "peft")
    pm = peft.PeftModel.from_pretrained(copy.deepcopy(base), folder).eval()
    close(pm(X), model(X), base(X))
    out = convlora.peft.peft_to_convlora(folder, base.state_dict(), tmp_path / "b.safetensors")
    t1, m1 = convlora.read_adapter(src)
    t2, m2 = convlora.read_adapter(out)
    assert any(k.endswith(".lora_magnitude") for k in t1)
    assert set(t1) == set(t2) and all(torch.equal(t1[k], t2[k]) for k in t1)
    for n, lm in m1["layers"].items():
        for field in ("rank", "alpha", "weight_shape", "groups", "factorization", "method", "rslora"):
            assert m2["layers"][n][field] == lm[field], (n, field)
    fresh = copy.deepcopy(base)
    convlora.load_adapter(fresh, out)
    assert torch.equal(fresh(X), model(X))


@pytest.mark.parametrize("method", ["loha", "lokr"])
def test_loha_and_lokr_are_not_exported(method: str, tmp_path: Path) -> None:
    model = small_net()
    convlora.inject(model, rank=2, targets=["2"], method=method)
    with pytest.raises(UnsupportedLayerError, match=rf"layer '2' uses method '{method}'; the PEFT export "
                       "writes 'lora' and 'dora' adapters only"):
        convlora.save_peft_adapter(model, tmp_path / "out")
    src = convlora.save_adapter(model, tmp_path / "a.safetensors")
    with pytest.raises(UnsupportedLayerError, match=rf"method '{method}'.*'lora' and 'dora'"):
        convlora.peft.convlora_to_peft(src, tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.safetensors"]


def test_mixed_lora_and_dora_layers_are_not_exported(tmp_path: Path) -> None:
    model = small_net()
    convlora.inject(model, rank=2, targets=["0", "2"], method_pattern={"2": "dora"})
    with pytest.raises(UnsupportedLayerError, match=r"mixes 'lora' and 'dora' layers \(DoRA on \['2'\]\); "
                       "PEFT's use_dora is one value"):
        convlora.save_peft_adapter(model, tmp_path / "out")
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("layer, match", PEFT_MISHANDLES)
def test_dora_on_layers_peft_mishandles_is_refused_both_ways(layer: nn.Module, match: str,
                                                             tmp_path: Path) -> None:
    base = small_net()
    base[2] = layer
    model = copy.deepcopy(base)
    convlora.inject(model, rank=2, targets=["0", "2"], method="dora")
    with pytest.raises(UnsupportedLayerError, match=rf"layer '2'.*{match}"):
        convlora.save_peft_adapter(model, tmp_path / "out")
    assert not list(tmp_path.iterdir())
    ok = copy.deepcopy(base)
    ok[2] = nn.Conv2d(8, 8, 3, padding=1)
    peft_model(ok, r=2, use_dora=True, target_modules=["0", "2"]).save_pretrained(tmp_path / "p")
    refused_load(copy.deepcopy(base), tmp_path / "p", UnsupportedLayerError, rf"layer '2'.*{match}")


def _grouped_peft_dora(base: nn.Module, equal_blocks: bool) -> nn.Module:
    """PEFT DoRA (rank 1 per group) on the grouped conv ``base[0]`` with a block-diagonal lora_A."""
    conv = base[0]
    g = conv.groups
    pm = peft_model(base, r=g, lora_alpha=3, use_dora=True, target_modules=["0"])
    with torch.no_grad():
        a = pm.base_model.model[0].lora_A["default"].weight
        cg = a.shape[1] // g
        mask = torch.zeros_like(a)
        for j in range(g):
            mask[j, j * cg:(j + 1) * cg] = 1
            if equal_blocks and j:
                a[j, j * cg:(j + 1) * cg] = a[0, :cg]
        a.mul_(mask)
    return pm


def test_grouped_dora_with_dense_lora_a_is_refused(tmp_path: Path) -> None:
    torch.manual_seed(0)
    base = nn.Sequential(nn.Conv2d(4, 6, 3, padding=1, groups=2), nn.ReLU(), nn.Conv2d(6, 3, 1))
    peft_model(base, r=2, use_dora=True, target_modules=["0", "2"]).save_pretrained(tmp_path / "p")
    refused_load(copy.deepcopy(base), tmp_path / "p", UnsupportedLayerError,
                 r"'0' is a grouped conv \(groups=2\).*dense")


@pytest.mark.parametrize("groups, out, equal_blocks, exact", [
    (2, 6, True, True), (2, 6, False, False), (4, 4, False, True), (4, 8, False, False)])
def test_grouped_dora_import_is_exact_or_refused(groups: int, out: int, equal_blocks: bool, exact: bool,
                                                 tmp_path: Path) -> None:
    """PEFT's DoRA on a grouped conv with a block-diagonal lora_A is DoRA when the blocks are
    equal or each group has one output channel: convlora loads it with PEFT's outputs. Otherwise
    PEFT's norm is not ``||W + s * delta||`` (measured: its output differs from that DoRA's),
    and the import is refused."""
    torch.manual_seed(0)
    base = nn.Sequential(nn.Conv2d(4, out, 3, padding=1, groups=groups), nn.ReLU(), nn.Conv2d(out, 3, 1))
    x = torch.randn(2, 4, 7, 7)
    pm = _grouped_peft_dora(base, equal_blocks)
    pm.save_pretrained(tmp_path / "p")
    model = copy.deepcopy(base)
    if exact:
        convlora.load_peft_adapter(model, tmp_path / "p")
        close(model(x), pm(x), base(x))
        convlora.merge(model)
        close(model(x), pm(x), base(x))
        return
    refused_load(model, tmp_path / "p", UnsupportedLayerError, rf"layer '0' is a grouped conv \(groups={groups}, "
                 f"{out // groups} output channels per group\\) whose PEFT DoRA lora_A blocks differ")
    # Why: the same delta as a convlora DoRA (a LoRA holds it exactly) computes another output.
    lora = copy.deepcopy(base)
    tensors = load_file(str(tmp_path / "p" / "adapter_model.safetensors"))
    (tmp_path / "p" / "adapter_config.json").write_text(json.dumps(
        {**json.loads((tmp_path / "p" / "adapter_config.json").read_text()), "use_dora": False}))
    magnitude = tensors.pop("base_model.model.0.lora_magnitude_vector")
    save_file(tensors, str(tmp_path / "p" / "adapter_model.safetensors"))
    convlora.load_peft_adapter(lora, tmp_path / "p")
    layer = convlora.lora_layers(lora)["0"]
    dora = copy.deepcopy(base)
    convlora.inject(dora, rank=layer.rank["default"], alpha=layer.alpha["default"], targets=["0"], method="dora")
    with torch.no_grad():
        for factor, p in convlora.lora_layers(dora)["0"].factors("default").items():
            p.copy_(magnitude.reshape(-1) if factor == "lora_magnitude" else layer.factors("default")[factor])
        gap = (dora(x) - pm(x)).abs().max().item()
    assert gap > 1e-3 * pm(x).abs().max().item(), gap


def test_broken_dora_folders_are_refused(tmp_path: Path) -> None:
    base = small_net()
    peft_model(base, r=2, use_dora=True, target_modules=["0", "2"]).save_pretrained(tmp_path / "p")
    weights, config = tmp_path / "p" / "adapter_model.safetensors", tmp_path / "p" / "adapter_config.json"
    good = load_file(str(weights))
    key = "base_model.model.2.lora_magnitude_vector"
    model = copy.deepcopy(base)
    before, types = state_copy(model), module_types(model)
    save_file({**good, key: good[key].reshape(-1)}, str(weights))
    with pytest.raises(AdapterMismatchError, match=r"2\.lora_magnitude_vector has shape \(8,\); this layer "
                       r"\(weight \(8, 8, 3, 3\)\) needs \(1, 8, 1, 1\)"):
        convlora.load_peft_adapter(model, tmp_path / "p")
    save_file({k: v for k, v in good.items() if k != key}, str(weights))
    with pytest.raises(AdapterFormatError, match=r"2\.lora_magnitude_vector is missing"):
        convlora.load_peft_adapter(model, tmp_path / "p")
    save_file(good, str(weights))
    config.write_text(json.dumps({**json.loads(config.read_text()), "use_dora": False}))
    with pytest.raises(AdapterFormatError, match=r"'use_dora'=False does not allow the DoRA magnitude"):
        convlora.load_peft_adapter(model, tmp_path / "p")
    unchanged(model, before, types)
