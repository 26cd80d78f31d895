"""PEFT adapter folders both ways, against the real PEFT package on timm models (random weights).

* PEFT -> convlora: an adapter PEFT made (random non-zero factors) gives the same outputs in
  convlora as in PEFT.
* convlora -> PEFT: an adapter exported by convlora gives the same outputs in PEFT.
* convlora -> PEFT -> convlora: the same tensors, bit for bit.
* Refusals: depthwise convs PEFT adapted (dense lora_A), layers PEFT mishandles, loralib,
  config fields convlora cannot honour; a refused call changes nothing.
"""

from __future__ import annotations

import copy
import json
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

import convlora
from convlora import AdapterFormatError, AdapterMismatchError, ConvLoRAError, UnsupportedLayerError
from tests._core_helpers import keys_and_shapes, module_types, randomize_adapters

peft = pytest.importorskip("peft")
timm = pytest.importorskip("timm")

pytestmark = [pytest.mark.usefixtures("one_thread"),
              pytest.mark.filterwarnings("ignore::UserWarning")]  # PEFT warns about grouped convs

X = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(0))


def _timm(arch: str) -> nn.Module:
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


def _peft_model(base: nn.Module, seed: int = 1, **config: Any) -> nn.Module:
    """A PEFT model of a copy of ``base`` with random non-zero LoRA factors."""
    pm = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(**config)).eval()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if ".lora_A." in n or ".lora_B." in n:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
    return pm


def _close(out: torch.Tensor, ref: torch.Tensor, base_out: torch.Tensor) -> None:
    """Same outputs up to float rounding, and the adapter visibly changes them."""
    scale = ref.abs().max().item()
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5 * scale)
    assert (ref - base_out).abs().max().item() > 1e-2 * scale, "the adapter must change the output"


def _state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def _unchanged(model: nn.Module, before: dict[str, torch.Tensor], types: list[tuple[str, type]]) -> None:
    assert module_types(model) == types
    after = model.state_dict()
    assert set(after) == set(before) and all(torch.equal(after[k], before[k]) for k in before)


def _same_adapters(a: nn.Module, b: nn.Module, name: str = "default") -> None:
    la, lb = convlora.lora_layers(a), convlora.lora_layers(b)
    assert set(la) == set(lb) and la
    for n in la:
        assert la[n].rank[name] == lb[n].rank[name] and la[n].alpha[name] == lb[n].alpha[name]
        assert torch.equal(la[n].lora_A[name], lb[n].lora_A[name])
        assert torch.equal(la[n].lora_B[name], lb[n].lora_B[name])


# -- PEFT -> convlora -------------------------------------------------------------------------
PEFT_CASES: dict[str, tuple[str, dict[str, Any]]] = {
    "resnet_list_patterns_rslora_head": ("resnet18", dict(
        r=4, lora_alpha=8, target_modules=["conv1", "conv2"], layers_to_transform=[0],
        layers_pattern="layer1", rank_pattern={"layer1.0.conv1": 2}, alpha_pattern={"conv2": 3.5},
        use_rslora=True, modules_to_save=["fc"])),
    "resnet_regex_exclude_bias_all": ("resnet18", dict(
        r=3, lora_alpha=6, target_modules=r"layer[34]\..*conv\d|fc", exclude_modules=["layer4.1.conv2"],
        bias="all", lora_dropout=0.1)),
    "mobilenet_pointwise": ("mobilenetv3_small_050", dict(
        r=2, lora_alpha=4, target_modules=r".*\.conv_pwl?", bias="lora_only")),
    "convnext_pointwise": ("convnext_atto", dict(
        r=2, lora_alpha=2, target_modules=["fc1", "fc2"], exclude_modules=r"stages\.[23]\..*")),
}


