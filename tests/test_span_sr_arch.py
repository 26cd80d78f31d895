"""SPAN architecture: official checkpoints load strictly, outputs equal an independent forward,
reparameterisation is exact, and loader errors are explicit."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import requires_shared

from examples.span_sr.arch import SPAN, Conv3XC, load_span, span_config_from_state_dict
from examples.span_sr.degrade import imresize_matlab, modcrop
from examples.span_sr.images import read_image

REPO = Path(__file__).resolve().parents[1]
WEIGHTS = {
    # name: (feature_channels, conv_cat_channels, parameter count from MANIFEST.md)
    "span_tiny_ch26": (26, 26, 130_828),
    "dsclora_ch26": (26, 26, 130_828),
    "span_ch28": (28, 28, 150_688),
    "span_ch28_ema_trainckpt": (28, 20, 146_328),
}
FORWARD_TOL = 1e-5


def _official_style_forward(
    sd: dict[str, torch.Tensor], x: torch.Tensor, inplace_silu: bool = True
) -> torch.Tensor:
    """SPAN written directly from the deploy key layout, mimicking the official code's
    in-place SiLU: the block's returned ``out1`` is the activated tensor."""

    def conv(t: torch.Tensor, name: str) -> torch.Tensor:
        w = sd[f"{name}.weight"]
        return F.conv2d(t, w, sd[f"{name}.bias"], padding=w.shape[-1] // 2)

    mean = torch.tensor([0.4488, 0.4371, 0.4040]).view(1, 3, 1, 1)
    x = (x - mean) * 255.0
    feat = conv(x, "conv_1.eval_conv")
    h, first_out, b1_out = feat, None, None
    for i in range(1, 7):
        out1 = conv(h, f"block_{i}.c1_r.eval_conv")
        act1 = F.silu(out1, inplace=inplace_silu)  # official SPAB: out1 itself becomes activated
        out2 = F.silu(conv(act1, f"block_{i}.c2_r.eval_conv"))
        out3 = conv(out2, f"block_{i}.c3_r.eval_conv")
        att = torch.sigmoid(out3) - 0.5
        h, first_out = (out3 + h) * att, out1
        if i == 1:
            b1_out = h
    assert first_out is not None and b1_out is not None
    b6 = conv(h, "conv_2.eval_conv")
    cat = conv(torch.cat([feat, b6, b1_out, first_out], 1), "conv_cat")
    up = sd["upsampler.0.weight"]
    scale = int(round((up.shape[0] / 3) ** 0.5))
    return F.pixel_shuffle(conv(cat, "upsampler.0"), scale)


def _state(path) -> dict[str, torch.Tensor]:
    sd = torch.load(path, map_location="cpu", weights_only=True)
    return sd.get("params_ema", sd)


@requires_shared
@pytest.mark.parametrize("name", sorted(WEIGHTS))
def test_official_checkpoint_loads_and_matches_independent_forward(shared_data, name):
    width, cat, n_params = WEIGHTS[name]
    path = shared_data / "weights" / f"{name}.pth"
    model = load_span(path)
    assert (model.feature_channels, model.conv_cat_channels, model.upscale) == (width, cat, 4)
    assert model.form == "deploy"
    assert sum(p.numel() for p in model.parameters()) == n_params
    sd = _state(path)
    assert set(model.state_dict()) == set(sd)
    model.load_state_dict(sd, strict=True)  # strict load of the raw file, too

    hr = modcrop(read_image(shared_data / "sr_bench" / "Set5" / "HR" / "butterfly.png"), 4)
    lr = torch.from_numpy(imresize_matlab(hr, 0.25)).permute(2, 0, 1)[None].float() / 255
    with torch.no_grad():
        ours = model(lr)
        ref = _official_style_forward(sd, lr)
    assert ours.shape == (1, 3, 256, 256)
    torch.testing.assert_close(ours, ref, rtol=0, atol=FORWARD_TOL)
    if name == "span_tiny_ch26":  # the check is sharp: reusing the pre-activation differs
        with torch.no_grad():
            wrong = _official_style_forward(sd, lr, inplace_silu=False)
        assert (wrong - ref).abs().max().item() > 100 * FORWARD_TOL


@requires_shared
def test_nested_checkpoint_prefers_ema_and_is_overridable(shared_data, tmp_path):
    path = shared_data / "weights" / "span_ch28_ema_trainckpt.pth"
    raw = torch.load(path, map_location="cpu", weights_only=True)
    assert set(raw) == {"params", "params_ema"}
    ema, plain = load_span(path), load_span(path, key="params")
    key = "upsampler.0.weight"
    torch.testing.assert_close(ema.state_dict()[key], raw["params_ema"][key], rtol=0, atol=0)
    torch.testing.assert_close(plain.state_dict()[key], raw["params"][key], rtol=0, atol=0)
    assert not torch.equal(raw["params"][key], raw["params_ema"][key])
    assert ema.state_dict()[key].device.type == "cpu"
    torch.save({"state_dict": {f"module.{k}": v for k, v in raw["params"].items()}}, tmp_path / "w.pth")
    wrapped = load_span(tmp_path / "w.pth")  # read by convlora.load_state_dict: unwrapped, DDP prefix gone
    assert torch.equal(wrapped.state_dict()[key], raw["params"][key])
    with pytest.raises(ValueError, match="flat"):
        load_span(raw)


def test_loader_errors_name_the_bad_keys():
    sd = SPAN(feature_channels=8).state_dict()
    missing = {k: v for k, v in sd.items() if k != "block_3.c2_r.eval_conv.bias"}
    with pytest.raises(ValueError, match=r"missing keys \['block_3.c2_r.eval_conv.bias'\]"):
        load_span(missing)
    extra = {**sd, "head.weight": torch.zeros(1)}
    with pytest.raises(ValueError, match=r"unexpected keys \['head.weight'\]"):
        load_span(extra)
    assert load_span(extra, strict=False).feature_channels == 8
    bad = {**sd, "block_2.c1_r.eval_conv.weight": torch.zeros(8, 8, 5, 5)}
    with pytest.raises(ValueError, match=r"block_2.c1_r.eval_conv.weight: checkpoint \(8, 8, 5, 5\)"):
        load_span(bad)
    with pytest.raises(ValueError, match="not a SPAN"):
        load_span({"fc.weight": torch.zeros(2, 2)})
    with pytest.raises(ValueError, match="flat"):
        load_span({"optimizer": {"lr": 1.0}})


def test_config_from_shapes_reads_scale_and_conv_cat_width():
    model = SPAN(feature_channels=12, upscale=2, conv_cat_channels=6)
    cfg = span_config_from_state_dict(model.state_dict())
    assert cfg == {"num_in_ch": 3, "num_out_ch": 3, "feature_channels": 12, "upscale": 2,
                   "conv_cat_channels": 6, "form": "deploy"}
    train = SPAN(feature_channels=12, form="train")
    assert span_config_from_state_dict(train.state_dict())["form"] == "train"
    loaded = load_span(train.state_dict())
    assert loaded.form == "train" and loaded.conv_1.conv[0].out_channels == 6


def _randomize(model: torch.nn.Module, seed: int = 0) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * (0.5 / max(1, p[0].numel()) ** 0.5))


