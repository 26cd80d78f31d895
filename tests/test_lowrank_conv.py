"""The activation-space backward of convlora.lowrank_conv: same forward bits, the formula's gradients.

The property test runs the random conv grid of tests/test_layer.py (Conv1d/2d/3d, every padding
mode and kind, stride, dilation, groups, bias) for LoRA, DoRA, LoHa and LoKr with the size threshold
lowered to 0 so every eligible layer takes the path: its training forward equals the merged
layer's output bit for bit, and the gradients of the input, the bias and every factor equal
autograd through an independent float64 reference of the method's formula (DoRA's norm
detached), including a DoRA channel whose magnitude is 0.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

import convlora
import convlora.layer
import convlora.lowrank_conv
from convlora.lokr import kron_split
from convlora.lowrank_conv import (
    activation_backward_conv,
    activation_backward_kron_conv,
    activation_backward_pays,
    conv_spec,
)
from tests._core_helpers import randomize_adapters
from tests._method_refs import reference_weight
from tests.test_layer import build, conv_configs

SETTINGS = settings(max_examples=60, deadline=None, derandomize=True,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
METHODS = ["lora", "dora", "loha", "lokr"]


@pytest.fixture
def calls(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[int]]:
    """Count the layer's calls of the activation-space functions."""
    seen: list[int] = []
    for name in ("activation_backward_conv", "activation_backward_kron_conv"):
        real = getattr(convlora.layer, name)

        def spy(*args, real=real, **kwargs):
            seen.append(1)
            return real(*args, **kwargs)

        monkeypatch.setattr(convlora.layer, name, spy)
    yield seen


def _eligible_rank(method: str, cfg: dict, weight: torch.Tensor, frac: float) -> int | None:
    """A rank the path takes on this layer (``3 * groups * r < out``, ``r**2`` for LoHa), or None."""
    limit = convlora.functional.max_rank("kernel", tuple(weight.shape), cfg["groups"])
    if method == "lokr":  # the rank picks a full or a low-rank W2; the path needs a >= 4 of out = a * b
        a = kron_split(weight.shape[0])[0]
        return max(1, round(frac * 8)) if a >= 4 else None
    for rank in range(max(1, round(frac * limit)), 0, -1):
        if activation_backward_pays((weight.shape[0], 1 << 20), cfg["groups"],
                                    rank * rank if method == "loha" else rank):
            return rank
    return None


def _reference_grads(original: nn.Module, layer: nn.Module, method: str, x: torch.Tensor,
                     probe: torch.Tensor) -> dict[str, torch.Tensor]:
    base = copy.deepcopy(original[0]).double()
    factors = {k: v.detach().double().clone().requires_grad_(True)
               for k, v in layer.factors("default").items()}
    w = base.weight.detach().clone()
    bias = None if base.bias is None else base.bias.detach().clone().requires_grad_(True)
    x_ref = x.detach().double().clone().requires_grad_(True)
    w_eff = reference_weight(method, w, factors, layer.scale("default"), layer.groups, False,
                             detach_norm=True)
    y = torch.func.functional_call(base, {"weight": w_eff, "bias": bias}, (x_ref,))
    (y * probe.double()).sum().backward()
    out = {"x": x_ref.grad, **{k: v.grad for k, v in factors.items()}}
    if bias is not None:
        out["bias"] = bias.grad
    return out


@SETTINGS
@given(cfg=conv_configs(), method=st.sampled_from(METHODS), zero_channel=st.booleans(),
       per_group=st.integers(4, 10))
def test_conv_grid_same_forward_bits_and_the_formulas_gradients(cfg: dict, method: str, zero_channel: bool,
                                                                per_group: int, calls: list[int]) -> None:
    _grid_case(cfg, method, False, zero_channel, per_group, calls)


@pytest.mark.parametrize("method", ["loha", "lokr"])
@settings(SETTINGS, max_examples=15)
@given(cfg=conv_configs(), per_group=st.integers(4, 10))
def test_conv_grid_tucker_same_forward_bits_and_the_formulas_gradients(cfg: dict, method: str, per_group: int,
                                                                       calls: list[int]) -> None:
    """The Tucker forms (where they apply; elsewhere the flattened factors) on the same grid."""
    _grid_case(cfg, method, True, False, per_group, calls)


