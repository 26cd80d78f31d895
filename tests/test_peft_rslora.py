"""rsLoRA (``inject(..., rslora=True)``) as PEFT ``use_rslora`` folders both ways, against the real
PEFT package.

* convlora -> PEFT: an rsLoRA adapter (LoRA or DoRA) exports with ``use_rslora: true`` and its
  alphas as ``lora_alpha``; PEFT's scale is convlora's, the same float, and its outputs are
  convlora's, unmerged and merged. It comes back as rsLoRA with the same factors, ranks and
  alphas, bit for bit, on models, between files and through ``convert``.
* PEFT -> convlora: a ``use_rslora`` folder PEFT made loads as ``rslora=True`` with
  ``alpha = lora_alpha`` and PEFT's outputs; exported again it is PEFT's own folder.
* Grouped convs: PEFT holds a convlora grouped adapter of rank ``r`` at rank ``r*g``, whose
  rsLoRA scale needs ``lora_alpha = alpha*sqrt(g)``: the same float for ``g`` a power of 4
  (exported and round-tripped bit for bit), not in general otherwise (refused; measured).
* Adapters mixing rsLoRA and alpha/rank layers are refused (``use_rslora`` is one flag), in one
  line, and write nothing.
"""

from __future__ import annotations

import copy
import json
import math
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

import convlora
from convlora import UnsupportedLayerError
from tests._core_helpers import randomize_adapters
from tests._peft_helpers import X, close, peft_model, same_adapters, small_net, timm_model

peft = pytest.importorskip("peft")

pytestmark = [pytest.mark.usefixtures("one_thread"),
              pytest.mark.filterwarnings("ignore::UserWarning")]  # PEFT warns about grouped convs


def _randomize(model: nn.Module, seed: int) -> None:
    """Random non-zero factors; DoRA magnitudes 1.5 to 2.5 times their channel's ``||W||``."""
    randomize_adapters(model, seed=seed, std=0.3)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in convlora.lora_layers(model).values():
            mag = layer.factors("default").get("lora_magnitude")
            if mag is not None:
                mag.copy_(layer.weight.flatten(1).norm(dim=1) * (1.5 + torch.rand(mag.shape, generator=gen)))


def _same_scales(model: nn.Module, pm: nn.Module) -> None:
    """Each PEFT layer's scale is the convlora layer's, the same float."""
    for n, layer in convlora.lora_layers(model).items():
        theirs = pm.base_model.model.get_submodule(n)
        assert theirs.use_rslora["default"] is True
        assert theirs.scaling["default"] == layer.scale("default"), n


def _grouped_net(groups: int) -> nn.Module:
    torch.manual_seed(0)
    c = 2 * groups
    return nn.Sequential(nn.Conv2d(3, c, 3, padding=1), nn.ReLU(), nn.Conv2d(c, c, 3, padding=1, groups=groups),
                         nn.ReLU(), nn.Conv2d(c, 4, 1))


@pytest.mark.parametrize("method", ["lora", "dora"])
def test_exported_rslora_gives_the_same_outputs_in_peft_and_round_trips(method: str, tmp_path: Path) -> None:
    base = timm_model("resnet18")
    model = copy.deepcopy(base)
    convlora.inject(model, rank=3, alpha=5.0, targets=["layer1.0.*", "layer2.0.downsample.0", "fc"],
                    rank_pattern={"layer1.0.conv2": 2}, alpha_pattern={"fc": 0.7}, method=method, rslora=True)
    _randomize(model, seed=2)
    folder = convlora.save_peft_adapter(model, tmp_path / "peft")
    cfg = json.loads((folder / "adapter_config.json").read_text())
    assert cfg["use_rslora"] is True and cfg["use_dora"] is (method == "dora")
    for n, layer in convlora.lora_layers(model).items():  # the alphas are written as they are
        peft_alpha = cfg["alpha_pattern"].get("^" + re.escape(n), cfg["lora_alpha"])
        assert peft_alpha == layer.alpha["default"] == (0.7 if n == "fc" else 5.0), n
    pm = peft.PeftModel.from_pretrained(copy.deepcopy(base), folder).eval()
    _same_scales(model, pm)
    close(pm(X), model(X), base(X))
    close(pm.merge_and_unload()(X), model(X), base(X))
    back = copy.deepcopy(base)
    convlora.load_peft_adapter(back, folder)
    same_adapters(model, back)  # factors, ranks, alphas, method and the rslora flag, bit for bit
    assert all(layer.rslora["default"] for layer in convlora.lora_layers(back).values())
    assert torch.equal(back(X), model(X))


