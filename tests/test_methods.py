"""Every adapter method (LoRA, rsLoRA, DoRA, LoHa, LoKr) on every layer type, exact when merged.

The property tests run the random conv grid of tests/test_layer.py and a grid of transposed
convs (stride, padding, output_padding, dilation, groups, ``output_size``) for each method:
a fresh adapter changes nothing, the unmerged output matches an independent reference of the
method's formula, merged equals unmerged bit for bit, unmerge restores the weight, the adapter
file round-trips, ``merge_state_dict`` equals ``unload``'s state dict.
"""

from __future__ import annotations

import copy
import json
import math
import struct
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

import convlora
from convlora.errors import AdapterFormatError, UnsupportedLayerError
from convlora.methods import tucker_applies
from convlora.state_dict import merge_state_dict
from tests._core_helpers import ATOL, keys_and_shapes, module_types, randomize_adapters
from tests._method_refs import reference_weight, scale_of
from tests.test_layer import build, conv_configs, pick_factorization_and_rank

METHODS = ["lora", "dora", "loha", "lokr"]
# the methods and the Tucker forms, as inject keywords (rank 1: where Tucker LoKr applies on small convs)
VARIANTS = {**{m: {"method": m} for m in METHODS},
            "loha+tucker": {"method": "loha", "tucker": True},
            "lokr+tucker": {"method": "lokr", "tucker": True, "rank": 1}}


def _inject(model: nn.Module, variant: str, rank: int = 2, **kw) -> None:
    """``inject`` one of VARIANTS; a Tucker variant must apply on every conv of these models."""
    convlora.inject(model, **{"rank": rank, **VARIANTS[variant], **kw})
    tucker = VARIANTS[variant].get("tucker", False)
    assert all(lyr.tucker["default"] == tucker for lyr in convlora.lora_layers(model).values())


SETTINGS = settings(max_examples=40, deadline=None, derandomize=True,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])


def _check_exact_everywhere(model: nn.Module, original: nn.Module, call, method: str, rslora: bool,
                            rank: int, alpha: float, dtype: torch.dtype, y0: torch.Tensor,
                            tmp: Path, seed: int) -> None:
    layer = model[0]
    y_fresh = call(model)
    if method == "dora" and dtype != torch.float32:
        # the magnitude ||W|| is stored in the weight's dtype: m / ||W|| is 1 within its rounding
        torch.testing.assert_close(y_fresh, y0, atol=ATOL[dtype], rtol=1e-2)
    else:
        assert torch.equal(y_fresh, y0), f"a fresh {method} adapter must not change the output"

    randomize_adapters(model, seed, std=0.5)
    y_unmerged = call(model)
    assert not torch.equal(y_unmerged, y0), "adapter had no effect"

    ref = copy.deepcopy(original)
    factors = {k: v.detach() for k, v in layer.factors("default").items()}
    with torch.no_grad():
        w = ref[0].weight
        w.copy_(reference_weight(method, w, factors, scale_of(alpha, rank, rslora), layer.groups,
                                 layer.transposed).to(w.dtype))
    torch.testing.assert_close(y_unmerged, call(ref), atol=ATOL[dtype], rtol=1e-2)

    w_before = layer.weight.detach().clone()
    convlora.merge(model)
    assert torch.equal(call(model), y_unmerged), "merged must equal unmerged bit for bit"
    convlora.unmerge(model)
    assert torch.equal(layer.weight, w_before), "unmerge must restore the weights exactly"

    path = tmp / "a.safetensors"
    convlora.save_adapter(model, path)
    fresh = copy.deepcopy(original)
    convlora.load_adapter(fresh, path)
    assert torch.equal(call(fresh), y_unmerged)
    assert fresh[0].method["default"] == method and fresh[0].rslora["default"] == rslora
    assert fresh[0].tucker["default"] == layer.tucker["default"]

    merged_sd = merge_state_dict(original.state_dict(), path)
    deployed = convlora.unload(model)
    assert module_types(deployed) == module_types(original)
    assert keys_and_shapes(deployed) == keys_and_shapes(original)
    assert torch.equal(call(deployed), y_unmerged)
    for k, v in deployed.state_dict().items():
        assert torch.equal(merged_sd[k], v), f"merge_state_dict differs from unload at {k}"