@pytest.mark.parametrize("case", list(PEFT_CASES))
def test_peft_adapter_gives_the_same_outputs_in_convlora(case: str, tmp_path: Path) -> None:
    arch, config = PEFT_CASES[case]
    base = _timm(arch)
    pm = _peft_model(base, **config)
    with torch.no_grad():  # trained heads and biases: make them differ from the base
        for n, p in pm.named_parameters():
            if "modules_to_save" in n or (p.requires_grad and n.endswith("bias")):
                p.add_(0.05)
    pm.save_pretrained(tmp_path / "peft")
    ref = pm(X)
    model = copy.deepcopy(base)
    assert convlora.load_peft_adapter(model, tmp_path / "peft") == "default"
    peft_layers = {n.removeprefix("base_model.model.") for n, m in pm.named_modules()
                   if isinstance(m, peft.tuners.lora.LoraLayer)}
    assert set(convlora.lora_layers(model)) == peft_layers
    _close(model(X), ref, base(X))
    convlora.merge(model)  # and merged, as deployed
    _close(model(X), ref, base(X))


@pytest.mark.parametrize("arch, layer", [("mobilenetv3_small_050", "blocks.1.0.conv_dw"),
                                         ("convnext_atto", "stages.0.blocks.0.conv_dw")])
def test_peft_adapter_on_a_depthwise_conv_is_refused(arch: str, layer: str, tmp_path: Path) -> None:
    base = _timm(arch)
    groups = base.get_submodule(layer).groups
    pm = _peft_model(base, r=groups, lora_alpha=groups, target_modules=[layer, "conv_pwl", "fc1"])
    pm.save_pretrained(tmp_path / "peft")
    model = copy.deepcopy(base)
    before, types = _state(model), module_types(model)
    with pytest.raises(UnsupportedLayerError, match=rf"{layer}.*groups={groups}.*dense"):
        convlora.load_peft_adapter(model, tmp_path / "peft")
    _unchanged(model, before, types)


# -- convlora -> PEFT -------------------------------------------------------------------------
CONVLORA_CASES: dict[str, tuple[str, dict[str, Any], str]] = {
    "resnet_patterns_linear_bias_all": ("resnet18", dict(
        rank=3, alpha=5.0, targets=["layer1.*", "layer2.0.downsample.0", "fc"],
        rank_pattern={"layer1.1.conv2": 1}, alpha_pattern={"fc": 0.7}), "all"),
    "mobilenet_pointwise_lora_only": ("mobilenetv3_small_050", dict(
        rank=2, alpha=3.0, targets=["blocks.*.conv_pw*", "conv_head"]), "lora_only"),
    "mobilenet_depthwise_grouped": ("mobilenetv3_small_050", dict(
        rank=2, alpha=1.3, targets=["blocks.0.0.conv_dw", "blocks.1.0.conv_dw"]), "none"),
    "convnext_pointwise": ("convnext_atto", dict(
        rank=2, alpha=4.0, targets=["stages.*.mlp.fc*", "stages.1.downsample.1"]), "none"),
}


