"""Adapters on a model: save and load round trips, bias modes, switching, fingerprints, fit to the model."""

from __future__ import annotations

import copy
import json
import os
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn

import convlora
from convlora import AdapterFormatError, AdapterMismatchError, FingerprintMismatchError
from tests._core_helpers import adapted, randomize_adapters, rewrite_metadata, three_convs

X = torch.randn(2, 3, 9, 9)
METHODS = ["lora", "dora", "loha", "lokr"]


def test_round_trip_and_metadata(tmp_path: Path) -> None:
    base = three_convs()
    model = adapted(base, 1, rank_pattern={"4": 4}, alpha=3.0)
    path = convlora.save_adapter(model, tmp_path / "a.safetensors", metadata={"task": "x2"})
    tensors, meta = convlora.read_adapter(path)
    assert set(tensors) == {f"{n}.lora_{s}" for n in ("0", "2", "4") for s in "AB"}
    assert meta["layers"]["4"]["rank"] == 4 and meta["layers"]["2"]["groups"] == 2
    assert meta["user"] == {"task": "x2"} and meta["format_version"] == "2"
    assert meta["bias"] == "none" and meta["bias_keys"] == []
    fresh = copy.deepcopy(base)
    assert convlora.load_adapter(fresh, path) == "default"
    assert torch.equal(fresh(X), model(X))


def test_trained_biases_are_saved_and_loaded(tmp_path: Path) -> None:
    base = three_convs()
    model = adapted(base, 1)
    convlora.mark_only_lora_trainable(model, bias="lora_only")
    with torch.no_grad():
        model[0].bias.add_(0.5)
    path = convlora.save_adapter(model, tmp_path / "a.safetensors", bias="lora_only")
    tensors, meta = convlora.read_adapter(path)
    assert meta["bias"] == "lora_only" and meta["bias_keys"] == ["0.bias", "2.bias", "4.bias"]
    assert torch.equal(tensors["0.bias"], model[0].bias.detach())
    fresh = copy.deepcopy(base)
    convlora.load_adapter(fresh, path)
    assert torch.equal(fresh(X), model(X))


def _bias_model() -> nn.Module:
    """Adapters on 0 and 4 only: conv 2 and the norm have biases outside the adapted layers."""
    torch.manual_seed(0)
    base = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.Conv2d(8, 8, 3, padding=1),
                         nn.ReLU(), nn.Conv2d(8, 12, 3, padding=1, bias=False))
    convlora.inject(base, rank=2, targets=["0", "4"])
    randomize_adapters(base, 3)
    return base


@pytest.mark.parametrize("trained_with", ["none", "lora_only", "all"])
def test_each_bias_mode_saves_exactly_what_it_names(tmp_path: Path, trained_with: str) -> None:
    model = _bias_model()
    convlora.mark_only_lora_trainable(model, bias=trained_with)  # what trains must not matter
    factors = {f"{n}.lora_{s}" for n in ("0", "4") for s in "AB"}
    every_bias = {n for n, _ in model.named_parameters() if n.endswith(".bias")}
    assert every_bias == {"0.bias", "1.bias", "2.bias"}
    expected = {"none": set(), "lora_only": {"0.bias"}, "all": every_bias}
    for mode, biases in expected.items():
        assert set(convlora.lora_state_dict(model, bias=mode)) == factors | biases, mode
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            path = convlora.save_adapter(model, tmp_path / f"{mode}.safetensors", bias=mode)
        tensors, meta = convlora.read_adapter(path)
        assert set(tensors) == factors | biases and meta["bias"] == mode, mode
        assert set(meta["bias_keys"]) == biases
        assert all(torch.equal(tensors[k], model.get_parameter(k).detach()) for k in biases)


def test_bias_mode_errors_and_the_left_out_warning(tmp_path: Path) -> None:
    model = _bias_model()
    for call in (lambda: convlora.save_adapter(model, tmp_path / "x.safetensors", bias="trainable"),
                 lambda: convlora.lora_state_dict(model, bias=True),
                 lambda: convlora.mark_only_lora_trainable(model, bias="lora")):
        with pytest.raises(convlora.ConvLoRAError, match=r"bias=.* is not one of \('none', 'lora_only', 'all'\)"):
            call()
    assert not (tmp_path / "x.safetensors").exists()
    convlora.mark_only_lora_trainable(model, bias="all")
    with pytest.warns(UserWarning, match=r"biases \['0.bias', '1.bias', '2.bias'\] are trainable but bias='none'"):
        convlora.save_adapter(model, tmp_path / "a.safetensors")
    with pytest.warns(UserWarning, match=r"\['1.bias', '2.bias'\] are trainable but bias='lora_only'"):
        convlora.save_adapter(model, tmp_path / "a.safetensors", bias="lora_only")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        convlora.save_adapter(model, tmp_path / "a.safetensors", bias="all")