@pytest.mark.parametrize("method", ["lora", "dora"])
def test_peft_rslora_folder_loads_as_rslora_with_peft_outputs(method: str, tmp_path: Path) -> None:
    base = timm_model("resnet18")
    pm = peft_model(base, r=4, lora_alpha=6, use_rslora=True, use_dora=method == "dora",
                    target_modules=["conv1", "conv2", "fc"], layers_to_transform=[0], layers_pattern="layer2",
                    rank_pattern={"conv2": 2}, alpha_pattern={"fc": 1.5})
    pm.save_pretrained(tmp_path / "peft")
    ref = pm(X)
    model = copy.deepcopy(base)
    convlora.load_peft_adapter(model, tmp_path / "peft")
    layers = convlora.lora_layers(model)
    assert set(layers) == {"conv1", "layer2.0.conv1", "layer2.0.conv2", "fc"}
    for n, layer in layers.items():
        theirs = pm.base_model.model.get_submodule(n)
        assert layer.rslora["default"] and layer.method["default"] == method
        assert layer.rank["default"] == theirs.r["default"] and layer.alpha["default"] == theirs.lora_alpha["default"]
    _same_scales(model, pm)
    close(model(X), ref, base(X))
    again = convlora.save_peft_adapter(model, tmp_path / "again")  # PEFT's own folder back
    theirs_t, ours_t = load_file(str(tmp_path / "peft" / "adapter_model.safetensors")), load_file(
        str(again / "adapter_model.safetensors"))
    assert set(theirs_t) == set(ours_t) and all(torch.equal(theirs_t[k], ours_t[k]) for k in theirs_t)
    cfg = json.loads((again / "adapter_config.json").read_text())
    assert cfg["use_rslora"] is True and cfg["r"] == 4 and cfg["lora_alpha"] == 6
    convlora.merge(model)
    close(model(X), ref, base(X))