@pytest.mark.parametrize("case", list(CONVLORA_CASES))
def test_exported_adapter_gives_the_same_outputs_in_peft_and_round_trips(case: str,
                                                                        tmp_path: Path) -> None:
    arch, kw, bias = CONVLORA_CASES[case]
    base = _timm(arch)
    model = copy.deepcopy(base)
    convlora.inject(model, **kw)
    randomize_adapters(model, seed=2, std=0.3)
    if bias != "none":
        convlora.mark_only_lora_trainable(model, bias=bias)
        with torch.no_grad():
            for n, p in model.named_parameters():
                if p.requires_grad and n.endswith("bias"):
                    p.add_(0.05)
    folder = convlora.save_peft_adapter(model, tmp_path / "peft", bias=bias)
    assert sorted(p.name for p in folder.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    pm = peft.PeftModel.from_pretrained(copy.deepcopy(base), folder).eval()
    peft_layers = {n.removeprefix("base_model.model.") for n, m in pm.named_modules()
                   if isinstance(m, peft.tuners.lora.LoraLayer)}
    assert peft_layers == set(convlora.lora_layers(model))
    _close(pm(X), model(X), base(X))
    back = copy.deepcopy(base)
    convlora.load_peft_adapter(back, folder)
    _same_adapters(model, back)
    for k, v in model.state_dict().items():  # biases included
        assert torch.equal(back.state_dict()[k], v), k


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
    _close(pm(x), model(x), base(x))


# -- convert, without model code ---------------------------------------------------------------
def test_file_conversion_round_trip_is_bit_exact(tmp_path: Path) -> None:
    base = _timm("resnet18")
    model = copy.deepcopy(base)
    convlora.inject(model, rank=2, alpha=0.3, targets=["layer2.*", "fc"], rank_pattern={"fc": 4})
    randomize_adapters(model, seed=4)
    convlora.mark_only_lora_trainable(model, bias="lora_only")
    with torch.no_grad():
        model.fc.bias.add_(0.5)
    src = convlora.save_adapter(model, tmp_path / "a.safetensors", bias="lora_only")
    folder = convlora.peft.convlora_to_peft(src, tmp_path / "peft")
    pm = peft.PeftModel.from_pretrained(copy.deepcopy(base), folder).eval()
    _close(pm(X), model(X), base(X))
    out = convlora.peft.peft_to_convlora(folder, base.state_dict(), tmp_path / "b.safetensors")
    t1, m1 = convlora.read_adapter(src)
    t2, m2 = convlora.read_adapter(out)
    assert set(t1) == set(t2) and all(torch.equal(t1[k], t2[k]) for k in t1)
    for n, lm in m1["layers"].items():
        for field in ("rank", "alpha", "weight_shape", "groups", "factorization"):
            assert m2["layers"][n][field] == lm[field], (n, field)
    assert m2["base_fingerprint"] == m1["base_fingerprint"] and m2["bias"] == m1["bias"] == "lora_only"
    assert m2["bias_keys"] == m1["bias_keys"] == ["fc.bias"]
    fresh = copy.deepcopy(base)
    convlora.load_adapter(fresh, out)
    assert torch.equal(fresh(X), model(X))


# -- refusals ----------------------------------------------------------------------------------
def _small() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1),
                         nn.ReLU(), nn.Conv2d(8, 4, 1))


@pytest.mark.parametrize("layer, match", [
    (nn.Conv2d(8, 8, 3, padding=1, padding_mode="reflect"), "padding_mode='reflect'.*zeros"),
    (nn.Conv2d(8, 8, 3, padding=1, padding_mode="circular"), "padding_mode='circular'"),
    (nn.Conv2d(8, 8, 3, padding=2, dilation=2), r"dilation \(2, 2\)"),
])
def test_layers_peft_mishandles_are_refused_both_ways(layer: nn.Module, match: str,
                                                      tmp_path: Path) -> None:
    base = _small()
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
    _peft_model(ok, r=2, target_modules=["0", "2"]).save_pretrained(tmp_path / "p")
    fresh = copy.deepcopy(base)
    before, types = _state(fresh), module_types(fresh)
    with pytest.raises(UnsupportedLayerError, match=rf"layer '2'.*{match}"):
        convlora.load_peft_adapter(fresh, tmp_path / "p")
    _unchanged(fresh, before, types)


def test_loralib_factorization_is_refused_on_export(tmp_path: Path) -> None:
    model = _small()
    convlora.inject(model, rank=2, factorization="loralib", targets=["2"])
    with pytest.raises(UnsupportedLayerError, match="'loralib' factorization, which PEFT's format cannot hold"):
        convlora.save_peft_adapter(model, tmp_path / "out")
    assert not list(tmp_path.iterdir())


def test_output_folder_is_never_overwritten(tmp_path: Path) -> None:
    model = _small()
    convlora.inject(model, rank=2)
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("x")
    with pytest.raises(ConvLoRAError, match="already exists"):
        convlora.save_peft_adapter(model, tmp_path / "out")
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["keep.txt"]
    (tmp_path / "empty").mkdir()
    convlora.save_peft_adapter(model, tmp_path / "empty")  # an empty folder is fine
    assert len(list((tmp_path / "empty").iterdir())) == 2


@pytest.fixture()
def peft_folder(tmp_path: Path) -> Path:
    base = _small()
    _peft_model(base, r=2, lora_alpha=4, target_modules=["0", "2"]).save_pretrained(tmp_path / "p")
    return tmp_path / "p"