def test_mark_only_lora_only_follows_the_adapter() -> None:
    model = _bias_model()
    convlora.inject(model, convlora.LoRAConfig(rank=1, targets="2"), adapter_name="other")
    convlora.mark_only_lora_trainable(model, bias="lora_only", adapter="other")
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"2.bias", "2.lora_A.other", "2.lora_B.other"}
    convlora.mark_only_lora_trainable(model, bias="lora_only")
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert {"0.bias", "2.bias"} <= trainable and "1.bias" not in trainable


def test_named_adapters_switch_exactly(tmp_path: Path) -> None:
    base = three_convs()
    a, b = adapted(base, 1), adapted(base, 2, targets="4")
    pa = convlora.save_adapter(a, tmp_path / "a.safetensors")
    pb = convlora.save_adapter(b, tmp_path / "b.safetensors")
    multi = copy.deepcopy(base)
    convlora.load_adapter(multi, pa, name="a")
    convlora.load_adapter(multi, pb, name="b")
    assert convlora.list_adapters(multi) == ["a", "b"] and convlora.active_adapter(multi) == "b"
    assert torch.equal(multi(X), b(X))
    convlora.set_adapter(multi, "a")
    assert torch.equal(multi(X), a(X))
    convlora.set_adapter(multi, "b")
    with convlora.merged(multi):
        torch.testing.assert_close(multi(X), b(X), atol=1e-5, rtol=1e-5)
    convlora.delete_adapter(multi, "b")
    assert convlora.list_adapters(multi) == ["a"]
    with pytest.raises(convlora.ConvLoRAError, match=r"no adapter named 'b'; this model has \['a'\]"):
        convlora.set_adapter(multi, "b")


def test_lora_state_dict_is_the_active_adapter() -> None:
    model = adapted(three_convs(), 1)
    convlora.inject(model, convlora.LoRAConfig(rank=1, targets="0"), adapter_name="two")
    sd = convlora.lora_state_dict(model)
    assert set(sd) == {"0.lora_A", "0.lora_B"} and sd["0.lora_A"].shape[0] == 1
    assert set(convlora.lora_state_dict(model, "default")) == {f"{n}.lora_{s}" for n in "024" for s in "AB"}


@pytest.mark.parametrize("method", METHODS)
def test_fingerprint_mismatch_strict_and_not(tmp_path: Path, method: str) -> None:
    path = convlora.save_adapter(adapted(three_convs(0), 1, method=method), tmp_path / "a.safetensors")
    other = three_convs(seed=5)  # same architecture, different weights
    with pytest.raises(FingerprintMismatchError, match="base weights differ.*strict=False"):
        convlora.load_adapter(other, path)
    assert not convlora.lora_layers(other), "nothing may change on failure"
    with pytest.warns(UserWarning, match="base weights differ"):
        convlora.load_adapter(other, path, strict=False)


@pytest.mark.parametrize("method", METHODS)
def test_fingerprint_matches_low_precision_copies(tmp_path: Path, method: str) -> None:
    base = three_convs()
    path = convlora.save_adapter(adapted(base, 1, method=method), tmp_path / "a.safetensors")
    for dtype in (torch.bfloat16, torch.float16):
        convlora.load_adapter(copy.deepcopy(base).to(dtype), path)


def test_wrong_model_lists_missing_layers_and_shapes(tmp_path: Path) -> None:
    path = convlora.save_adapter(adapted(three_convs(), 1), tmp_path / "a.safetensors")
    with pytest.raises(AdapterMismatchError, match=r"adapter layers not found in the model: \['4'\]"):
        convlora.load_adapter(nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 8, 3, groups=2)), path)
    wide = nn.Sequential(nn.Conv2d(3, 16, 3), nn.ReLU(), nn.Conv2d(16, 8, 3, groups=2), nn.ReLU(),
                         nn.Conv2d(8, 12, 3))
    with pytest.raises(AdapterMismatchError, match=r"0: the adapter expects a Conv2d of weight \[8, 3, 3, 3\]"):
        convlora.load_adapter(wide, path)
    assert not convlora.lora_layers(wide)