def _grid_case(cfg: dict, method: str, tucker: bool, zero_channel: bool, per_group: int,
               calls: list[int]) -> None:
    calls.clear()  # the fixture lives across hypothesis examples
    # float64, and enough output channels per group for the path (3 * groups * r < out); LoKr's
    # path is for groups=1 and out = a * b with a >= 4
    cfg = {**cfg, "dtype": torch.float64, "cout": cfg["groups"] * per_group}
    if method == "lokr":
        cfg = {**cfg, "groups": 1, "cout": 4 * per_group}
    model, x = build(cfg)
    try:
        model(x)
    except RuntimeError:  # configuration invalid for this input (e.g. reflect pad too large)
        return
    original = copy.deepcopy(model)
    rank = _eligible_rank(method, cfg, model[0].weight, cfg["rank_frac"])
    if rank is None:
        return
    convlora.inject(model, rank=rank, alpha=1.5 * rank, method=method, tucker=tucker)
    layer = model[0]
    randomize_adapters(model, cfg["seed"], std=0.5)
    if method == "dora":
        with torch.no_grad():  # the magnitude away from ||W||, and 0 on one channel if drawn
            m = layer.lora_magnitude["default"]
            m.mul_(1.0 + torch.rand(m.shape, generator=torch.Generator().manual_seed(cfg["seed"])).to(m))
            if zero_channel:
                m[0] = 0.0
    if layer.bias is not None:
        layer.bias.requires_grad_(True)
    x = x.clone().requires_grad_(True)
    with pytest.MonkeyPatch.context() as mp:  # every size, and DoRA's memory rule lifted
        mp.setattr(convlora.lowrank_conv, "ACTIVATION_BACKWARD_MIN_WEIGHT", 0)
        mp.setattr(convlora.layer, "activation_backward_pays",
                   lambda shape, groups, rank, kept=0: activation_backward_pays(shape, groups, rank))
        y = model(x)
    uses_path = not (cfg["padding"] == "same" and any(
        d * (k - 1) % 2 for d, k in zip(layer.dilation, layer.kernel_size)))
    assert len(calls) == int(uses_path)
    probe = torch.randn_like(y)
    (y * probe).sum().backward()
    with torch.no_grad():
        convlora.merge(model)
        assert torch.equal(model(x), y), "the training forward must equal the merged layer bit for bit"
        convlora.unmerge(model)
    ref = _reference_grads(original, layer, method, x, probe)
    got = {"x": x.grad, **{k: v.grad for k, v in layer.factors("default").items()}}
    if layer.bias is not None:
        got["bias"] = layer.bias.grad
    assert got.keys() == ref.keys()
    for k in ref:
        torch.testing.assert_close(got[k], ref[k], rtol=1e-9, atol=1e-11, msg=k)