def test_conv3xc_reparameterize_is_exact_including_borders():
    torch.manual_seed(0)
    block = Conv3XC(5, 7, gain=2, form="train").double()
    _randomize(block)
    x = torch.randn(2, 5, 9, 11, dtype=torch.float64)
    before = block(x)
    block.reparameterize()
    assert block.form == "deploy" and not hasattr(block, "sk")
    torch.testing.assert_close(block(x), before, rtol=0, atol=1e-12)


def test_span_reparameterize_matches_train_form_to_fp32_roundoff():
    model = SPAN(feature_channels=10, form="train")
    _randomize(model, seed=1)
    x = torch.rand(1, 3, 17, 13)
    with torch.no_grad():
        before = model(x)
        model.reparameterize()
        after = model(x)
    assert model.form == "deploy"
    assert set(model.state_dict()) == set(SPAN(feature_channels=10).state_dict())
    scale = before.abs().max().item()
    torch.testing.assert_close(after, before, rtol=0, atol=1e-5 * max(1.0, scale))


def test_forward_ignores_training_flag_and_keeps_weights():
    model = SPAN(feature_channels=8, form="train")
    _randomize(model, seed=2)
    x = torch.rand(1, 3, 12, 12)
    snapshot = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        model.train()
        y_train = model(x)
        model.eval()
        y_eval = model(x)
    torch.testing.assert_close(y_train, y_eval, rtol=0, atol=0)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in snapshot.items())
    assert model.form == "train"