def _edit(folder: Path, change: Callable[[dict[str, Any]], None]) -> None:
    path = folder / "adapter_config.json"
    cfg = json.loads(path.read_text())
    change(cfg)
    path.write_text(json.dumps(cfg))


@pytest.mark.parametrize("field, value, match", [
    ("use_dora", True, "'use_dora'=True is not supported: DoRA"),
    ("lora_bias", True, "'lora_bias'=True is not supported"),
    ("fan_in_fan_out", True, "'fan_in_fan_out'=True"),
    ("init_lora_weights", "pissa", "'init_lora_weights'='pissa' modifies the base weights"),
    ("init_lora_weights", "loftq", "'init_lora_weights'='loftq'"),
    ("r", 0, "'r'=0 must be an integer"),
    ("lora_alpha", "8", "'lora_alpha'='8' must be a positive number"),
    ("bias", "some", "'bias'='some' is not one of"),
    ("target_modules", "conv[", "'target_modules'='conv\\[' is not a valid regular expression"),
    ("target_modules", None, "'target_modules'=None"),
    ("rank_pattern", {"0": -1}, "'rank_pattern'"),
    ("peft_type", "LOHA", "'peft_type'='LOHA'"),
    ("brand_new_option", {"on": 1}, "'brand_new_option'.* unknown to convlora"),
    ("target_modules", ["0"], "does not select the layers the weights adapt.*unselected layers \\['2'\\]"),
    ("exclude_modules", ["2"], "does not select the layers"),
    ("bias", "all", None),  # allowed: the file simply holds no biases
    ("brand_new_option", None, None),  # unknown but off: accepted
])
def test_config_fields_are_honoured_or_refused_naming_them(peft_folder: Path, field: str, value: Any,
                                                           match: str | None) -> None:
    _edit(peft_folder, lambda c: c.__setitem__(field, value))
    model = _small()
    before, types = _state(model), module_types(model)
    if match is None:
        convlora.load_peft_adapter(model, peft_folder)
        return
    with pytest.raises(AdapterFormatError, match=match):
        convlora.load_peft_adapter(model, peft_folder)
    _unchanged(model, before, types)


def test_malformed_folder_is_refused(peft_folder: Path, tmp_path: Path) -> None:
    model = _small()
    (peft_folder / "adapter_config.json").write_text("{not json")
    with pytest.raises(AdapterFormatError, match="not valid JSON"):
        convlora.load_peft_adapter(model, peft_folder)
    (peft_folder / "adapter_config.json").write_text("[1, 2]")
    with pytest.raises(AdapterFormatError, match="not a JSON object"):
        convlora.load_peft_adapter(model, peft_folder)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        convlora.load_peft_adapter(model, tmp_path / "nowhere")


def test_bias_tensors_must_agree_with_the_bias_mode(tmp_path: Path) -> None:
    base = _small()
    pm = _peft_model(base, r=2, target_modules=["2"], bias="all")
    pm.save_pretrained(tmp_path / "p")
    _edit(tmp_path / "p", lambda c: c.__setitem__("bias", "none"))
    with pytest.raises(AdapterFormatError, match="'bias'='none' does not allow the bias tensor"):
        convlora.load_peft_adapter(copy.deepcopy(base), tmp_path / "p")


def test_weights_that_do_not_fit_the_model_are_refused(peft_folder: Path) -> None:
    other = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 6, 3, padding=1))
    before, types = _state(other), module_types(other)
    with pytest.raises(AdapterMismatchError, match=r"2\.lora_B\.weight has shape"):
        convlora.load_peft_adapter(other, peft_folder)
    _unchanged(other, before, types)


def test_loads_beside_other_adapters(peft_folder: Path) -> None:
    model = _small()
    convlora.inject(model, rank=2, targets=["2", "4"], adapter_name="mine")
    randomize_adapters(model, seed=5)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        convlora.load_peft_adapter(model, peft_folder, name="peft")
    assert convlora.active_adapter(model) == "peft" and set(convlora.list_adapters(model)) == {"mine", "peft"}
    assert convlora.lora_layers(model)["4"].active_adapter is None
    with pytest.raises(AdapterMismatchError, match="already has an adapter 'peft'"):
        convlora.load_peft_adapter(model, peft_folder, name="peft")
    assert keys_and_shapes(model)