def test_gradcheck_of_the_function_itself() -> None:
    """Analytic against numerical gradients (no reference formula involved), grouped and strided."""
    gen = torch.Generator().manual_seed(0)

    def rnd(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen, dtype=torch.float64).requires_grad_(True)

    for ndim, groups, stride, padding, dilation in [(1, 1, 1, 1, 1), (2, 2, 2, 0, 1), (3, 1, 1, 1, 2)]:
        cin, cout, k = 2 * groups, 4, 3
        x = rnd(2, cin, *([6 if ndim < 3 else 4] * ndim))
        weight = torch.randn(cout, cin // groups, *([k] * ndim), generator=gen, dtype=torch.float64)
        a, b, bias = rnd(2, cin // groups * k ** ndim), rnd(cout, 2), rnd(cout)
        spec = conv_spec(ndim, (k,) * ndim, (stride,) * ndim, (padding,) * ndim, (dilation,) * ndim,
                         groups)
        assert spec is not None
        assert torch.autograd.gradcheck(
            lambda x, bias, a, b, weight=weight, spec=spec: activation_backward_conv(
                x, weight, bias, a, b, 0.7, spec),
            (x, bias, a, b))
    # LoKr, out = 4 * 2 and in = 2 * 2 (W1: 4 x 2, W2: 2 x (2 * 9)), strided and padded
    x = rnd(1, 4, 5, 5)
    weight = torch.randn(8, 4, 3, 3, generator=gen, dtype=torch.float64)
    spec = conv_spec(2, (3, 3), (2, 2), (1, 1), (1, 1), 1)
    assert spec is not None
    assert torch.autograd.gradcheck(
        lambda x, bias, w1, w2: activation_backward_kron_conv(x, weight, bias, w1, w2, 0.7, spec),
        (x, rnd(8), rnd(4, 2), rnd(2, 18)))


def test_in_place_ops_on_the_output_stay_allowed_and_gradients_stay_right() -> None:
    """DoRA keeps ``y - bias`` in a tensor of its own, so an in-place ReLU after the conv is fine."""
    torch.manual_seed(1)
    model = nn.Sequential(nn.Conv2d(128, 128, 3, padding=1), nn.ReLU(inplace=True)).double()
    twin = copy.deepcopy(model)
    for m in (model, twin):
        convlora.inject(m, rank=4, method="dora", targets="0")
    randomize_adapters(model, 2, std=0.05)
    randomize_adapters(twin, 2, std=0.05)
    x = torch.randn(2, 128, 5, 5, dtype=torch.float64)
    (model(x) ** 2).sum().backward()  # 128x128x3x3 takes the path at the default threshold
    twin[0]._activation_backward_forward = lambda x, name: None
    (twin(x) ** 2).sum().backward()
    for (name, p), q in zip(model[0].factors("default").items(), twin[0].factors("default").values()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-9, atol=1e-12, msg=name)


@pytest.mark.parametrize("method", [*METHODS, "loha+tucker", "lokr+tucker"])
def test_nothing_weight_sized_is_kept_for_backward(method: str, calls: list[int]) -> None:
    """Only activations and small factors are saved (the weight-space backward keeps ``W'``)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(256, 256, 3, padding=1))
    convlora.inject(model, rank=4, method=method.removesuffix("+tucker"), tucker=method.endswith("+tucker"))
    assert model[0].tucker["default"] == method.endswith("+tucker")
    randomize_adapters(model, 3)
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved: list[int] = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        if t.untyped_storage().data_ptr() not in params:
            saved.append(t.numel())
        return t

    x = torch.randn(2, 256, 4, 4)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(x).sum().backward()
    assert calls == [1]
    weight = model[0].weight.numel()
    assert saved and max(saved) < weight // 8, (max(saved), weight)


def _routes(calls: list[int], model: nn.Module, x: torch.Tensor, **ctx: bool) -> bool:
    calls.clear()
    if ctx.get("autocast"):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            model(x).float().sum().backward()
    else:
        model(x).sum().backward()
    return bool(calls)


def test_what_takes_the_path_at_the_default_threshold(calls: list[int]) -> None:
    """Large convs take it; small ones, grouped LoKr, bf16, autocast, a trainable base weight,
    unbatched input, asymmetric 'same' padding, a near-full rank and DoRA on outputs larger than
    the weight keep the weight-space backward."""
    torch.manual_seed(0)

    def one(conv: nn.Module, rank: int = 4, method: str = "lora") -> nn.Module:
        model = nn.Sequential(conv)
        convlora.inject(model, rank=rank, method=method)
        return model

    big = torch.randn(2, 128, 6, 6)
    assert _routes(calls, one(nn.Conv2d(128, 128, 3, padding=1)), big)
    assert _routes(calls, one(nn.Conv2d(128, 128, 3, padding=1), method="loha", rank=2), big)
    assert not _routes(calls, one(nn.Conv2d(128, 128, 3, padding=1), method="loha", rank=8), big)
    assert not _routes(calls, one(nn.Conv2d(48, 48, 3, padding=1)), torch.randn(2, 48, 6, 6))
    assert _routes(calls, one(nn.Conv2d(128, 128, 3, padding=1), method="lokr"), big)
    assert not _routes(calls, one(nn.Conv2d(128, 128, 3, padding=1, groups=2), method="lokr"), big)
    assert not _routes(calls, one(nn.Conv2d(128, 128, 3, padding=1), rank=43), big)
    assert not _routes(calls, one(nn.Conv2d(128, 128, 3, padding=1)).bfloat16(), big.bfloat16())
    assert not _routes(calls, one(nn.Conv2d(128, 128, 3, padding=1)), big, autocast=True)
    assert not _routes(calls, one(nn.Conv2d(128, 128, 4, padding="same")), big)
    assert not _routes(calls, one(nn.Conv2d(128, 128, 3, padding=1)), big[0])
    trainable = one(nn.Conv2d(128, 128, 3, padding=1))
    trainable[0].weight.requires_grad_(True)
    assert not _routes(calls, trainable, big)
    # DoRA keeps y - bias: only where that is no larger than the W' the weight space would keep
    wide = torch.randn(2, 128, 40, 40)  # output 409,600 entries > 147,456 weight entries
    assert not _routes(calls, one(nn.Conv2d(128, 128, 3, padding=1), method="dora"), wide)
    assert _routes(calls, one(nn.Conv2d(128, 128, 3, padding=1), method="lora"), wide)
    assert _routes(calls, one(nn.Conv2d(128, 128, 3, padding=1, padding_mode="reflect"),
                              method="dora"), big)
    calls.clear()
    with torch.no_grad():
        one(nn.Conv2d(128, 128, 3, padding=1))(big)
    assert not calls


@pytest.mark.parametrize("method", ["lora", "dora", "lokr"])
def test_compile_fullgraph_matches_eager(method: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """LoRA's and LoKr's paths compile in one graph; DoRA (whose zero-magnitude check is data-dependent)
    keeps its branch-free weight-space backward under torch.compile."""
    monkeypatch.setattr(convlora.lowrank_conv, "ACTIVATION_BACKWARD_MIN_WEIGHT", 0)
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1, padding_mode="reflect"), nn.SiLU(),
                          nn.Conv2d(16, 16, 3, padding=1, groups=2))
    convlora.inject(model, rank=2, method=method)
    randomize_adapters(model, 5)
    x = torch.randn(2, 3, 8, 8)
    eager = model(x)
    eager.square().mean().backward()
    grads = [p.grad.clone() for p in convlora.lora_parameters(model)]
    for p in convlora.lora_parameters(model):
        p.grad = None
    out = torch.compile(model, backend="aot_eager", fullgraph=True)(x)
    torch.testing.assert_close(out, eager, atol=1e-6, rtol=1e-6)
    out.square().mean().backward()
    for g, p in zip(grads, convlora.lora_parameters(model)):
        torch.testing.assert_close(p.grad, g, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("method", METHODS)
def test_torch_func_grad_and_per_sample_vmap_still_work(method: str, calls: list[int]) -> None:
    """Under torch.func transforms the layer keeps plain autograd of ``W'``: ``grad`` equals
    autograd's gradient and ``vmap(grad)`` gives each sample's gradient (e.g. for DP-SGD)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(128, 128, 3, padding=1)).double()
    convlora.inject(model, rank=2, method=method)
    randomize_adapters(model, 8, std=0.05)
    x = torch.randn(3, 128, 4, 4, dtype=torch.float64)
    params = {k: v.detach() for k, v in model.named_parameters() if v.requires_grad}

    def loss(p: dict, xs: torch.Tensor) -> torch.Tensor:
        return torch.func.functional_call(model, p, (xs,)).square().sum()

    (model(x).square().sum()).backward()  # eager autograd: the activation-space path
    assert calls == [1]
    got = torch.func.grad(loss)(params, x)
    per_sample = torch.func.vmap(torch.func.grad(loss), in_dims=(None, 0))(params, x[:, None])
    assert calls == [1], "no transform call may take the activation-space path"
    for k, p in model.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(got[k], p.grad, rtol=1e-10, atol=1e-12, msg=k)
            torch.testing.assert_close(per_sample[k].sum(0), p.grad, rtol=1e-10, atol=1e-12, msg=k)