@SETTINGS
@given(cfg=conv_configs(), method=st.sampled_from(METHODS[1:]), rslora=st.booleans())
def test_conv_grid_every_method_is_exact(cfg: dict, method: str, rslora: bool,
                                         tmp_path_factory: pytest.TempPathFactory) -> None:
    model, x = build(cfg)
    original = copy.deepcopy(model)
    try:
        y0 = model(x)
    except RuntimeError:  # configuration invalid for this input (e.g. reflect pad too large)
        return
    fac, rank = pick_factorization_and_rank(model[0].weight, cfg, method)
    alpha = 2.0 * rank
    assert convlora.inject(model, rank=rank, alpha=alpha, factorization=fac, method=method,
                           rslora=rslora) == ["0"]
    _check_exact_everywhere(model, original, lambda m: m(x), method, rslora, rank, alpha,
                            cfg["dtype"], y0, Path(tmp_path_factory.mktemp("ad")), cfg["seed"])


@pytest.mark.parametrize("method", ["loha", "lokr"])
@settings(SETTINGS, max_examples=20)
@given(cfg=conv_configs(), rslora=st.booleans(), low=st.booleans())
def test_conv_grid_tucker_is_exact(cfg: dict, method: str, rslora: bool, low: bool,
                                   tmp_path_factory: pytest.TempPathFactory) -> None:
    """The Tucker forms on the conv grid (kernels of one tap widened to 3, where Tucker applies);
    ``low``: rank 1, where Tucker LoKr applies on small convs."""
    if math.prod(cfg["kernel"]) == 1:
        cfg = {**cfg, "kernel": (3,) * cfg["ndim"]}
    model, x = build(cfg)
    original = copy.deepcopy(model)
    try:
        y0 = model(x)
    except RuntimeError:
        return
    shape = tuple(model[0].weight.shape)
    rank = 1 if low else max(1, round(cfg["rank_frac"] * convlora.functional.max_rank("kernel", shape,
                                                                                       cfg["groups"])))
    alpha = 2.0 * rank
    assert convlora.inject(model, rank=rank, alpha=alpha, method=method, rslora=rslora, tucker=True) == ["0"]
    assert model[0].tucker["default"] == tucker_applies(method, shape, rank)
    _check_exact_everywhere(model, original, lambda m: m(x), method, rslora, rank, alpha,
                            cfg["dtype"], y0, Path(tmp_path_factory.mktemp("ad")), cfg["seed"])


@st.composite
def transposed_configs(draw: st.DrawFn) -> dict:
    ndim = draw(st.sampled_from([1, 2, 2, 3]))
    kernel = tuple(draw(st.integers(1, 4 if ndim < 3 else 3)) for _ in range(ndim))
    groups = draw(st.sampled_from([1, 1, 2, 3]))
    cin, cout = groups * draw(st.integers(1, 3)), groups * draw(st.integers(1, 3))
    stride = draw(st.integers(1, 3))
    dilation = draw(st.integers(1, 2))
    out_pad = draw(st.integers(0, max(stride, dilation) - 1))
    return dict(ndim=ndim, kernel=kernel, groups=groups, cin=cin, cout=cout, stride=stride,
                dilation=dilation, padding=draw(st.integers(0, 2)), output_padding=out_pad,
                bias=draw(st.booleans()), use_output_size=draw(st.booleans()),
                dtype=draw(st.sampled_from([torch.float32, torch.float32, torch.bfloat16])),
                method=draw(st.sampled_from(METHODS)), rslora=draw(st.booleans()),
                factorization=draw(st.sampled_from(["kernel", "kernel", "loralib"])),
                rank_frac=draw(st.floats(0.0, 1.0)), seed=draw(st.integers(0, 2**16)))


@SETTINGS
@given(cfg=transposed_configs())
def test_transposed_conv_grid_every_method_is_exact(cfg: dict, tmp_path_factory: pytest.TempPathFactory) -> None:
    _transposed_case(cfg, Path(tmp_path_factory.mktemp("ad")))


@pytest.mark.parametrize("method", ["loha", "lokr"])
@settings(SETTINGS, max_examples=15)
@given(cfg=transposed_configs())
def test_transposed_conv_grid_tucker_is_exact(cfg: dict, method: str,
                                              tmp_path_factory: pytest.TempPathFactory) -> None:
    kernel = cfg["kernel"] if math.prod(cfg["kernel"]) > 1 else (3,) * cfg["ndim"]  # where Tucker applies
    rank_frac = 0.0 if method == "lokr" else cfg["rank_frac"]  # rank 1: Tucker LoKr applies more often
    _transposed_case({**cfg, "method": method, "factorization": "kernel", "kernel": kernel,
                      "rank_frac": rank_frac},
                     Path(tmp_path_factory.mktemp("ad")), tucker=True)