def test_rslora_file_conversion_and_cli_round_trip_is_bit_exact(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    from convlora.cli import main
    base = timm_model("resnet18")
    model = copy.deepcopy(base)
    convlora.inject(model, rank=2, alpha=0.3, targets=["layer2.*", "fc"], rank_pattern={"fc": 4}, rslora=True)
    _randomize(model, seed=4)
    src = convlora.save_adapter(model, tmp_path / "a.safetensors")
    save_file({k: v.contiguous() for k, v in base.state_dict().items()}, str(tmp_path / "base.safetensors"))
    folder = convlora.peft.convlora_to_peft(src, tmp_path / "peft")
    assert main(["convert", "--to", "peft", "--adapter", str(src), "--out", str(tmp_path / "cli")]) == 0
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == \
        {p.name: p.read_bytes() for p in (tmp_path / "cli").iterdir()}
    pm = peft.PeftModel.from_pretrained(copy.deepcopy(base), folder).eval()
    _same_scales(model, pm)
    close(pm(X), model(X), base(X))
    out = convlora.peft.peft_to_convlora(folder, base.state_dict(), tmp_path / "b.safetensors")
    assert main(["convert", "--to", "convlora", "--adapter", str(folder), "--base",
                 str(tmp_path / "base.safetensors"), "--out", str(tmp_path / "c.safetensors")]) == 0
    t1, m1 = convlora.read_adapter(src)
    for back in (out, tmp_path / "c.safetensors"):
        t2, m2 = convlora.read_adapter(back)
        assert set(t1) == set(t2) and all(torch.equal(t1[k], t2[k]) for k in t1)
        for n, lm in m1["layers"].items():
            assert lm["rslora"] is True
            for field in ("rank", "alpha", "method", "rslora", "weight_shape", "groups"):
                assert m2["layers"][n][field] == lm[field], (n, field)
    fresh = copy.deepcopy(base)
    convlora.load_adapter(fresh, out)
    assert torch.equal(fresh(X), model(X))


@pytest.mark.parametrize("groups", [4, 16])
@pytest.mark.parametrize("method", ["lora", "dora"])
def test_grouped_rslora_with_groups_a_power_of_4_exports_exactly(method: str, groups: int, tmp_path: Path) -> None:
    base = _grouped_net(groups)
    x = torch.randn(2, 3, 7, 7)
    model = copy.deepcopy(base)
    convlora.inject(model, rank=3, alpha=1.3, method=method, rslora=True)
    _randomize(model, seed=5)
    folder = convlora.save_peft_adapter(model, tmp_path / "p")
    cfg = json.loads((folder / "adapter_config.json").read_text())
    root = math.isqrt(groups)
    assert cfg["rank_pattern"] == {"^2": 3 * groups} and cfg["alpha_pattern"] == {"^2": 1.3 * root}
    pm = peft.PeftModel.from_pretrained(copy.deepcopy(base), folder).eval()
    _same_scales(model, pm)
    close(pm(x), model(x), base(x))  # PEFT cannot merge grouped convs
    back = copy.deepcopy(base)
    convlora.load_peft_adapter(back, folder)
    same_adapters(model, back)
    assert torch.equal(back(x), model(x))


def test_grouped_rslora_scale_is_not_exact_for_other_groups() -> None:
    """Why other grouped rsLoRA layers are refused: PEFT's scale at rank ``r*g`` with
    ``lora_alpha = alpha*sqrt(g)`` is another float than convlora's ``alpha/sqrt(r)`` for some
    alphas (counted over a grid), while for ``g`` a power of 4 it is the same float for all."""
    alphas = [0.1 * k for k in range(1, 200)]
    for r in (1, 2, 3, 5, 8):
        for g, exact in ((2, False), (3, False), (8, False), (4, True), (16, True), (64, True)):
            lora_alphas = [a * math.sqrt(g) for a in alphas]
            same = [la / math.sqrt(r * g) == a / math.sqrt(r) for a, la in zip(alphas, lora_alphas)]
            assert all(same) if exact else not all(same), (r, g, sum(same))


@pytest.mark.parametrize("groups", [2, 8])
def test_grouped_rslora_is_refused_for_other_groups(groups: int, tmp_path: Path,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    from convlora.cli import main
    model = _grouped_net(groups)
    convlora.inject(model, rank=2, alpha=3.0, rslora=True)
    match = rf"^layer '2' is a grouped conv \(groups={groups}\) with rsLoRA: PEFT holds it at rank {2 * groups}"
    with pytest.raises(UnsupportedLayerError, match=match) as err:
        convlora.save_peft_adapter(model, tmp_path / "out")
    assert "\n" not in str(err.value) and "power of 4" in str(err.value) and "merge" in str(err.value)
    src = convlora.save_adapter(model, tmp_path / "a.safetensors")
    with pytest.raises(UnsupportedLayerError, match=match):
        convlora.peft.convlora_to_peft(src, tmp_path / "out")
    capsys.readouterr()
    assert main(["convert", "--to", "peft", "--adapter", str(src), "--out", str(tmp_path / "out")]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and f"groups={groups}) with rsLoRA" in lines[0]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.safetensors"]


@pytest.mark.parametrize("groups, blocks, rslora", [(2, "equal", False), (4, "equal", True), (2, "different", True)])
def test_grouped_peft_rslora_import(groups: int, blocks: str, rslora: bool, tmp_path: Path) -> None:
    """A grouped ``use_rslora`` layer with a block-diagonal ``lora_A``: different blocks keep
    PEFT's rank (rsLoRA, ``alpha = lora_alpha``, exact); equal blocks come back at rank
    ``r / g``, as rsLoRA for ``g`` a power of 4, else as plain LoRA with ``alpha =
    lora_alpha*sqrt(r)/g`` (the same scale to float rounding)."""
    base = _grouped_net(groups)
    x = torch.randn(2, 3, 7, 7)
    r = 2 * groups
    pm = peft_model(base, r=r, lora_alpha=3, use_rslora=True, target_modules=["2"])
    with torch.no_grad():
        a = pm.base_model.model[2].lora_A["default"].weight
        rg, cg = r // groups, a.shape[1] // groups
        mask = torch.zeros_like(a)
        for j in range(groups):
            mask[j * rg:(j + 1) * rg, j * cg:(j + 1) * cg] = 1
            if blocks == "equal":
                a[j * rg:(j + 1) * rg, j * cg:(j + 1) * cg] = a[:rg, :cg]
        a.mul_(mask)
    pm.save_pretrained(tmp_path / "p")
    model = copy.deepcopy(base)
    convlora.load_peft_adapter(model, tmp_path / "p")
    layer = convlora.lora_layers(model)["2"]
    assert layer.rslora["default"] is rslora
    if blocks == "different":
        assert layer.rank["default"] == r and layer.alpha["default"] == 3
    elif rslora:
        assert layer.rank["default"] == rg and layer.alpha["default"] == 3 / math.isqrt(groups)
    else:
        assert layer.rank["default"] == rg and layer.alpha["default"] == 3 * math.sqrt(r) / groups
    if rslora:
        assert layer.scale("default") == pm.base_model.model[2].scaling["default"]
    close(model(x), pm(x), base(x))
    convlora.merge(model)
    close(model(x), pm(x), base(x))


def test_mixed_rslora_and_plain_layers_are_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from convlora.cli import main
    model = small_net()
    convlora.inject(model, rank=2, targets=["0"], rslora=True)
    convlora.inject(model, rank=2, targets=["2", "4"])
    match = (r"^the adapter mixes rsLoRA layers \['0'\] and alpha/rank layers \['2', '4'\]; PEFT's use_rslora "
             r"is one value for the whole folder\. Train all layers one way .*or merge the adapter instead")
    with pytest.raises(UnsupportedLayerError, match=match) as err:
        convlora.save_peft_adapter(model, tmp_path / "out")
    assert "\n" not in str(err.value)
    src = convlora.save_adapter(model, tmp_path / "a.safetensors")
    with pytest.raises(UnsupportedLayerError, match=match):
        convlora.peft.convlora_to_peft(src, tmp_path / "out")
    capsys.readouterr()
    assert main(["convert", "--to", "peft", "--adapter", str(src), "--out", str(tmp_path / "out")]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and "mixes rsLoRA layers ['0'] and alpha/rank layers ['2', '4']" in lines[0]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.safetensors"]
