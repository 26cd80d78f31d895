"""Adapter files and named adapters: round trips, switching, fingerprints, format errors."""

from __future__ import annotations

import copy
import json
import struct
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

import convlora
from convlora import AdapterFormatError, AdapterMismatchError, FingerprintMismatchError
from tests._core_helpers import randomize_adapters


def _base(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1, groups=2),
                         nn.ReLU(), nn.Conv2d(8, 12, 3, padding=1), nn.PixelShuffle(2))


def _trained(base: nn.Module, seed: int, **kw) -> nn.Module:
    model = copy.deepcopy(base)
    convlora.inject(model, rank=2, **kw)
    randomize_adapters(model, seed)
    return model


X = torch.randn(2, 3, 9, 9)


def test_round_trip_and_metadata(tmp_path: Path) -> None:
    base = _base()
    model = _trained(base, 1, rank_pattern={"4": 4}, alpha=3.0)
    path = convlora.save_adapter(model, tmp_path / "a.safetensors", metadata={"task": "x2"})
    tensors, meta = convlora.read_adapter(path)
    assert set(tensors) == {f"{n}.lora_{s}" for n in ("0", "2", "4") for s in "AB"}
    assert meta["layers"]["4"]["rank"] == 4 and meta["layers"]["2"]["groups"] == 2
    assert meta["user"] == {"task": "x2"} and meta["format_version"] == "1"
    fresh = copy.deepcopy(base)
    assert convlora.load_adapter(fresh, path) == "default"
    assert torch.equal(fresh(X), model(X))


def test_trainable_biases_are_saved_and_loaded(tmp_path: Path) -> None:
    base = _base()
    model = _trained(base, 1)
    convlora.mark_only_lora_trainable(model, bias="lora_only")
    with torch.no_grad():
        model[0].bias.add_(0.5)
    path = convlora.save_adapter(model, tmp_path / "a.safetensors")
    tensors, meta = convlora.read_adapter(path)
    assert "0.bias" in tensors and meta["bias_keys"] == ["0.bias", "2.bias", "4.bias"]
    fresh = copy.deepcopy(base)
    convlora.load_adapter(fresh, path)
    assert torch.equal(fresh(X), model(X))


def test_named_adapters_switch_exactly(tmp_path: Path) -> None:
    base = _base()
    a, b = _trained(base, 1), _trained(base, 2, targets="4")
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
    model = _trained(_base(), 1)
    convlora.add_adapter(model, "two", convlora.LoRAConfig(rank=1, targets="0"))
    sd = convlora.lora_state_dict(model)
    assert set(sd) == {"0.lora_A", "0.lora_B"} and sd["0.lora_A"].shape[0] == 1
    assert set(convlora.lora_state_dict(model, "default")) == {f"{n}.lora_{s}" for n in "024" for s in "AB"}


def test_fingerprint_mismatch_strict_and_not(tmp_path: Path) -> None:
    path = convlora.save_adapter(_trained(_base(0), 1), tmp_path / "a.safetensors")
    other = _base(seed=5)  # same architecture, different weights
    with pytest.raises(FingerprintMismatchError, match="base weights differ.*strict=False"):
        convlora.load_adapter(other, path)
    assert not convlora.lora_layers(other), "nothing may change on failure"
    with pytest.warns(UserWarning, match="base weights differ"):
        convlora.load_adapter(other, path, strict=False)


def test_fingerprint_matches_low_precision_copies(tmp_path: Path) -> None:
    base = _base()
    path = convlora.save_adapter(_trained(base, 1), tmp_path / "a.safetensors")
    for dtype in (torch.bfloat16, torch.float16):
        convlora.load_adapter(copy.deepcopy(base).to(dtype), path)


def test_wrong_model_lists_missing_layers_and_shapes(tmp_path: Path) -> None:
    path = convlora.save_adapter(_trained(_base(), 1), tmp_path / "a.safetensors")
    with pytest.raises(AdapterMismatchError, match=r"adapter layers not found in the model: \['4'\]"):
        convlora.load_adapter(nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 8, 3, groups=2)), path)
    wide = nn.Sequential(nn.Conv2d(3, 16, 3), nn.ReLU(), nn.Conv2d(16, 8, 3, groups=2), nn.ReLU(),
                         nn.Conv2d(8, 12, 3))
    with pytest.raises(AdapterMismatchError, match=r"0: the adapter expects a Conv2d of weight \[8, 3, 3, 3\]"):
        convlora.load_adapter(wide, path)
    assert not convlora.lora_layers(wide)


