"""Merge state: contexts restore on error, double merges and switches while merged are refused."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import convlora
from convlora import MergeStateError
from tests._core_helpers import randomize_adapters

METHODS = ["lora", "dora", "loha", "lokr"]


def _model(method: str = "lora") -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1))
    x = torch.randn(2, 3, 10, 10)
    y0 = model(x)
    convlora.inject(model, rank=2, method=method)
    randomize_adapters(model)
    return model, x, y0


@pytest.mark.parametrize("method", METHODS)
def test_merge_twice_is_refused_and_changes_nothing(method: str) -> None:
    model, x, _ = _model(method)
    convlora.merge(model)
    w = model[0].weight.detach().clone()
    with pytest.raises(MergeStateError, match="already merged; merging again would add their deltas twice"):
        convlora.merge(model)
    assert torch.equal(model[0].weight, w)
    assert convlora.is_merged(model)


def test_unmerge_when_not_merged() -> None:
    model, _, _ = _model()
    with pytest.raises(MergeStateError, match="not merged"):
        convlora.unmerge(model)


def test_merge_without_lora_layers() -> None:
    with pytest.raises(MergeStateError, match="no LoRA layers; call convlora.inject"):
        convlora.merge(nn.Sequential(nn.Conv2d(1, 1, 1)))


@pytest.mark.parametrize("method", METHODS)
def test_merged_context_restores_even_on_exception(method: str) -> None:
    model, x, _ = _model(method)
    y = model(x)
    w = model[0].weight.detach().clone()
    with pytest.raises(RuntimeError, match="boom"), convlora.merged(model):
        assert convlora.is_merged(model)
        torch.testing.assert_close(model(x), y, atol=1e-5, rtol=1e-5)
        raise RuntimeError("boom")
    assert not convlora.is_merged(model)
    assert torch.equal(model[0].weight, w)


@pytest.mark.parametrize("method", METHODS)
def test_disabled_gives_base_output_and_restores_merge_state(method: str) -> None:
    model, x, y0 = _model(method)
    y = model(x)
    convlora.merge(model)
    with pytest.raises(KeyError), convlora.disabled(model):
        assert torch.equal(model(x), y0)
        raise KeyError("inside")
    assert convlora.is_merged(model)
    torch.testing.assert_close(model(x), y, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("method", METHODS)
def test_switch_while_merged_and_load_into_merged_are_refused(tmp_path, method: str) -> None:
    model, x, _ = _model(method)
    convlora.save_adapter(model, tmp_path / "a.safetensors")
    convlora.inject(model, convlora.LoRAConfig(rank=1, method=method), adapter_name="other")
    convlora.merge(model)
    with pytest.raises(MergeStateError, match=r"model is merged; call convlora.unmerge\(\) before switching"):
        convlora.set_adapter(model, "default")
    with pytest.raises(MergeStateError, match="is merged; unmerge"):
        convlora.load_adapter(model, tmp_path / "a.safetensors", name="third")
    with pytest.raises(MergeStateError, match="merged"):
        convlora.delete_adapter(model, "other")


def test_no_grad_and_inference_mode() -> None:
    model, x, _ = _model()
    y = model(x)
    with torch.no_grad():
        torch.testing.assert_close(model(x), y)
    with torch.inference_mode():
        torch.testing.assert_close(model(x), y)
        convlora.merge(model)
        torch.testing.assert_close(model(x), y, atol=1e-5, rtol=1e-5)
        convlora.unmerge(model)