def test_modules_to_save_are_exported_whole(tmp_path: Path) -> None:
    base = _timm("resnet18")
    model = copy.deepcopy(base)
    convlora.inject(model, rank=2, targets=["layer4.*.conv1"])
    randomize_adapters(model, seed=6, std=0.3)
    with torch.no_grad():
        model.fc.weight.mul_(-2.0)  # a retrained head
    folder = convlora.save_peft_adapter(model, tmp_path / "p", modules_to_save=["fc"])
    pm = peft.PeftModel.from_pretrained(copy.deepcopy(base), folder).eval()
    _close(pm(X), model(X), base(X))
    back = copy.deepcopy(base)
    convlora.load_peft_adapter(back, folder)
    assert torch.equal(back.fc.weight, model.fc.weight) and torch.equal(back(X), model(X))
    with pytest.raises(ConvLoRAError, match="contains LoRA layers"):
        convlora.save_peft_adapter(model, tmp_path / "q", modules_to_save=["layer4"])
    with pytest.raises(ConvLoRAError, match="would also select"):  # PEFT matches name suffixes
        convlora.save_peft_adapter(model, tmp_path / "q", modules_to_save=["bn1"])
    assert not (tmp_path / "q").exists()


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
    _close(pm(x), model(x), base(x))
    back = copy.deepcopy(base)
    convlora.load_peft_adapter(back, folder)
    _same_adapters(model, back)


def test_grouped_import_with_block_diagonal_lora_a_is_exact(tmp_path: Path) -> None:
    """A PEFT adapter on a grouped conv whose lora_A has zeros off the group blocks (different
    blocks per group) is a weight delta: convlora holds it at rank r with a block-diagonal B."""
    from safetensors.torch import load_file, save_file
    torch.manual_seed(0)
    base = nn.Sequential(nn.Conv2d(4, 6, 3, padding=1, groups=2), nn.ReLU(), nn.Conv2d(6, 6, 1))
    pm = _peft_model(base, r=4, lora_alpha=2, target_modules=["0"])
    with torch.no_grad():
        a = pm.base_model.model[0].lora_A["default"].weight
        a[:2, 2:] = 0
        a[2:, :2] = 0
    pm.save_pretrained(tmp_path / "p")
    x = torch.randn(2, 4, 7, 7)
    model = copy.deepcopy(base)
    convlora.load_peft_adapter(model, tmp_path / "p")
    assert convlora.lora_layers(model)["0"].rank["default"] == 4
    _close(model(x), pm(x), base(x))
    weights = tmp_path / "p" / "adapter_model.safetensors"  # one off-block entry: refused
    tensors = load_file(str(weights))
    tensors["base_model.model.0.lora_A.weight"][0, 3, 1, 1] = 1e-3
    save_file(tensors, str(weights))
    with pytest.raises(UnsupportedLayerError, match="'0' is a grouped conv"):
        convlora.load_peft_adapter(copy.deepcopy(base), tmp_path / "p")


def test_broken_weights_are_refused(peft_folder: Path) -> None:
    from safetensors.torch import load_file, save_file
    weights = peft_folder / "adapter_model.safetensors"
    tensors = load_file(str(weights))
    lora_b = tensors.pop("base_model.model.2.lora_B.weight")
    save_file(tensors, str(weights))
    with pytest.raises(AdapterFormatError, match=r"2\.lora_B\.weight is missing"):
        convlora.load_peft_adapter(_small(), peft_folder)
    tensors["base_model.model.2.lora_B.weight"] = lora_b
    tensors["base_model.model.4.weight"] = torch.zeros(4, 8, 1, 1)
    save_file(tensors, str(weights))
    with pytest.raises(AdapterFormatError, match=r"unexpected tensor '4\.weight'"):
        convlora.load_peft_adapter(_small(), peft_folder)
    weights.write_bytes(weights.read_bytes()[:-7])
    with pytest.raises(AdapterFormatError, match="could not be read as safetensors"):
        convlora.load_peft_adapter(_small(), peft_folder)