def test_no_clamp_in_forward():
    model = SPAN(feature_channels=8)
    with torch.no_grad():
        up = model.get_submodule("upsampler.0")
        assert isinstance(up, torch.nn.Conv2d) and up.bias is not None
        up.weight.zero_()
        up.bias.fill_(3.0)
        y = model(torch.rand(1, 3, 8, 8))
    assert torch.equal(y, torch.full_like(y, 3.0))  # values outside [0, 1] pass through


def test_bad_form_is_rejected():
    with pytest.raises(ValueError, match="form='fused'"):
        SPAN(form="fused")  # type: ignore[arg-type]


# --- DSCLoRA student --------------------------------------------------------------------------


def test_dsclora_student_placement_and_trainable_count():
    import convlora
    from examples.span_sr.dsclora import build_student, load_lora_config

    base = SPAN(feature_channels=26)
    base_keys, n_base = set(base.state_dict()), sum(p.numel() for p in base.parameters())
    student = build_student(base)
    layers = convlora.lora_layers(student)
    blocks = {f"block_{i}.c{j}_r.eval_conv" for i in range(1, 7) for j in (1, 2, 3)}
    assert set(layers) == blocks | {"conv_2.eval_conv", "upsampler.0"}
    for name, layer in layers.items():
        big = name in ("conv_2.eval_conv", "upsampler.0")
        assert (layer.rank["default"], layer.alpha["default"]) == ((8, 16.0) if big else (2, 4.0))
        assert layer.factorization["default"] == "loralib"
    trainable = {n: p for n, p in student.named_parameters() if p.requires_grad}
    assert sum(p.numel() for p in trainable.values()) == 25_920
    assert all(".lora_A." in n or ".lora_B." in n for n in trainable)  # biases frozen too
    assert load_lora_config().targets == ("block_*", "conv_2", "pixel_shuffle")

    x = torch.rand(1, 3, 12, 12)
    with torch.no_grad():
        for p in convlora.lora_parameters(student):
            p.normal_(0, 0.02)
        adapted = student(x)
        with convlora.disabled(student):
            assert (student(x) - adapted).abs().max().item() > 1e-4
    plain = convlora.unload(student, merge=True)
    assert type(plain) is SPAN and set(plain.state_dict()) == base_keys
    assert sum(p.numel() for p in plain.parameters()) == n_base
    with torch.no_grad():
        torch.testing.assert_close(plain(x), adapted, rtol=0, atol=1e-5)


@requires_shared
def test_dsclora_on_span_tiny_checkpoint(shared_data, tmp_path):
    import convlora
    from examples.span_sr.dsclora import build_student, load_lora_config

    path = shared_data / "weights" / "span_tiny_ch26.pth"
    student = build_student(load_span(path))
    assert sum(p.numel() for p in student.parameters() if p.requires_grad) == 25_920
    plain = convlora.unload(student, merge=True)  # zero-init B: merging changes nothing
    torch.testing.assert_close(plain.state_dict(), load_span(path).state_dict(), rtol=0, atol=0)
    with pytest.raises(ValueError, match="deploy-form"):
        build_student(SPAN(feature_channels=8, form="train"))
    with pytest.raises(ValueError, match="unknown LoRA config fields"):
        load_lora_config({"rank": 2, "ranks": 3})
    custom = tmp_path / "c.yaml"
    custom.write_text("rank: 4\ntargets: [conv_2]\nfactorization: loralib\n")
    one = build_student(load_span(path), custom)
    assert list(convlora.lora_layers(one)) == ["conv_2.eval_conv"]