def _transposed_case(cfg: dict, tmp: Path, tucker: bool = False) -> None:
    torch.manual_seed(cfg["seed"])
    cls = {1: nn.ConvTranspose1d, 2: nn.ConvTranspose2d, 3: nn.ConvTranspose3d}[cfg["ndim"]]
    conv = cls(cfg["cin"], cfg["cout"], cfg["kernel"], stride=cfg["stride"], padding=cfg["padding"],
               output_padding=cfg["output_padding"], dilation=cfg["dilation"], groups=cfg["groups"],
               bias=cfg["bias"])
    model = nn.Sequential(conv).to(cfg["dtype"])
    original = copy.deepcopy(model)
    x = torch.randn(2, cfg["cin"], *([5 if cfg["ndim"] < 3 else 3] * cfg["ndim"])).to(cfg["dtype"])
    try:
        natural = model[0](x).shape[2:]
    except RuntimeError:  # negative output size for this padding
        return
    # output_size asks for the largest valid size (output padding stride - 1), not the layer's own
    size = [n - cfg["output_padding"] + cfg["stride"] - 1 for n in natural]

    def call(m: nn.Module) -> torch.Tensor:
        return m[0](x, output_size=size) if cfg["use_output_size"] else m(x)

    y0 = call(model)
    method = cfg["method"]
    fac, rank = pick_factorization_and_rank(model[0].weight, cfg, method)
    alpha = 1.5 * rank
    assert convlora.inject(model, rank=rank, alpha=alpha, factorization=fac, method=method,
                           rslora=cfg["rslora"], tucker=tucker) == ["0"]
    assert model[0].transposed
    assert model[0].tucker["default"] == (tucker and tucker_applies(method, tuple(model[0].weight.shape), rank))
    _check_exact_everywhere(model, original, call, method, cfg["rslora"], rank, alpha, cfg["dtype"],
                            y0, tmp, cfg["seed"])


@pytest.mark.parametrize("method", METHODS)
def test_linear_every_method_is_exact(method: str, tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(12, 10))
    original = copy.deepcopy(model)
    x = torch.randn(3, 12)
    y0 = model(x)
    convlora.inject(model, rank=3, alpha=5.0, targets="0", method=method)
    _check_exact_everywhere(model, original, lambda m: m(x), method, False, 3, 5.0, torch.float32, y0,
                            tmp_path, 1)


def test_transposed_kernel_factorization_layout() -> None:
    """ConvTranspose weight (in, out/groups, *k): A is rank x (out/groups * k), B is in x rank."""
    conv = nn.ConvTranspose2d(6, 4, (3, 2), groups=2)  # weight (6, 2, 3, 2)
    model = nn.Sequential(conv)
    convlora.inject(model, rank=3, method="dora")
    layer = model[0]
    assert tuple(layer.lora_A["default"].shape) == (3, 2 * 3 * 2)
    assert tuple(layer.lora_B["default"].shape) == (6, 3)
    assert tuple(layer.lora_magnitude["default"].shape) == (4,)  # one per output channel
    expected = torch.stack([conv.weight[g * 3:(g + 1) * 3, o].norm() for g in range(2) for o in range(2)])
    torch.testing.assert_close(layer.lora_magnitude["default"].detach(), expected.detach())


def test_output_size_is_refused_on_a_plain_conv() -> None:
    model = nn.Sequential(nn.Conv2d(2, 2, 3))
    convlora.inject(model, rank=1)
    with pytest.raises(TypeError, match="output_size applies to transposed convolutions"):
        model[0](torch.randn(1, 2, 5, 5), output_size=[3, 3])


@pytest.mark.parametrize("method", METHODS)
def test_rslora_scales_by_alpha_over_sqrt_rank(method: str) -> None:
    model = nn.Sequential(nn.Conv2d(4, 8, 3))
    convlora.inject(model, rank=4, alpha=6.0, method=method, rslora=True)
    assert model[0].scale("default") == 6.0 / 2.0


def test_dora_zero_norm_channel_gives_zero_weights_not_nan() -> None:
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 4, 3, padding=1, padding_mode="circular")
    with torch.no_grad():
        conv.weight[1].zero_()
    model = nn.Sequential(conv)
    x = torch.randn(2, 3, 6, 6)
    y0 = model(x)
    convlora.inject(model, rank=2, method="dora")
    layer = model[0]
    assert layer.lora_magnitude["default"][1] == 0
    assert torch.equal(model(x), y0)
    opt = torch.optim.SGD(convlora.lora_parameters(model), lr=0.1)
    for _ in range(3):
        opt.zero_grad()
        model(x).square().mean().backward()
        opt.step()
    w = layer.effective_weight("default")
    assert torch.isfinite(w).all()
    assert torch.equal(w[1], torch.zeros_like(w[1])), "a channel zero in the base stays zero"
    y = model(x)
    convlora.merge(model)
    assert torch.equal(model(x), y)


