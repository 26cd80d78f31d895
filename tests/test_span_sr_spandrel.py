"""spandrel (the loader behind chaiNNer and ComfyUI) runs our SPAN files exactly: the train-branch
preimage of each deploy conv fuses back bit for bit, spandrel detects the architecture, and its
output equals our deploy forward with max-abs 0.0; spandrel-layout files read back bit for bit,
and inconsistent ones are refused."""

from __future__ import annotations

import re

import numpy as np
import pytest
import spandrel
import torch
from conftest import requires_shared
from PIL import Image
from safetensors.torch import load_file, save_file

import convlora
from examples.span_sr.arch import SPAN, load_span
from examples.span_sr.dsclora import build_student, deploy
from examples.span_sr.spandrel_format import (
    CONV3XC_PREFIXES,
    from_spandrel,
    is_spandrel_format,
    to_spandrel,
)
from examples.span_sr.upscale import main

pytestmark = pytest.mark.usefixtures("one_thread")


def _random_span(width: int, form: str = "deploy", seed: int = 0) -> SPAN:
    torch.manual_seed(seed)
    model = SPAN(feature_channels=width, form=form).eval()  # type: ignore[arg-type]
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.4 / max(1, p[0].numel()) ** 0.5)
    return model


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(torch.int32)


def _assert_bitwise(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert sorted(a) == sorted(b)
    for k in a:
        assert a[k].dtype == b[k].dtype == torch.float32, k
        assert torch.equal(_bits(a[k]), _bits(b[k])), k


def _image(shared_data, size: int = 40) -> torch.Tensor:
    lr = np.asarray(Image.open(shared_data / "sr_bench" / "Set5" / "LR_bicubic" / "X4" / "butterflyx4.png")
                    .convert("RGB"))
    return torch.from_numpy(lr[:size, : size + 7].copy()).permute(2, 0, 1)[None].float() / 255


def _spandrel_matches(path, ours: SPAN, x: torch.Tensor) -> None:
    """spandrel detects SPAN with our width and scale, and runs our deploy forward exactly."""
    desc = spandrel.ModelLoader().load_from_file(str(path))
    assert desc.architecture.id == "SPAN"
    assert desc.scale == ours.upscale
    assert desc.input_channels == desc.output_channels == 3
    assert desc.model.hyperparameters["feature_channels"] == ours.feature_channels
    with torch.no_grad():
        expected = ours(x)
        raw = desc.model.eval()(x)  # re-fuses every eval_conv from the stored train branch
        clamped = desc(x)  # the public call: the output clamped to [0, 1]
    assert raw.shape == expected.shape == (1, 3, 4 * x.shape[2], 4 * x.shape[3])
    assert (raw - expected).abs().max().item() == 0.0
    assert (clamped - expected.clamp(0, 1)).abs().max().item() == 0.0


def test_preimage_fuses_back_bit_for_bit_with_our_own_fusion():
    deploy = _random_span(8).state_dict()
    state = to_spandrel(deploy)
    assert len(state) == 204 and is_spandrel_format(state) and not is_spandrel_format(deploy)
    train = _random_span(8, form="train", seed=1)
    train.load_state_dict({k: v for k, v in state.items() if ".eval_conv." not in k}, strict=True)
    _assert_bitwise(train.reparameterize().state_dict(), deploy)  # Conv3XC's own fuse code
    _assert_bitwise(from_spandrel(state), deploy)


def test_preimage_is_the_same_function_at_the_borders():
    """The train forward (zero padding *before* the 1x1 expand) of the preimage is the deploy
    function, borders included. float64: the only difference is the summation order of the
    3x3 conv over 2·c_in channels, half of them zero."""
    deploy = _random_span(6).double()
    train = SPAN(feature_channels=6, form="train").double().eval()
    train.load_state_dict({k: v for k, v in to_spandrel(deploy.state_dict()).items()
                           if ".eval_conv." not in k})
    x = torch.rand(1, 3, 9, 11, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(train(x), deploy(x), rtol=0, atol=1e-10)


def test_to_spandrel_copies_and_keeps_dtype():
    deploy = _random_span(4).half().state_dict()
    state = to_spandrel(deploy)
    assert {v.dtype for v in state.values()} == {torch.float16}
    state["conv_cat.weight"].zero_()
    assert deploy["conv_cat.weight"].abs().sum() > 0
    back = from_spandrel(state)
    assert all(torch.equal(back[k], deploy[k]) for k in deploy if not k.startswith("conv_cat"))


@requires_shared
@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_official_dsclora_exported_by_the_cli_runs_exactly_in_spandrel(shared_data, tmp_path, suffix):
    weights = shared_data / "weights" / "dsclora_ch26.pth"
    path = tmp_path / f"dsclora_ch26_spandrel{suffix}"
    assert main(["--weights", str(weights), "--export-spandrel", str(path)]) == 0
    ours = load_span(weights)
    _spandrel_matches(path, ours, _image(shared_data))
    back = load_span(path)
    assert back.form == "deploy"
    _assert_bitwise(back.state_dict(), ours.state_dict())


def test_demo_merged_student_runs_exactly_in_spandrel(tmp_path):
    """The demo's export: a DSCLoRA student with non-zero adapters, merged by dsclora.deploy and
    written as merged.safetensors (plain deploy SPAN), as train.py does, then written for spandrel."""
    student = build_student(_random_span(8))
    with torch.no_grad():
        for p in convlora.lora_parameters(student):
            p.normal_(0, 0.05)
    convlora.save_state_dict(deploy(student).state_dict(), tmp_path / "merged.safetensors")
    merged = load_file(str(tmp_path / "merged.safetensors"))
    ours = SPAN(feature_channels=8).eval()
    ours.load_state_dict(merged)
    path = tmp_path / "student_spandrel.safetensors"
    assert main(["--weights", str(tmp_path / "merged.safetensors"), "--export-spandrel", str(path)]) == 0
    torch.manual_seed(0)
    _spandrel_matches(path, ours, torch.rand(1, 3, 23, 17))
    _assert_bitwise(load_span(path).state_dict(), merged)


def test_cli_refusals_write_nothing(tmp_path, capsys):
    weights = tmp_path / "w.safetensors"
    save_file(_random_span(4).state_dict(), str(weights))
    before = weights.read_bytes()
    for out, why in ((weights, "is an input file"), (tmp_path / "sub" / ".." / "w.safetensors", "is an input file"),
                     (tmp_path / "w.onnx", "must end in .safetensors or .pth")):
        with pytest.raises(SystemExit) as err:
            main(["--weights", str(weights), "--export-spandrel", str(out)])
        assert err.value.code == 2 and why in capsys.readouterr().err
    assert weights.read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()) == ["w.safetensors"]
    state = _random_span(4).state_dict()
    state["conv_cat.weight"], state["conv_cat.bias"] = torch.zeros(3, 16, 1, 1), torch.zeros(3)
    state["upsampler.0.weight"] = torch.zeros(48, 3, 3, 3)
    narrow = tmp_path / "narrow.pth"
    torch.save(state, narrow)
    with pytest.raises(SystemExit, match=re.escape("conv_cat maps 16 -> 3 channels")):
        main(["--weights", str(narrow), "--export-spandrel", str(tmp_path / "out.pth")])
    assert not (tmp_path / "out.pth").exists()


@requires_shared
def test_span_with_narrow_conv_cat_is_refused(shared_data):
    model = load_span(shared_data / "weights" / "span_ch28_ema_trainckpt.pth")
    with pytest.raises(ValueError, match=re.escape("conv_cat maps 112 -> 20 channels")):
        to_spandrel(model.state_dict())


def test_load_span_reads_nested_spandrel_checkpoints(tmp_path):
    """The community's training checkpoints: spandrel's layout under params / params_ema."""
    ema, raw = _random_span(4, seed=5), _random_span(4, seed=6)
    path = tmp_path / "community.pth"
    torch.save({"params": to_spandrel(raw.state_dict()), "params_ema": to_spandrel(ema.state_dict())}, path)
    _assert_bitwise(load_span(path).state_dict(), ema.state_dict())
    _assert_bitwise(load_span(path, key="params").state_dict(), raw.state_dict())


def test_to_spandrel_refuses_other_layouts():
    deploy = _random_span(4).state_dict()
    with pytest.raises(ValueError, match="already has a train branch"):
        to_spandrel(to_spandrel(deploy))
    with pytest.raises(ValueError, match=r"missing keys \['block_2.c1_r.eval_conv.bias'\]"):
        to_spandrel({k: v for k, v in deploy.items() if k != "block_2.c1_r.eval_conv.bias"})
    with pytest.raises(ValueError, match=r"unexpected keys \['extra'\]"):
        to_spandrel({**deploy, "extra": torch.zeros(1)})


def _community_file(width: int = 6) -> dict[str, torch.Tensor]:
    """A SPAN file as the official training code and spandrel write it: a trained train branch
    and the eval_conv that spandrel's own fusion computes from it."""
    train = _random_span(width, form="train", seed=3).state_dict()
    dummy = {f"{p}.eval_conv.{t}": torch.zeros(1) for p in CONV3XC_PREFIXES for t in ("weight", "bias")}
    shapes = {k: v.shape for k, v in to_spandrel(_random_span(width).state_dict()).items()}
    dummy = {k: torch.zeros(shapes[k]) for k in dummy}
    desc = spandrel.ModelLoader().load_from_state_dict({**train, **dummy})
    with torch.no_grad():
        desc.model.eval()(torch.rand(1, 3, 8, 8))  # each Conv3XC re-fuses its eval_conv
    return {k: v.clone() for k, v in desc.model.state_dict().items()}


def test_community_file_reads_back_and_a_stale_one_is_refused():
    state = _community_file()
    deploy = from_spandrel(state)
    assert len(deploy) == 44 and not any(".sk." in k for k in deploy)
    assert load_span(state).form == "deploy"
    for p in CONV3XC_PREFIXES:  # spandrel fuses in float32, we in float64: round-off only
        torch.testing.assert_close(deploy[f"{p}.eval_conv.weight"], state[f"{p}.eval_conv.weight"])
    stale = dict(state)
    stale["block_3.c2_r.conv.1.weight"] = stale["block_3.c2_r.conv.1.weight"] * 1.01
    with pytest.raises(ValueError, match=r"block_3\.c2_r\.eval_conv\.weight differs"):
        from_spandrel(stale)


def _tf32(t: torch.Tensor) -> torch.Tensor:
    """Round float32 to TF32 (10 mantissa bits, to nearest), as a cuDNN conv does its operands."""
    i = t.contiguous().view(torch.int32)
    return ((i + 0x1000) & ~0x1FFF).view(torch.float32)


def test_eval_conv_fused_in_tf32_on_a_gpu_is_accepted():
    """The official code fuses eval_conv with F.conv2d, which PyTorch runs in TF32 on a GPU by
    default: that round-off is within the tolerance."""
    state = _community_file()
    for p in CONV3XC_PREFIXES:
        e, k, r = (state[f"{p}.conv.{j}.weight"][..., 0, 0] if j != 1 else state[f"{p}.conv.1.weight"]
                   for j in (0, 1, 2))
        mid = torch.einsum("nmhw,mi->nihw", _tf32(k), _tf32(e))
        weight = torch.einsum("on,nihw->oihw", _tf32(r), _tf32(mid))
        weight[:, :, 1, 1] += state[f"{p}.sk.weight"][:, :, 0, 0]
        assert (weight - state[f"{p}.eval_conv.weight"]).abs().max() > 0
        state[f"{p}.eval_conv.weight"] = weight
    from_spandrel(state)


def test_no_norm_is_refused():
    with pytest.raises(ValueError, match="no_norm"):
        from_spandrel({**to_spandrel(_random_span(4).state_dict()), "no_norm": torch.zeros(1)})
