"""PEFT folders on disk: every config field honoured or refused by name, malformed and broken
folders refused, an existing folder never overwritten; a refused call changes nothing."""

from __future__ import annotations

import copy
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

import convlora
from convlora import AdapterFormatError, ConvLoRAError
from tests._core_helpers import module_types
from tests._peft_helpers import peft_model, small_net, small_peft_folder, state_copy, unchanged

pytestmark = [pytest.mark.usefixtures("one_thread"),
              pytest.mark.filterwarnings("ignore::UserWarning")]  # PEFT warns about grouped convs


@pytest.fixture()
def peft_folder(tmp_path: Path) -> Path:
    return small_peft_folder(tmp_path)


def _edit(folder: Path, change: Callable[[dict[str, Any]], None]) -> None:
    path = folder / "adapter_config.json"
    cfg = json.loads(path.read_text())
    change(cfg)
    path.write_text(json.dumps(cfg))


@pytest.mark.parametrize("field, value, match", [
    ("use_dora", True, r"0\.lora_magnitude_vector is missing \(the config has use_dora=true"),
    ("use_dora", "yes", "'use_dora'='yes' must be true or false"),
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
    ("init_lora_weights", "gaussian", None),  # ignored: it only set the initial values
    ("brand_new_option", None, None),  # unknown but off: accepted
])
def test_config_fields_are_honoured_or_refused_naming_them(peft_folder: Path, field: str, value: Any,
                                                           match: str | None) -> None:
    _edit(peft_folder, lambda c: c.__setitem__(field, value))
    model = small_net()
    before, types = state_copy(model), module_types(model)
    if match is None:
        convlora.load_peft_adapter(model, peft_folder)
        return
    with pytest.raises(AdapterFormatError, match=match) as info:
        convlora.load_peft_adapter(model, peft_folder)
    assert "\n" not in str(info.value)
    unchanged(model, before, types)


def test_a_long_bad_value_is_shown_cut_to_120_characters(peft_folder: Path) -> None:
    alpha = "eight " * 40
    _edit(peft_folder, lambda c: c.__setitem__("lora_alpha", alpha))
    with pytest.raises(AdapterFormatError, match="must be a positive number") as info:
        convlora.load_peft_adapter(small_net(), peft_folder)
    shown = str(info.value).split("'lora_alpha'=", 1)[1].split(" must be a positive number")[0]
    assert len(shown) == 120 and shown.endswith("...") and repr(alpha).startswith(shown[:-3])


def test_malformed_folder_is_refused(peft_folder: Path, tmp_path: Path) -> None:
    model = small_net()
    (peft_folder / "adapter_config.json").write_text("{not json")
    with pytest.raises(AdapterFormatError, match="not valid JSON"):
        convlora.load_peft_adapter(model, peft_folder)
    (peft_folder / "adapter_config.json").write_text("[1, 2]")
    with pytest.raises(AdapterFormatError, match="not a JSON object"):
        convlora.load_peft_adapter(model, peft_folder)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        convlora.load_peft_adapter(model, tmp_path / "nowhere")


def test_bias_tensors_must_agree_with_the_bias_mode(tmp_path: Path) -> None:
    base = small_net()
    pm = peft_model(base, r=2, target_modules=["2"], bias="all")
    pm.save_pretrained(tmp_path / "p")
    _edit(tmp_path / "p", lambda c: c.__setitem__("bias", "none"))
    with pytest.raises(AdapterFormatError, match="'bias'='none' does not allow the bias tensor"):
        convlora.load_peft_adapter(copy.deepcopy(base), tmp_path / "p")


def test_broken_weights_are_refused(peft_folder: Path) -> None:
    from safetensors.torch import load_file, save_file
    weights = peft_folder / "adapter_model.safetensors"
    tensors = load_file(str(weights))
    lora_b = tensors.pop("base_model.model.2.lora_B.weight")
    save_file(tensors, str(weights))
    with pytest.raises(AdapterFormatError, match=r"2\.lora_B\.weight is missing"):
        convlora.load_peft_adapter(small_net(), peft_folder)
    tensors["base_model.model.2.lora_B.weight"] = lora_b
    tensors["base_model.model.4.weight"] = torch.zeros(4, 8, 1, 1)
    save_file(tensors, str(weights))
    with pytest.raises(AdapterFormatError, match=r"unexpected tensor '4\.weight'"):
        convlora.load_peft_adapter(small_net(), peft_folder)
    weights.write_bytes(weights.read_bytes()[:-7])
    with pytest.raises(AdapterFormatError, match="could not be read as safetensors"):
        convlora.load_peft_adapter(small_net(), peft_folder)


def test_output_folder_is_never_overwritten(tmp_path: Path) -> None:
    model = small_net()
    convlora.inject(model, rank=2)
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("x")
    with pytest.raises(ConvLoRAError, match="already exists"):
        convlora.save_peft_adapter(model, tmp_path / "out")
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["keep.txt"]
    (tmp_path / "empty").mkdir()
    convlora.save_peft_adapter(model, tmp_path / "empty")  # an empty folder is fine
    assert len(list((tmp_path / "empty").iterdir())) == 2



def test_a_failed_export_leaves_no_folder_and_no_temporary(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import convlora.peft_format as peft_format

    def half_then_fail(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"partial")
        raise OSError(28, "No space left on device (simulated)")

    monkeypatch.setattr(peft_format, "save_file", half_then_fail)
    model = small_net()
    convlora.inject(model, rank=2)
    with pytest.raises(OSError, match="No space left"):
        convlora.save_peft_adapter(model, tmp_path / "out")
    (tmp_path / "empty").mkdir()
    with pytest.raises(OSError, match="No space left"):
        convlora.save_peft_adapter(model, tmp_path / "empty")
    assert [p.name for p in tmp_path.iterdir()] == ["empty"] and not list((tmp_path / "empty").iterdir())


def test_a_pickled_adapter_model_bin_is_never_read(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    peft_model(small_net(), r=2, target_modules=["0", "2"]).save_pretrained(tmp_path / "p", safe_serialization=False)
    assert (tmp_path / "p" / "adapter_model.bin").is_file()
    assert not (tmp_path / "p" / "adapter_model.safetensors").exists()

    def no_pickle(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("torch.load was called")

    monkeypatch.setattr(torch, "load", no_pickle)
    model = small_net()
    before, types = state_copy(model), module_types(model)
    with pytest.raises(FileNotFoundError, match=r"has no adapter_model\.safetensors \(it has adapter_model\.bin: "
                       r"convlora reads safetensors only; re-save it with save_pretrained\(safe_serialization=True\)"):
        convlora.load_peft_adapter(model, tmp_path / "p")
    unchanged(model, before, types)