DORA_LAYOUTS = {
    "conv2d kernel": (lambda: nn.Conv2d(4, 6, 3, padding=1, padding_mode="reflect"), "kernel", (2, 4, 6, 6)),
    "conv2d groups": (lambda: nn.Conv2d(4, 6, 3, groups=2, dilation=2), "kernel", (2, 4, 7, 7)),
    "conv2d loralib": (lambda: nn.Conv2d(4, 6, 3, padding=1), "loralib", (2, 4, 6, 6)),
    "convT2d groups": (lambda: nn.ConvTranspose2d(4, 6, 3, stride=2, groups=2), "kernel", (2, 4, 4, 4)),
    "convT1d": (lambda: nn.ConvTranspose1d(3, 5, 2, stride=2), "kernel", (2, 3, 5)),
    "convT2d loralib": (lambda: nn.ConvTranspose2d(4, 6, 3, padding=1), "loralib", (2, 4, 5, 5)),
    "linear": (lambda: nn.Linear(7, 5), "kernel", (3, 7)),
}


@pytest.mark.parametrize("layout", sorted(DORA_LAYOUTS))
def test_dora_gradients_match_the_formula_with_the_norm_detached(layout: str) -> None:
    """The DoRA autograd function's backward equals autograd through the reference formula.

    Every factor, the input, and the base weight (made trainable here) get the gradient of
    ``W' = m * V / ||V||`` with ``||V||`` a constant, for each weight layout of the function
    (output channels as rows, ``loralib`` rows, transposed and grouped channels), including the
    magnitude's gradient on a channel whose magnitude is 0 (``W'`` is zero there, so the backward
    cannot recover ``V`` from ``W'``).
    """
    make, fac, shape = DORA_LAYOUTS[layout]
    torch.manual_seed(3)
    model = nn.Sequential(make()).double()
    base = copy.deepcopy(model)
    convlora.inject(model, rank=2, alpha=3.0, factorization=fac, method="dora", targets="0")
    layer = model[0]
    randomize_adapters(model, 4, std=0.5)
    with torch.no_grad():  # the magnitude away from ||W||, and 0 on one channel (W' is zero there)
        layer.lora_magnitude["default"].mul_(1.0 + torch.rand_like(layer.lora_magnitude["default"]))
        layer.lora_magnitude["default"][1] = 0.0
    layer.weight.requires_grad_(True)
    x = torch.randn(*shape, dtype=torch.float64, requires_grad=True)
    probe = torch.randn_like(model(x))
    (model(x) * probe).sum().backward()

    factors = {k: v.detach().clone().requires_grad_(True) for k, v in layer.factors("default").items()}
    w = base[0].weight.detach().clone().requires_grad_(True)
    x_ref = x.detach().clone().requires_grad_(True)
    w_eff = reference_weight("dora", w, factors, layer.scale("default"), layer.groups, layer.transposed,
                             detach_norm=True)
    y_ref = torch.func.functional_call(base[0], {"weight": w_eff, "bias": base[0].bias}, (x_ref,))
    (y_ref * probe).sum().backward()
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(layer.weight.grad, w.grad, rtol=1e-10, atol=1e-12)
    for name, p in layer.factors("default").items():
        torch.testing.assert_close(p.grad, factors[name].grad, rtol=1e-10, atol=1e-12, msg=name)


@pytest.mark.parametrize("rank", [1, 8])
@pytest.mark.parametrize("layout", ["conv2d kernel", "convT2d groups", "convT1d", "linear"])
def test_lokr_gradients_match_autograd_through_the_formula(layout: str, rank: int) -> None:
    """LoKr's own backward (no weight-sized temporaries) equals autograd through the reference.

    Rank 1 gives the low-rank ``W2 = W2a @ W2b``, rank 8 the full ``W2`` on these layers;
    the base weight is made trainable so its gradient is checked too.
    """
    make, _, shape = DORA_LAYOUTS[layout]
    torch.manual_seed(6)
    model = nn.Sequential(make()).double()
    base = copy.deepcopy(model)
    convlora.inject(model, rank=rank, alpha=3.0, method="lokr", targets="0")
    layer = model[0]
    randomize_adapters(model, 7, std=0.5)
    layer.weight.requires_grad_(True)
    x = torch.randn(*shape, dtype=torch.float64)
    probe = torch.randn_like(model(x))
    (model(x) * probe).sum().backward()

    factors = {k: v.detach().clone().requires_grad_(True) for k, v in layer.factors("default").items()}
    assert ("lokr_w2" in factors) == (rank == 8)
    w = base[0].weight.detach().clone().requires_grad_(True)
    w_eff = reference_weight("lokr", w, factors, layer.scale("default"))
    y_ref = torch.func.functional_call(base[0], {"weight": w_eff, "bias": base[0].bias}, (x,))
    (y_ref * probe).sum().backward()
    torch.testing.assert_close(layer.weight.grad, w.grad, rtol=1e-10, atol=1e-12)
    for name, p in layer.factors("default").items():
        torch.testing.assert_close(p.grad, factors[name].grad, rtol=1e-10, atol=1e-12, msg=name)


