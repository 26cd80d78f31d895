"""PEFT adapter folders on a model and between files, against the real PEFT package on timm
models (random weights).

* PEFT -> convlora: an adapter PEFT made (random non-zero factors) gives the same outputs in
  convlora as in PEFT.
* convlora -> PEFT: an adapter exported by convlora gives the same outputs in PEFT.
* convlora -> PEFT -> convlora: the same tensors, bit for bit, on models and between files (and
  through the command line's ``convert``).
* Weights that do not fit the model are refused and change nothing; loading beside other
  adapters and ``modules_to_save`` work as in PEFT.
"""

from __future__ import annotations

import copy
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

import convlora
from convlora import AdapterMismatchError, ConvLoRAError
from tests._core_helpers import keys_and_shapes, randomize_adapters
from tests._peft_helpers import (
    X,
    close,
    peft_model,
    refused_load,
    same_adapters,
    small_net,
    small_peft_folder,
    timm_model,
)

peft = pytest.importorskip("peft")

pytestmark = [pytest.mark.usefixtures("one_thread"),
              pytest.mark.filterwarnings("ignore::UserWarning")]  # PEFT warns about grouped convs


@pytest.fixture()
def peft_folder(tmp_path: Path) -> Path:
    return small_peft_folder(tmp_path)


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
    base = timm_model(arch)
    pm = peft_model(base, **config)
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
    rslora = bool(config.get("use_rslora", False))  # use_rslora loads as rsLoRA (tests/test_peft_rslora.py)
    assert all(layer.rslora["default"] is rslora for layer in convlora.lora_layers(model).values())
    close(model(X), ref, base(X))
    convlora.merge(model)  # and merged, as deployed
    close(model(X), ref, base(X))


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
    base = timm_model(arch)
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
    close(pm(X), model(X), base(X))
    back = copy.deepcopy(base)
    convlora.load_peft_adapter(back, folder)
    same_adapters(model, back)
    for k, v in model.state_dict().items():  # biases included
        assert torch.equal(back.state_dict()[k], v), k


def test_file_conversion_round_trip_is_bit_exact(tmp_path: Path) -> None:
    base = timm_model("resnet18")
    model = copy.deepcopy(base)
    convlora.inject(model, rank=2, alpha=0.3, targets=["layer2.*", "fc"], rank_pattern={"fc": 4})
    randomize_adapters(model, seed=4)
    convlora.mark_only_lora_trainable(model, bias="lora_only")
    with torch.no_grad():
        model.fc.bias.add_(0.5)
    src = convlora.save_adapter(model, tmp_path / "a.safetensors", bias="lora_only")
    folder = convlora.peft.convlora_to_peft(src, tmp_path / "peft")
    pm = peft.PeftModel.from_pretrained(copy.deepcopy(base), folder).eval()
    close(pm(X), model(X), base(X))
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


def test_weights_that_do_not_fit_the_model_are_refused(peft_folder: Path) -> None:
    other = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 6, 3, padding=1))
    refused_load(other, peft_folder, AdapterMismatchError, r"2\.lora_B\.weight has shape")


def test_loads_beside_other_adapters(peft_folder: Path) -> None:
    model = small_net()
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
    base = timm_model("resnet18")
    model = copy.deepcopy(base)
    convlora.inject(model, rank=2, targets=["layer4.*.conv1"])
    randomize_adapters(model, seed=6, std=0.3)
    with torch.no_grad():
        model.fc.weight.mul_(-2.0)  # a retrained head
    folder = convlora.save_peft_adapter(model, tmp_path / "p", modules_to_save=["fc"])
    pm = peft.PeftModel.from_pretrained(copy.deepcopy(base), folder).eval()
    close(pm(X), model(X), base(X))
    back = copy.deepcopy(base)
    convlora.load_peft_adapter(back, folder)
    assert torch.equal(back.fc.weight, model.fc.weight) and torch.equal(back(X), model(X))
    with pytest.raises(ConvLoRAError, match="contains LoRA layers"):
        convlora.save_peft_adapter(model, tmp_path / "q", modules_to_save=["layer4"])
    with pytest.raises(ConvLoRAError, match="would also select"):  # PEFT matches name suffixes
        convlora.save_peft_adapter(model, tmp_path / "q", modules_to_save=["bn1"])
    assert not (tmp_path / "q").exists()


def test_cli_convert_both_ways(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from safetensors.torch import save_file

    from convlora.cli import main
    base = timm_model("mobilenetv3_small_050")
    model = copy.deepcopy(base)
    convlora.inject(model, rank=2, alpha=1.5, targets=["blocks.*.conv_pw*", "blocks.0.0.conv_dw"])
    randomize_adapters(model, seed=8, std=0.3)
    src = convlora.save_adapter(model, tmp_path / "a.safetensors")
    save_file({k: v.contiguous() for k, v in base.state_dict().items()}, str(tmp_path / "base.safetensors"))
    src_bytes = src.read_bytes()
    assert main(["convert", "--to", "peft", "--adapter", str(src), "--out", str(tmp_path / "p")]) == 0
    pm = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "p").eval()
    close(pm(X), model(X), base(X))
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