def test_bad_name_and_metadata_arguments_change_nothing(tmp_path: Path) -> None:
    path = convlora.save_adapter(adapted(three_convs(), 1), tmp_path / "a.safetensors")
    model = three_convs()
    with pytest.raises(convlora.ConvLoRAError, match=r"name='a.b' must be a Python identifier"):
        convlora.load_adapter(model, path, name="a.b")
    assert not convlora.lora_layers(model)
    with pytest.raises(convlora.ConvLoRAError, match="metadata is not JSON-serialisable"):
        convlora.save_adapter(adapted(three_convs(), 1), tmp_path / "m.safetensors", metadata={"f": print})
    assert not (tmp_path / "m.safetensors").exists()


def test_save_is_atomic_and_leaves_no_temp_files(tmp_path: Path) -> None:
    model = adapted(three_convs(), 1)
    convlora.save_adapter(model, tmp_path / "a.safetensors")
    convlora.save_adapter(model, tmp_path / "a.safetensors")
    assert [p.name for p in tmp_path.iterdir()] == ["a.safetensors"]
    old = os.umask(0o027)
    try:
        convlora.save_adapter(model, tmp_path / "a.safetensors")
    finally:
        os.umask(old)
    assert (tmp_path / "a.safetensors").stat().st_mode & 0o777 == 0o640  # umask, not mkstemp's 0600
    with pytest.raises(AdapterMismatchError, match="no layer has an adapter named 'nope'"):
        convlora.save_adapter(model, tmp_path / "b.safetensors", name="nope")


def test_summary_table() -> None:
    model = adapted(three_convs(), 1)
    convlora.merge(model)
    text = convlora.summary(model)
    assert "0      Conv2d  8x3x3x3" in text and "yes" in text
    assert f"adapter params: {sum(p.numel() for p in convlora.lora_parameters(model)):,}" in text


def test_new_adapter_trains_alone_and_mark_only_takes_an_adapter() -> None:
    model = adapted(three_convs(), 1)
    convlora.inject(model, convlora.LoRAConfig(rank=1), adapter_name="second")
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(n.endswith(".second") for n in trainable), trainable
    convlora.mark_only_lora_trainable(model, adapter="default")
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(n.endswith(".default") for n in trainable), trainable


def test_loading_biases_next_to_other_adapters_warns(tmp_path: Path) -> None:
    base = three_convs()
    model = adapted(base, 1)
    convlora.mark_only_lora_trainable(model, bias="lora_only")
    path = convlora.save_adapter(model, tmp_path / "a.safetensors", bias="lora_only")
    other = adapted(base, 2)
    with pytest.warns(UserWarning, match="biases are shared by all adapters"):
        convlora.load_adapter(other, path, name="with_bias")


def test_bad_layer_metadata_changes_nothing(tmp_path: Path) -> None:
    path = convlora.save_adapter(adapted(three_convs(), 1), tmp_path / "a.safetensors")
    _, meta = convlora.read_adapter(path)
    for field, value in (("rank", 0), ("factorization", "svd"), ("weight_shape", [8, "3"])):
        layers = copy.deepcopy(meta["layers"])
        layers["4"][field] = value
        bad = rewrite_metadata(path, tmp_path / "bad.safetensors", layers=json.dumps(layers))
        model = three_convs()
        with pytest.raises(AdapterFormatError, match=rf"layer '4': bad or missing \['{field}'\]"):
            convlora.load_adapter(model, bad)
        assert not convlora.lora_layers(model)
    layers = copy.deepcopy(meta["layers"])
    layers["2"]["groups"] = 1  # the model's conv 2 has groups=2
    bad = rewrite_metadata(path, tmp_path / "bad.safetensors", layers=json.dumps(layers))
    model = three_convs()
    with pytest.raises(AdapterMismatchError, match=r"2: groups=2 in the model, 1 in the file"):
        convlora.load_adapter(model, bad)
    assert not convlora.lora_layers(model)