@pytest.mark.parametrize("method,layout", [(m, lay) for m in VARIANTS for lay in ("conv2d kernel", "convT2d groups")]
                         + [("lora", "conv2d loralib"), ("dora", "conv2d loralib")])
def test_under_autocast_the_weight_is_computed_in_float32_merged_equals_unmerged_and_it_trains(
        method: str, layout: str) -> None:
    make, fac, shape = DORA_LAYOUTS[layout]
    torch.manual_seed(5)
    model = nn.Sequential(make())
    _inject(model, method, factorization=fac, targets="0")
    randomize_adapters(model, 6, std=0.3)
    layer = model[0]
    x = torch.randn(*shape)
    with torch.no_grad():
        w_plain = layer.effective_weight("default")
        with torch.autocast("cpu", dtype=torch.bfloat16):
            w_autocast = layer.effective_weight("default")
            y_unmerged = model(x)
            with convlora.merged(model):
                y_merged = model(x)
    assert w_autocast.dtype == torch.float32 and torch.equal(w_autocast, w_plain)
    assert torch.equal(y_merged, y_unmerged), "merged must equal unmerged under autocast too"
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = model(x)
    y.float().square().sum().backward()
    for name, p in layer.factors("default").items():
        assert p.grad is not None and p.grad.dtype == p.dtype, name
        assert torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name


def test_method_refusals_are_one_line_and_change_nothing() -> None:
    model = nn.Sequential(nn.Conv2d(4, 4, 3), nn.Conv2d(4, 4, 3))
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(convlora.ConvLoRAError, match="'svd' is not a known method"):
        convlora.inject(model, method="svd")
    with pytest.raises(UnsupportedLayerError, match="layer '0'.*'dora'.*dropout"):
        convlora.inject(model, rank=2, method="dora", dropout=0.1)
    with pytest.raises(UnsupportedLayerError, match="layer '0'.*'loha' has its own factor layout"):
        convlora.inject(model, rank=2, method="loha", factorization="loralib")
    assert module_types(model)[1][1] is nn.Conv2d
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_method_pattern_mixes_methods_and_dropout_works_for_additive_methods() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Conv2d(4, 4, 3), nn.Conv2d(4, 4, 1))
    convlora.inject(model, rank=2, method="lora", method_pattern={"1": "loha", "2": "lokr"},
                    dropout=0.2)
    assert [model[i].method["default"] for i in range(3)] == ["lora", "loha", "lokr"]
    randomize_adapters(model)
    x = torch.randn(2, 3, 8, 8)
    model.train()
    model(x).sum().backward()  # the two-path forward of dropout
    assert all(p.grad is not None for p in convlora.lora_parameters(model))
    model.eval()
    y = model(x)
    with convlora.merged(model):
        assert torch.equal(model(x), y)


def _edit_meta(path: Path, out: Path, change) -> None:
    data = path.read_bytes()
    n = struct.unpack("<Q", data[:8])[0]
    header = json.loads(data[8:8 + n])
    change(header["__metadata__"])
    new = json.dumps(header).encode()
    out.write_bytes(struct.pack("<Q", len(new)) + new + data[8 + n:])