def test_tensor_shape_and_key_errors(tmp_path: Path) -> None:
    path = convlora.save_adapter(_trained(_base(), 1), tmp_path / "a.safetensors")
    tensors, meta = convlora.read_adapter(path)
    raw = {k: (json.dumps(v) if not isinstance(v, str) else v) for k, v in meta.items()}
    bad = dict(tensors)
    bad["2.lora_A"] = torch.zeros(3, 3)
    del bad["4.lora_B"]
    bad["9.lora_A"] = torch.zeros(1)
    save_file(bad, str(tmp_path / "bad.safetensors"), metadata=raw)
    with pytest.raises(AdapterMismatchError, match=r"missing from the file: \['4.lora_B'\]; unexpected tensors: \['9.lora_A'\]"):
        convlora.load_adapter(_base(), tmp_path / "bad.safetensors")
    bad = dict(tensors)
    bad["2.lora_A"] = torch.zeros(3, 3)
    save_file(bad, str(tmp_path / "bad2.safetensors"), metadata=raw)
    with pytest.raises(AdapterMismatchError, match=r"2.lora_A: shape \(3, 3\), expected \(2, 36\)"):
        convlora.load_adapter(_base(), tmp_path / "bad2.safetensors")


def test_corrupt_truncated_foreign_and_future_files(tmp_path: Path) -> None:
    path = convlora.save_adapter(_trained(_base(), 1), tmp_path / "a.safetensors")
    data = path.read_bytes()
    (tmp_path / "trunc.safetensors").write_bytes(data[:-10])
    with pytest.raises(AdapterFormatError, match="truncated or corrupt"):
        convlora.load_adapter(_base(), tmp_path / "trunc.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"PK\x03\x04 this is a zip file, not safetensors")
    with pytest.raises(AdapterFormatError, match="not a safetensors file"):
        convlora.load_adapter(_base(), tmp_path / "junk.safetensors")
    (tmp_path / "tiny.safetensors").write_bytes(b"abc")
    with pytest.raises(AdapterFormatError, match="only 3 bytes"):
        convlora.load_adapter(_base(), tmp_path / "tiny.safetensors")
    save_file({"w": torch.zeros(2)}, str(tmp_path / "plain.safetensors"))
    with pytest.raises(AdapterFormatError, match="not a convlora adapter"):
        convlora.load_adapter(_base(), tmp_path / "plain.safetensors")
    n = struct.unpack("<Q", data[:8])[0]
    header = json.loads(data[8:8 + n])
    header["__metadata__"]["format_version"] = "99"
    new = json.dumps(header).encode()
    (tmp_path / "v99.safetensors").write_bytes(struct.pack("<Q", len(new)) + new + data[8 + n:])
    with pytest.raises(AdapterFormatError, match="format version '99'; this convlora reads version '1'"):
        convlora.load_adapter(_base(), tmp_path / "v99.safetensors")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        convlora.load_adapter(_base(), tmp_path / "missing.safetensors")


def test_save_is_atomic_and_leaves_no_temp_files(tmp_path: Path) -> None:
    model = _trained(_base(), 1)
    convlora.save_adapter(model, tmp_path / "a.safetensors")
    convlora.save_adapter(model, tmp_path / "a.safetensors")
    assert [p.name for p in tmp_path.iterdir()] == ["a.safetensors"]
    with pytest.raises(AdapterMismatchError, match="no layer has an adapter named 'nope'"):
        convlora.save_adapter(model, tmp_path / "b.safetensors", name="nope")


def test_summary_table() -> None:
    model = _trained(_base(), 1)
    convlora.merge(model)
    text = convlora.summary(model)
    assert "0      Conv2d  8x3x3x3" in text and "yes" in text
    assert f"adapter params: {sum(p.numel() for p in convlora.lora_parameters(model)):,}" in text


def test_new_adapter_trains_alone_and_mark_only_takes_an_adapter() -> None:
    model = _trained(_base(), 1)
    convlora.add_adapter(model, "second", convlora.LoRAConfig(rank=1))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(n.endswith(".second") for n in trainable), trainable
    convlora.mark_only_lora_trainable(model, adapter="default")
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(n.endswith(".default") for n in trainable), trainable


def test_loading_biases_next_to_other_adapters_warns(tmp_path: Path) -> None:
    base = _base()
    model = _trained(base, 1)
    convlora.mark_only_lora_trainable(model, bias="lora_only")
    path = convlora.save_adapter(model, tmp_path / "a.safetensors")
    other = _trained(base, 2)
    with pytest.warns(UserWarning, match="biases are shared by all adapters"):
        convlora.load_adapter(other, path, name="with_bias")