@pytest.mark.parametrize("mode", ["reflect", "circular"])
def test_peft_itself_is_not_a_weight_delta_on_padded_or_dilated_convs(mode: str) -> None:
    """Why those layers are refused: PEFT's side path pads with zeros (its unmerged output is not
    its own merged output) and ignores dilation (its side path has another output size)."""
    torch.manual_seed(0)
    x = torch.randn(1, 3, 8, 8)
    pm = _peft_model(nn.Sequential(nn.Conv2d(3, 4, 3, padding=1, padding_mode=mode)), r=2,
                     target_modules=["0"])
    unmerged = pm(x)
    merged = pm.merge_and_unload()(x)
    assert (unmerged - merged).abs().max() > 1e-3
    dilated = _peft_model(nn.Sequential(nn.Conv2d(3, 4, 3, padding=2, dilation=2)), r=2,
                          target_modules=["0"])
    with pytest.raises(RuntimeError, match="size"):
        dilated(x)


def test_cli_convert_both_ways(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from safetensors.torch import save_file

    from convlora.cli import main
    base = _timm("mobilenetv3_small_050")
    model = copy.deepcopy(base)
    convlora.inject(model, rank=2, alpha=1.5, targets=["blocks.*.conv_pw*", "blocks.0.0.conv_dw"])
    randomize_adapters(model, seed=8, std=0.3)
    src = convlora.save_adapter(model, tmp_path / "a.safetensors")
    save_file({k: v.contiguous() for k, v in base.state_dict().items()}, str(tmp_path / "base.safetensors"))
    src_bytes = src.read_bytes()
    assert main(["convert", "--to", "peft", "--adapter", str(src), "--out", str(tmp_path / "p")]) == 0
    pm = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "p").eval()
    _close(pm(X), model(X), base(X))
    out = tmp_path / "b.safetensors"
    assert main(["convert", "--to", "convlora", "--adapter", str(tmp_path / "p"), "--base",
                 str(tmp_path / "base.safetensors"), "--out", str(out)]) == 0
    t1, m1 = convlora.read_adapter(src)
    t2, m2 = convlora.read_adapter(out)
    assert set(t1) == set(t2) and all(torch.equal(t1[k], t2[k]) for k in t1)
    assert {n: (lm["rank"], lm["alpha"]) for n, lm in m1["layers"].items()} == \
        {n: (lm["rank"], lm["alpha"]) for n, lm in m2["layers"].items()}
    assert src.read_bytes() == src_bytes
    capsys.readouterr()
    peft_files = {p.name: p.read_bytes() for p in (tmp_path / "p").iterdir()}
    refusals = [
        (["--to", "peft", "--adapter", str(src), "--out", str(tmp_path / "p")], "already exists"),
        (["--to", "peft", "--adapter", str(src), "--out", str(src)], "is the --adapter input"),
        (["--to", "convlora", "--adapter", str(tmp_path / "p"), "--out", str(out)], "needs --base"),
        (["--to", "convlora", "--adapter", str(tmp_path / "p"), "--base", str(tmp_path / "base.safetensors"),
          "--out", str(tmp_path / "base.safetensors")], "is the --base input"),
        (["--to", "convlora", "--adapter", str(tmp_path / "p"), "--base", str(tmp_path / "base.safetensors"),
          "--out", str(tmp_path / "p" / "adapter_model.safetensors")], "is one of the input files"),
    ]
    for args, match in refusals:
        assert main(["convert", *args]) == 2
        assert match in capsys.readouterr().err
    assert {p.name: p.read_bytes() for p in (tmp_path / "p").iterdir()} == peft_files
    assert src.read_bytes() == src_bytes
    loralib = copy.deepcopy(base)
    convlora.inject(loralib, rank=2, factorization="loralib", targets=["conv_stem"])
    convlora.save_adapter(loralib, tmp_path / "l.safetensors")
    assert main(["convert", "--to", "peft", "--adapter", str(tmp_path / "l.safetensors"),
                 "--out", str(tmp_path / "lp")]) == 2
    assert "'loralib' factorization" in capsys.readouterr().err
    assert not (tmp_path / "lp").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary left behind