def test_file_format_records_the_method_and_older_files_load_as_lora(tmp_path: Path) -> None:
    torch.manual_seed(0)
    base = nn.Sequential(nn.Conv2d(3, 4, 3))
    x = torch.randn(1, 3, 6, 6)
    lora, dora = copy.deepcopy(base), copy.deepcopy(base)
    convlora.inject(lora, rank=2)
    convlora.inject(dora, rank=2, method="dora", rslora=True)
    randomize_adapters(lora)
    randomize_adapters(dora)
    p_lora = convlora.save_adapter(lora, tmp_path / "lora.safetensors")
    p_dora = convlora.save_adapter(dora, tmp_path / "dora.safetensors")
    _, meta_l = convlora.read_adapter(p_lora)
    _, meta_d = convlora.read_adapter(p_dora)
    assert meta_l["format_version"] == "2", "plain LoRA files stay readable by older convlora"
    assert meta_d["format_version"] == "3"
    assert meta_d["layers"]["0"]["method"] == "dora" and meta_d["layers"]["0"]["rslora"] is True
    assert meta_l["layers"]["0"]["method"] == "lora", "a file without the field reads as 'lora'"
    loaded = copy.deepcopy(base)
    convlora.load_adapter(loaded, p_dora)
    assert torch.equal(loaded(x), dora(x))

    def unknown(meta: dict) -> None:
        layers = json.loads(meta["layers"])
        layers["0"]["method"] = "boft"
        meta["layers"] = json.dumps(layers)

    _edit_meta(p_dora, tmp_path / "boft.safetensors", unknown)
    target = copy.deepcopy(base)
    with pytest.raises(AdapterFormatError, match=r"layer '0': unknown method 'boft'.*Upgrade convlora"):
        convlora.load_adapter(target, tmp_path / "boft.safetensors")
    assert module_types(target) == module_types(base)


def test_tucker_file_format_version_4_and_its_refusals(tmp_path: Path) -> None:
    """Tucker layers are recorded as ``"tucker": true`` in a version-4 file; files without the
    field (every older file) read with it off; a bad value, the field in an older version, or a
    Tucker entry where it cannot apply are refused, naming the layer and the field."""
    from safetensors import safe_open

    torch.manual_seed(0)
    base = nn.Sequential(nn.Conv2d(3, 8, 3), nn.Conv2d(8, 8, 1))
    x = torch.randn(1, 3, 6, 6)
    tuck, flat = copy.deepcopy(base), copy.deepcopy(base)
    convlora.inject(tuck, rank=2, method="loha", tucker=True)
    convlora.inject(flat, rank=2, method="loha")
    randomize_adapters(tuck)
    randomize_adapters(flat)
    p_tuck = convlora.save_adapter(tuck, tmp_path / "tucker.safetensors")
    p_flat = convlora.save_adapter(flat, tmp_path / "flat.safetensors")

    def raw_layers(path: Path) -> dict:
        with safe_open(str(path), "pt") as fh:
            return json.loads(fh.metadata()["layers"])

    assert raw_layers(p_tuck)["0"]["tucker"] is True and "tucker" not in raw_layers(p_tuck)["1"]
    assert all("tucker" not in lm for lm in raw_layers(p_flat).values())
    (_, meta_t), (_, meta_f) = convlora.read_adapter(p_tuck), convlora.read_adapter(p_flat)
    assert meta_t["format_version"] == "4" and meta_f["format_version"] == "3"
    assert [lm["tucker"] for lm in meta_t["layers"].values()] == [True, False]
    assert [lm["tucker"] for lm in meta_f["layers"].values()] == [False, False]
    loaded = copy.deepcopy(base)
    convlora.load_adapter(loaded, p_tuck)
    assert [loaded[i].tucker["default"] for i in (0, 1)] == [True, False]
    assert torch.equal(loaded(x), tuck(x))

    def edit(layer: str, value: object, version: str = "4"):
        def change(meta: dict) -> None:
            layers = json.loads(meta["layers"])
            layers[layer]["tucker"] = value
            meta["layers"], meta["format_version"] = json.dumps(layers), version
        return change

    cases = {"bad value": (edit("0", "yes"), r"layer '0': bad or missing \['tucker'\] \(tucker='yes'\)"),
             "older version": (edit("0", True, "3"), r"layer '0': tucker=true, which format version 3 "
                                                     "does not hold"),
             "1x1 kernel": (edit("1", True), r"layer '1': tucker=True does not apply to method 'loha'")}
    for label, (change, match) in cases.items():
        bad = tmp_path / f"{label}.safetensors"
        _edit_meta(p_tuck, bad, change)
        target = copy.deepcopy(base)
        with pytest.raises(AdapterFormatError, match=match):
            convlora.load_adapter(target, bad)
        assert module_types(target) == module_types(base), label


