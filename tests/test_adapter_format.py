"""The adapter file format: reading a file validates its header, metadata and tensors, without a model."""

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
from convlora import AdapterFormatError
from convlora.fingerprint import fingerprint, sketch
from tests._core_helpers import adapted, rewrite_metadata, three_convs

X = torch.randn(2, 3, 9, 9)


def _v1_file(model: nn.Module, path: Path) -> Path:
    """Write ``model``'s adapter with the version-1 metadata layout (as convlora at cf55334 did):
    no ``bias`` entry; the file holds the biases that were trainable."""
    layers, tensors = {}, {}
    for lname, layer in convlora.lora_layers(model).items():
        layers[lname] = {"type": layer.base_type, "weight_shape": list(layer.weight.shape),
                         "groups": layer.groups, "rank": layer.rank["default"],
                         "alpha": layer.alpha["default"], "factorization": "kernel", "dropout": 0.0,
                         "stride": list(layer.stride), "dilation": list(layer.dilation),
                         "padding": list(layer.padding), "padding_mode": layer.padding_mode}
        tensors[f"{lname}.lora_A"] = layer.lora_A["default"].detach().contiguous()
        tensors[f"{lname}.lora_B"] = layer.lora_B["default"].detach().contiguous()
    tensors["0.bias"] = model[0].bias.detach().clone()
    bases = {n: lyr.base_weight() for n, lyr in convlora.lora_layers(model).items()}
    meta = {"format": "convlora.adapter", "format_version": "1", "convlora_version": "0.1.0",
            "adapter_name": "default", "layers": json.dumps(layers), "bias_keys": json.dumps(["0.bias"]),
            "base_fingerprint": fingerprint(bases), "base_sketch": json.dumps(sketch(bases)),
            "user": json.dumps({"from": "v1"})}
    save_file(tensors, str(path), metadata=meta)
    return path


def test_version_1_files_still_load(tmp_path: Path) -> None:
    base = three_convs()
    model = adapted(base, 1)
    with torch.no_grad():
        model[0].bias.add_(0.25)
    path = _v1_file(model, tmp_path / "v1.safetensors")
    tensors, meta = convlora.read_adapter(path)
    assert meta["format_version"] == "1" and meta["bias"] is None and meta["user"] == {"from": "v1"}
    fresh = copy.deepcopy(base)
    assert convlora.load_adapter(fresh, path) == "default"
    assert torch.equal(fresh(X), model(X))
    merged = convlora.merge_state_dict(base.state_dict(), path)
    assert torch.equal(merged["0.bias"], model[0].bias.detach())


def test_tensor_shape_and_key_errors(tmp_path: Path) -> None:
    path = convlora.save_adapter(adapted(three_convs(), 1), tmp_path / "a.safetensors")
    tensors, meta = convlora.read_adapter(path)
    raw = {k: (json.dumps(v) if not isinstance(v, str) else v) for k, v in meta.items()}
    bad = dict(tensors)
    bad["2.lora_A"] = torch.zeros(3, 3)
    del bad["4.lora_B"]
    bad["9.lora_A"] = torch.zeros(1)
    save_file(bad, str(tmp_path / "bad.safetensors"), metadata=raw)
    # Tensors that do not match the file's own metadata: a malformed file.
    with pytest.raises(AdapterFormatError, match=r"missing from the file: \['4.lora_B'\]; unexpected tensors: \['9.lora_A'\]"):
        convlora.load_adapter(three_convs(), tmp_path / "bad.safetensors")
    bad = dict(tensors)
    bad["2.lora_A"] = torch.zeros(3, 3)
    save_file(bad, str(tmp_path / "bad2.safetensors"), metadata=raw)
    with pytest.raises(AdapterFormatError, match=r"2.lora_A: shape \(3, 3\), expected \(2, 36\)"):
        convlora.load_adapter(three_convs(), tmp_path / "bad2.safetensors")


def test_corrupt_truncated_foreign_and_future_files(tmp_path: Path) -> None:
    path = convlora.save_adapter(adapted(three_convs(), 1), tmp_path / "a.safetensors")
    data = path.read_bytes()
    (tmp_path / "trunc.safetensors").write_bytes(data[:-10])
    with pytest.raises(AdapterFormatError, match="truncated or corrupt"):
        convlora.load_adapter(three_convs(), tmp_path / "trunc.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"PK\x03\x04 this is a zip file, not safetensors")
    with pytest.raises(AdapterFormatError, match="not a safetensors file"):
        convlora.load_adapter(three_convs(), tmp_path / "junk.safetensors")
    (tmp_path / "tiny.safetensors").write_bytes(b"abc")
    with pytest.raises(AdapterFormatError, match="only 3 bytes"):
        convlora.load_adapter(three_convs(), tmp_path / "tiny.safetensors")
    save_file({"w": torch.zeros(2)}, str(tmp_path / "plain.safetensors"))
    with pytest.raises(AdapterFormatError, match="not a convlora adapter"):
        convlora.load_adapter(three_convs(), tmp_path / "plain.safetensors")
    n = struct.unpack("<Q", data[:8])[0]
    header = json.loads(data[8:8 + n])
    header["__metadata__"]["format_version"] = "99"
    new = json.dumps(header).encode()
    (tmp_path / "v99.safetensors").write_bytes(struct.pack("<Q", len(new)) + new + data[8 + n:])
    with pytest.raises(AdapterFormatError,
                       match=f"format version '99'; convlora {convlora.__version__} reads versions '1', '2'"):
        convlora.load_adapter(three_convs(), tmp_path / "v99.safetensors")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        convlora.load_adapter(three_convs(), tmp_path / "missing.safetensors")


@pytest.mark.parametrize(("changes", "message"), [
    ({"bias": "trainable"}, r"bias='trainable' is not one of"),
    ({"bias_keys": '["0.bias"]'}, r"bias mode 'none' but the file lists biases \['0.bias'\]"),
    ({"bias": "lora_only", "bias_keys": '["5.bias"]'}, r"'5.bias'\] are not biases of the adapted layers"),
    ({"layers": "{not json"}, r"metadata field 'layers' is not valid JSON"),
    ({"adapter_name": "a b"}, r"adapter_name='a b' is not a Python identifier"),
    ({"base_sketch": '{"0": "x"}'}, r"'base_sketch' must map layers to lists of numbers"),
])
def test_bad_metadata_is_a_one_line_format_error(tmp_path: Path, changes: dict, message: str) -> None:
    path = convlora.save_adapter(adapted(three_convs(), 1), tmp_path / "a.safetensors")
    bad = rewrite_metadata(path, tmp_path / "bad.safetensors", **changes)
    with pytest.raises(AdapterFormatError, match=message) as info:
        convlora.read_adapter(bad)
    assert "\n" not in str(info.value)


def test_a_long_bad_value_is_shown_cut_to_120_characters(tmp_path: Path) -> None:
    path = convlora.save_adapter(adapted(three_convs(), 1), tmp_path / "a.safetensors")
    name = "not an identifier " * 20
    bad = rewrite_metadata(path, tmp_path / "bad.safetensors", adapter_name=name)
    with pytest.raises(AdapterFormatError, match="is not a Python identifier") as info:
        convlora.read_adapter(bad)
    shown = str(info.value).split("adapter_name=", 1)[1].split(" is not a Python identifier")[0]
    assert len(shown) == 120 and shown.endswith("...") and repr(name).startswith(shown[:-3])
