"""Property tests of the LoRA layer over random conv configurations (hypothesis)."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

import convlora
from convlora.functional import delta_weight
from tests._core_helpers import ATOL, keys_and_shapes, module_types, randomize_adapters

SETTINGS = settings(max_examples=60, deadline=None, derandomize=True,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])


@st.composite
def conv_configs(draw: st.DrawFn) -> dict:
    ndim = draw(st.sampled_from([1, 2, 2, 2, 3]))
    kmax = 7 if ndim < 3 else 3
    kernel = tuple(draw(st.integers(1, kmax)) for _ in range(ndim))
    groups_kind = draw(st.sampled_from(["one", "two", "depthwise"]))
    base_ch = draw(st.integers(1, 4))
    if groups_kind == "one":
        cin, cout, groups = base_ch * 2, draw(st.integers(1, 8)), 1
    elif groups_kind == "two":
        cin, cout, groups = base_ch * 2, 2 * draw(st.integers(1, 4)), 2
    else:
        cin = base_ch * 2
        cout, groups = cin * draw(st.integers(1, 2)), cin
    stride = draw(st.integers(1, 2))
    dilation = draw(st.integers(1, 2))
    padding_mode = draw(st.sampled_from(["zeros", "zeros", "reflect", "replicate", "circular"]))
    pad_kind = draw(st.sampled_from(["int", "tuple", "same", "valid"]))
    if pad_kind == "same" and stride != 1:
        pad_kind = "int"
    if pad_kind == "int":
        padding: object = draw(st.integers(0, 2))
    elif pad_kind == "tuple":
        padding = tuple(draw(st.integers(0, 2)) for _ in range(ndim))
    else:
        padding = pad_kind
    return dict(ndim=ndim, cin=cin, cout=cout, kernel=kernel, stride=stride, padding=padding,
                dilation=dilation, groups=groups, padding_mode=padding_mode,
                bias=draw(st.booleans()),
                dtype=draw(st.sampled_from([torch.float32, torch.float32, torch.bfloat16])),
                factorization=draw(st.sampled_from(["kernel", "kernel", "loralib"])),
                rank_frac=draw(st.floats(0.0, 1.0)), seed=draw(st.integers(0, 2**16)))


def build(cfg: dict) -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(cfg["seed"])
    cls = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}[cfg["ndim"]]
    conv = cls(cfg["cin"], cfg["cout"], cfg["kernel"], stride=cfg["stride"], padding=cfg["padding"],
               dilation=cfg["dilation"], groups=cfg["groups"], bias=cfg["bias"],
               padding_mode=cfg["padding_mode"])
    model = nn.Sequential(conv).to(cfg["dtype"])
    size = 9 if cfg["ndim"] < 3 else 7
    x = torch.randn(2, cfg["cin"], *([size] * cfg["ndim"])).to(cfg["dtype"])
    return model, x


def pick_factorization_and_rank(layer_weight: torch.Tensor, cfg: dict, method: str = "lora") -> tuple[str, int]:
    """The drawn factorization where the layer and ``method`` allow it, else ``"kernel"`` (LoHa
    and LoKr have their own layout, ``"kernel"``); the rank the drawn fraction of its limit."""
    shape = tuple(layer_weight.shape)
    fac = "kernel" if method in ("loha", "lokr") else cfg["factorization"]
    if fac == "loralib" and (len(shape) != 4 or shape[2] != shape[3] or cfg["groups"] != 1):
        fac = "kernel"
    limit = convlora.functional.max_rank(fac, shape, cfg["groups"])
    return fac, max(1, round(cfg["rank_frac"] * limit))


@SETTINGS
@given(cfg=conv_configs())
def test_conv_grid_inject_merge_unmerge_unload(cfg: dict, tmp_path_factory: pytest.TempPathFactory) -> None:
    model, x = build(cfg)
    original = copy.deepcopy(model)
    try:
        y0 = model(x)
    except RuntimeError:  # configuration invalid for this input (e.g. reflect pad too large)
        return
    fac, rank = pick_factorization_and_rank(model[0].weight, cfg)
    alpha = 2.0 * rank
    names = convlora.inject(model, rank=rank, alpha=alpha, factorization=fac)
    assert names == ["0"]
    assert torch.equal(model(x), y0), "a fresh adapter (B = 0) must not change the output"

    randomize_adapters(model, cfg["seed"])
    layer = model[0]
    y_unmerged = model(x)
    assert not torch.allclose(y_unmerged.float(), y0.float(), atol=1e-3), "adapter had no effect"

    # Independent reference: a plain conv with W + scale * reshape(B @ A) computed here.
    ref = copy.deepcopy(original)
    a, b = layer.lora_A["default"], layer.lora_B["default"]
    with torch.no_grad():
        w = ref[0].weight
        w.copy_((w.float() + (b.float() @ a.float()).reshape(w.shape) * (alpha / rank)).to(w.dtype))
    torch.testing.assert_close(y_unmerged, ref(x), atol=ATOL[cfg["dtype"]], rtol=1e-2)
    torch.testing.assert_close(delta_weight(a, b, w.shape, alpha / rank),
                               (b.float() @ a.float()).reshape(w.shape) * (alpha / rank))

    w_before = layer.weight.detach().clone()
    convlora.merge(model)
    y_merged = model(x)
    torch.testing.assert_close(y_merged, y_unmerged, atol=ATOL[cfg["dtype"]], rtol=1e-3)
    convlora.unmerge(model)
    assert torch.equal(layer.weight, w_before), "unmerge must restore the weights exactly"

    path = Path(tmp_path_factory.mktemp("ad")) / "a.safetensors"
    convlora.save_adapter(model, path)
    fresh = copy.deepcopy(original)
    convlora.load_adapter(fresh, path)
    assert torch.equal(fresh(x), y_unmerged)

    deployed = convlora.unload(model)
    assert module_types(deployed) == module_types(original)
    assert keys_and_shapes(deployed) == keys_and_shapes(original)
    torch.testing.assert_close(deployed(x), y_unmerged, atol=ATOL[cfg["dtype"]], rtol=1e-3)
    restored = copy.deepcopy(original)
    restored.load_state_dict(deployed.state_dict(), strict=True)


@SETTINGS
@given(st.integers(1, 16), st.integers(1, 16), st.booleans(), st.integers(0, 999))
def test_linear_layers(cin: int, cout: int, bias: bool, seed: int) -> None:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(cin, cout, bias=bias))
    x = torch.randn(3, 5, cin)
    y0 = model(x)
    convlora.inject(model, rank=min(cin, cout), targets="0")
    assert torch.equal(model(x), y0)
    randomize_adapters(model, seed)
    y1 = model(x)
    with convlora.merged(model):
        torch.testing.assert_close(model(x), y1, atol=1e-5, rtol=1e-4)
    assert isinstance(convlora.unload(model)[0], nn.Linear)


def test_bf16_merge_matches_unmerged_and_unmerge_is_exact() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1)).to(torch.bfloat16)
    x = torch.randn(1, 8, 12, 12, dtype=torch.bfloat16)
    convlora.inject(model, rank=4)
    randomize_adapters(model, std=0.01)  # a delta far below bf16's resolution of some weights
    w0 = model[0].weight.detach().clone()
    y = model(x)
    convlora.merge(model)
    assert torch.equal(model(x), y), "merged and unmerged build the same bf16 weight"
    convlora.unmerge(model)
    assert torch.equal(model[0].weight, w0)


def test_dropout_two_path_forward() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(4, 6, 3, padding=1, padding_mode="reflect"))
    x = torch.randn(2, 4, 8, 8)
    convlora.inject(model, rank=2, dropout=0.5)
    randomize_adapters(model)
    model.eval()
    y_eval = model(x)
    model.train()
    torch.manual_seed(1)
    y_train = model(x)
    assert not torch.allclose(y_train, y_eval), "dropout must act on the adapter path in training"
    # With dropout's mask forced to ones (p -> eval), the two paths equal the weight-space path.
    model[0].dropout["default"] = 0.0
    torch.testing.assert_close(model(x), y_eval, atol=1e-5, rtol=1e-5)
    # The base output is untouched by dropout: disabling adapters gives the same in both modes.
    with convlora.disabled(model):
        torch.testing.assert_close(model(x), model.eval()(x))


def test_gradients_reach_only_the_adapters() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 3, 1))
    convlora.inject(model, rank=2)
    model(torch.randn(2, 3, 8, 8)).sum().backward()
    for name, p in model.named_parameters():
        if ".lora_" in name:
            assert p.requires_grad and p.grad is not None
        else:
            assert not p.requires_grad and p.grad is None, name
    # B starts at zero, so only B gets a non-zero gradient at the first step (A's is B^T-scaled).
    assert model[0].lora_B["default"].grad.abs().sum() > 0
