"""State-dict files: one reader and one writer for both suffixes, nesting, and bad files."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

import convlora
from convlora import StateDictError


def _state() -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)).state_dict()


def _equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return set(a) == set(b) and all(torch.equal(a[k], b[k]) and a[k].dtype == b[k].dtype for k in a)


@pytest.mark.parametrize("suffix", [".safetensors", ".pth", ".pt", ".bin"])
def test_round_trip_in_the_format_the_suffix_names(tmp_path: Path, suffix: str) -> None:
    state = _state()
    path = convlora.save_state_dict(state, tmp_path / "sub" / f"w{suffix}")
    assert _equal(convlora.load_state_dict(path), state)
    if suffix == ".safetensors":
        assert _equal(load_file(str(path)), state)
    else:  # a plain dict of tensors, readable by torch.load(weights_only=True)
        plain = torch.load(path, weights_only=True)
        assert type(plain) is dict and _equal(plain, state)
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temporary file left


def test_written_files_follow_the_umask(tmp_path: Path) -> None:
    old = os.umask(0o022)
    try:
        for suffix in (".safetensors", ".pth"):
            path = convlora.save_state_dict(_state(), tmp_path / f"w{suffix}")
            assert path.stat().st_mode & 0o777 == 0o644, suffix
    finally:
        os.umask(old)


def test_safetensors_never_reaches_torch_load(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    state = _state()
    save_file(state, str(tmp_path / "w.safetensors"))

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("torch.load was called for a .safetensors file")

    monkeypatch.setattr(torch, "load", refuse)
    assert _equal(convlora.load_state_dict(tmp_path / "w.safetensors"), state)
    (tmp_path / "bad.safetensors").write_bytes(b"\x80\x02 a pickle, not safetensors")
    with pytest.raises(StateDictError, match="not a readable safetensors file.*rename it to .pth"):
        convlora.load_state_dict(tmp_path / "bad.safetensors")


@pytest.mark.parametrize("nesting", [["params_ema"], ["params"], ["state_dict"], ["model"],
                                     ["model", "state_dict"]])
def test_nested_checkpoints_are_unwrapped(tmp_path: Path, nesting: list[str]) -> None:
    state = _state()
    obj: object = state
    for key in reversed(nesting):
        obj = {key: obj, "epoch": 3, "optimizer": {"lr": 0.1}}
    torch.save(obj, tmp_path / "ckpt.pth")
    assert _equal(convlora.load_state_dict(tmp_path / "ckpt.pth"), state)


def test_params_ema_wins_and_key_chooses(tmp_path: Path) -> None:
    ema, raw = _state(), {k: v + 1 for k, v in _state().items()}
    torch.save({"params": raw, "params_ema": ema}, tmp_path / "ckpt.pth")
    assert _equal(convlora.load_state_dict(tmp_path / "ckpt.pth"), ema)
    assert _equal(convlora.load_state_dict(tmp_path / "ckpt.pth", key="params"), raw)
    with pytest.raises(StateDictError, match=r"key='weights' is not in the checkpoint, which holds a dict "
                                             r"with keys \['params', 'params_ema'\]"):
        convlora.load_state_dict(tmp_path / "ckpt.pth", key="weights")


def test_ddp_module_prefix_is_removed_only_when_every_key_has_it(tmp_path: Path) -> None:
    state = _state()
    torch.save({f"module.{k}": v for k, v in state.items()}, tmp_path / "ddp.pth")
    assert _equal(convlora.load_state_dict(tmp_path / "ddp.pth"), state)
    assert list(convlora.load_state_dict(tmp_path / "ddp.pth", strip_prefix="")) == [
        f"module.{k}" for k in state]
    mixed = {"module.w": torch.zeros(1), "b": torch.zeros(1)}
    torch.save(mixed, tmp_path / "mixed.pth")
    assert list(convlora.load_state_dict(tmp_path / "mixed.pth")) == ["module.w", "b"]


class _Pickled:
    pass


@pytest.mark.parametrize(("content", "message"), [
    (lambda p: torch.save([torch.zeros(1)], p), r"holds a list, not a state dict"),
    (lambda p: torch.save({"epoch": 3, "lr": 0.1}, p), r"holds a dict with keys \['epoch', 'lr'\], not a state dict"),
    (lambda p: torch.save({}, p), r"holds an empty dict, not a state dict"),
    (lambda p: torch.save({"w": torch.zeros(1), "step": 3}, p), r"1 entries that are not name -> tensor pairs, e.g. \['step'\]"),
    (lambda p: torch.save({"w": _Pickled()}, p), r"pickled Python objects \(.*_Pickled\).*weights_only=True"),
    (lambda p: p.write_bytes(b"not a checkpoint at all"), r"is not a readable torch checkpoint"),
    (lambda p: save_file({"w": torch.zeros(2)}, str(p)), r"holds safetensors data under a .pth name; rename it"),
])
def test_non_state_dict_files_give_one_line_errors(tmp_path: Path, content, message: str) -> None:
    path = tmp_path / "x.pth"
    content(path)
    with pytest.raises(StateDictError, match=message) as info:
        convlora.load_state_dict(path)
    assert str(path) in str(info.value) and "\n" not in str(info.value)


def test_suffix_and_missing_file_errors(tmp_path: Path) -> None:
    with pytest.raises(StateDictError, match=r"unknown state-dict suffix '.npz'; use .safetensors"):
        convlora.load_state_dict(tmp_path / "w.npz")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        convlora.load_state_dict(tmp_path / "w.pth")
    with pytest.raises(StateDictError, match=r"unknown state-dict suffix '.ckpt'; write .safetensors, .pth"):
        convlora.save_state_dict(_state(), tmp_path / "w.ckpt")
    with pytest.raises(StateDictError, match=r"not name -> tensor pairs, e.g. \['step'\]"):
        convlora.save_state_dict({"w": torch.zeros(1), "step": 3}, tmp_path / "w.pth")  # type: ignore[dict-item]
    save_file(_state(), str(tmp_path / "w.safetensors"))
    with pytest.raises(StateDictError, match="key='params' applies to torch checkpoints"):
        convlora.load_state_dict(tmp_path / "w.safetensors", key="params")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["w.safetensors"]


def test_shared_and_view_tensors_are_written(tmp_path: Path) -> None:
    w = torch.randn(4, 6)
    state = {"a": w, "tied": w, "row": w[1], "t": w.t()}
    for suffix in (".safetensors", ".pth"):
        back = convlora.load_state_dict(convlora.save_state_dict(state, tmp_path / f"s{suffix}"))
        assert all(torch.equal(back[k], v) for k, v in state.items()), suffix


def test_real_checkpoints_flat_and_training_form(shared_data: Path) -> None:
    """The shared SPAN weights: flat files as they are; the training checkpoint (``params`` and
    ``params_ema``, saved on CUDA) unwrapped to ``params_ema`` on the CPU, ``key=`` picks ``params``."""
    weights = shared_data / "weights"
    flat = convlora.load_state_dict(weights / "span_ch28.pth")
    assert _equal(flat, torch.load(weights / "span_ch28.pth", map_location="cpu", weights_only=True))
    path = weights / "span_ch28_ema_trainckpt.pth"
    raw = torch.load(path, map_location="cpu", weights_only=True)
    ema, params = convlora.load_state_dict(path), convlora.load_state_dict(path, key="params")
    assert _equal(ema, dict(raw["params_ema"])) and _equal(params, dict(raw["params"]))
    assert set(ema) == set(flat) and all(t.device.type == "cpu" for t in ema.values())