def test_tucker_applies_on_kernels_of_several_taps_and_is_ignored_elsewhere_as_in_peft() -> None:
    model = nn.Sequential(nn.Conv2d(4, 16, 3), nn.Conv2d(16, 16, 1), nn.Conv2d(16, 16, (1, 3)),
                          nn.Conv2d(16, 16, 3), nn.Linear(16, 16))
    flat = copy.deepcopy(model)
    targets = ["0", "1", "2", "3", "4"]
    convlora.inject(model, rank=2, method="loha", method_pattern={"3": "lora"}, tucker=True,
                    targets=targets)
    convlora.inject(flat, rank=2, method="loha", method_pattern={"3": "lora"}, targets=targets)
    assert [model[i].tucker["default"] for i in range(5)] == [True, False, True, False, False]
    for i in (1, 3, 4):  # ignored: the flattened factors, as without the option
        assert ({k: v.shape for k, v in model[i].factors("default").items()}
                == {k: v.shape for k, v in flat[i].factors("default").items()})
    assert "tucker" in repr(model[0]) and "tucker" not in repr(model[1])
    assert "loha+tucker" in convlora.summary(model)

    lokr = nn.Sequential(nn.Conv2d(4, 16, 3), nn.Conv2d(16, 16, 3), nn.Conv2d(16, 16, 3))
    convlora.inject(lokr, rank=1, method="lokr", tucker=True, tucker_pattern={"2": False},
                    rank_pattern={"1": 8})
    # rank 8 >= max(b, d) / 2: LoKr's W2 is full there, which the option leaves alone (as PEFT)
    assert [lokr[i].tucker["default"] for i in range(3)] == [True, False, False]
    assert "lokr_w2" in lokr[1].factors("default") and "lokr_t2" in lokr[0].factors("default")

    layer = model[1]  # asked for directly, it is refused where it does not apply
    with pytest.raises(UnsupportedLayerError, match="layer '1': tucker=True does not apply to method "
                                                    "'loha' with rank 2 on this weight"):
        layer.add_adapter("other", 2, 2.0, layer_name="1", method="loha", tucker=True)
    assert "other" not in layer.rank and "other" not in layer.factors("default")


def test_tucker_config_refusals() -> None:
    with pytest.raises(convlora.ConvLoRAError, match="tucker=True applies to methods 'loha'/'lokr' only"):
        convlora.LoRAConfig(tucker=True)
    with pytest.raises(convlora.ConvLoRAError, match="tucker_pattern\\['a'\\]=1 must be True or False"):
        convlora.LoRAConfig(method="loha", tucker_pattern={"a": 1})
    with pytest.raises(convlora.ConvLoRAError, match="tucker='yes' must be True or False"):
        convlora.LoRAConfig(method="loha", tucker="yes")  # type: ignore[arg-type]
    cfg = convlora.LoRAConfig(method="lora", method_pattern={"up*": "lokr"}, tucker_pattern={"up.1": True})
    assert cfg.tucker_for("up.1.conv") and not cfg.tucker_for("up.2")
    model = nn.Sequential(nn.Conv2d(3, 4, 3))
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(convlora.ConvLoRAError, match="no layer uses them"):
        convlora.inject(model, rank=2, tucker=True)
    assert module_types(model)[1][1] is nn.Conv2d
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


@pytest.mark.parametrize("method", VARIANTS)
@pytest.mark.parametrize("saved_merged,target_merged", [(False, True), (True, False), (True, True)])
def test_state_dict_loads_right_across_merge_states_every_method(method: str, saved_merged: bool,
                                                                 target_merged: bool) -> None:
    torch.manual_seed(3)
    base = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1, padding_mode="reflect"), nn.ReLU(),
                         nn.ConvTranspose2d(6, 4, 3, stride=2, groups=2))
    x = torch.randn(2, 3, 5, 5)
    source, target = copy.deepcopy(base), copy.deepcopy(base)
    for m, seed in ((source, 1), (target, 2)):
        _inject(m, method)
        randomize_adapters(m, seed)
    expected = source(x)
    if saved_merged:
        convlora.merge(source)
    if target_merged:
        convlora.merge(target)
    target.load_state_dict(source.state_dict(), strict=True)
    assert convlora.is_merged(target) == target_merged
    assert torch.equal(target(x), expected)


@pytest.mark.parametrize("method", VARIANTS)
def test_float64_stays_float64_every_method(method: str) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3)).double()
    _inject(model, method)
    randomize_adapters(model)
    layer = model[0]
    f = {k: v.detach() for k, v in layer.factors("default").items()}
    w = layer.effective_weight("default")
    assert w.dtype == torch.float64
    ref = reference_weight(layer.method["default"], layer.weight.detach(), f, layer.scale("default"))
    torch.testing.assert_close(w.detach(), ref, atol=1e-13, rtol=1e-12)


@pytest.mark.parametrize("method", METHODS)
def test_new_layers_keep_mode_and_only_factors_train(method: str) -> None:
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ConvTranspose2d(4, 2, 2)).eval()
    convlora.inject(model, rank=2, method=method)
    assert not model[0].training and not model[1].training
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {f"{i}.{f}.default" for i in (0, 1) for f in model[i].factors("default")}
    summary = convlora.summary(model)
    assert method in summary


@pytest.mark.parametrize("method", VARIANTS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_a_fresh_adapter_changes_nothing_every_method_every_dtype(method: str, dtype: torch.dtype) -> None:
    torch.manual_seed(5)
    model = nn.Sequential(nn.Conv2d(4, 6, 3, padding=1, padding_mode="reflect"), nn.ReLU(),
                          nn.ConvTranspose2d(6, 4, 2, stride=2)).to(dtype)
    x = torch.randn(1, 4, 5, 5).to(dtype)
    y0 = model(x)
    weights = [p.detach().clone() for p in model.parameters()]
    _inject(model, method)
    convlora.verify(model, x)
    if method == "dora" and dtype in (torch.float16, torch.bfloat16):
        # m = ||W|| is stored in the weight's dtype: m / ||W|| is 1 within its rounding
        tol = {torch.float16: 2e-3, torch.bfloat16: 2e-2}[dtype]
        torch.testing.assert_close(model(x), y0, atol=tol, rtol=tol)
        return
    assert torch.equal(model(x), y0)
    convlora.unload(model)
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), weights))


@pytest.mark.parametrize("method,rslora", [("loha", False), ("lokr", False), ("loha", True), ("lokr", True)])
def test_peft_export_refuses_what_it_cannot_write(method: str, rslora: bool, tmp_path: Path) -> None:
    """LoHa/LoKr are not exported, with or without rsLoRA (DoRA is: tests/test_peft_dora.py;
    rsLoRA LoRA/DoRA are: tests/test_peft_rslora.py)."""
    model = nn.Sequential(nn.Conv2d(3, 4, 3))
    convlora.inject(model, rank=2, method=method, rslora=rslora)
    with pytest.raises(UnsupportedLayerError, match="layer '0' uses .*; the PEFT export writes"):
        convlora.save_peft_adapter(model, tmp_path / "peft")
    assert not (tmp_path / "peft").exists()


@pytest.mark.parametrize("method", ["dora", "loha", "lokr", "loha+tucker", "lokr+tucker"])
def test_cli_inspect_and_merge_every_method(method: str, tmp_path: Path, capsys) -> None:
    from safetensors.torch import load_file, save_file

    from convlora.cli import main

    torch.manual_seed(0)
    base = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, padding_mode="reflect"), nn.ReLU(),
                         nn.ConvTranspose2d(8, 4, 3, stride=2, output_padding=1))
    model = copy.deepcopy(base)
    _inject(model, method, rslora=True)
    randomize_adapters(model, std=0.3)
    path = convlora.save_adapter(model, tmp_path / "a.safetensors")
    assert main(["inspect", str(path)]) == 0
    assert f"{method}+rs" in capsys.readouterr().out
    save_file(base.state_dict(), str(tmp_path / "base.safetensors"))
    out = tmp_path / "merged.safetensors"
    assert main(["merge", "--adapter", str(path), "--base", str(tmp_path / "base.safetensors"),
                 "--out", str(out)]) == 0
    merged = load_file(str(out))
    expected = convlora.unload(copy.deepcopy(model)).state_dict()
    assert set(merged) == set(expected)
    assert all(torch.equal(merged[k], v) for k, v in expected.items())


@pytest.mark.parametrize("layout", ["conv2d kernel", "conv2d groups", "convT2d groups", "convT1d", "linear"])
@pytest.mark.parametrize("method", METHODS)
def test_torch_func_grad_and_per_sample_vmap_every_method(method: str, layout: str) -> None:
    """``torch.func.grad`` and per-sample ``vmap(grad)`` give autograd's gradients for every
    method (DoRA's and LoKr's own autograd functions step aside under the transforms)."""
    make, _, shape = DORA_LAYOUTS[layout]
    torch.manual_seed(9)
    model = nn.Sequential(make()).double()
    convlora.inject(model, rank=2, alpha=3.0, method=method, targets="0")
    randomize_adapters(model, 10, std=0.3)
    x = torch.randn(*shape, dtype=torch.float64)
    params = {k: v.detach() for k, v in model.named_parameters() if v.requires_grad}

    def loss(p: dict, xs: torch.Tensor) -> torch.Tensor:
        return torch.func.functional_call(model, p, (xs,)).square().sum()

    got = torch.func.grad(loss)(params, x)
    per_sample = torch.func.vmap(torch.func.grad(loss), in_dims=(None, 0))(params, x[:, None])
    model(x).square().sum().backward()
    for k, p in model.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(got[k], p.grad, rtol=1e-10, atol=1e-12, msg=k)
            torch.testing.assert_close(per_sample[k].sum(0), p.grad, rtol=1e-10, atol=1e-12, msg=k)
