"""upscale.py: the receptive-field radius behind tiling, the tiling guarantee (tiled vs untiled),
the CLI and the ONNX export checked with onnxruntime."""

from __future__ import annotations

import sys

import numpy as np
import onnx
import pytest
import torch
from conftest import requires_shared

import convlora
from examples.span_sr.arch import SPAN, load_span
from examples.span_sr.dsclora import build_student
from examples.span_sr.images import read_image, write_image
from examples.span_sr.metrics import to_uint8
from examples.span_sr.upscale import (
    SPAN_RF_RADIUS,
    check_onnx,
    export_onnx,
    main,
    tiles,
    upscale_image,
    upscale_tensor,
)

# Tiling guarantee for float32 on CPU (docs/span_sr.md, "Tiling"); measured on Set5 + Set14 at
# tiles 32/48/56, one thread, AVX-512: max |diff| 4.1e-6, at most 2.8e-5 of an image's uint8 values.
TILE_FP32_TOL = 1e-5
TILE_U8_MAX_FRACTION = 1e-4
TILE_SIZES = (32, 48, 56)


def _random_span(seed: int = 0, width: int = 8) -> SPAN:
    torch.manual_seed(seed)
    model = SPAN(feature_channels=width).double().eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.4 / max(1, p[0].numel()) ** 0.5)
    return model


def test_receptive_field_radius_is_21():
    """Perturb one LR pixel: exactly the LR positions within Chebyshev distance 21 change."""
    model = _random_span()
    x = torch.rand(1, 3, 56, 56, dtype=torch.float64)
    x2 = x.clone()
    x2[0, :, 28, 28] += 1.0
    with torch.no_grad():
        diff = (model(x2) - model(x)).abs().amax(dim=1)[0]
    lr_changed = diff.view(56, 4, 56, 4).amax(dim=(1, 3)) > 0
    rows, cols = torch.nonzero(lr_changed, as_tuple=True)
    reach = torch.maximum((rows - 28).abs(), (cols - 28).abs()).max().item()
    assert reach == SPAN_RF_RADIUS


@pytest.mark.parametrize(("h", "w", "same_shape"), [(37, 50, False), (37, 50, True), (20, 50, True)])
def test_tiles_cover_the_image_once(h, w, same_shape):
    """Every pixel is one tile's core, with ``pad`` context on each side or the image border;
    ``same_shape`` (``--fast``) windows all have one shape."""
    seen = np.zeros((h, w), int)
    shapes = set()
    for rows, cols, core_r, core_c in tiles(h, w, 16, 5, same_shape):
        assert rows.start >= 0 and rows.stop <= h and cols.start >= 0 and cols.stop <= w
        for win, core, n in ((rows, core_r, h), (cols, core_c, w)):
            assert core.start >= 5 or win.start == 0
            assert win.stop - win.start - core.stop >= 5 or win.stop == n
        seen[rows.start + core_r.start: rows.start + core_r.stop,
             cols.start + core_c.start: cols.start + core_c.stop] += 1
        shapes.add((rows.stop - rows.start, cols.stop - cols.start))
    assert (seen == 1).all()
    if same_shape:
        assert shapes == {(min(26, h), min(26, w))}
    else:
        assert len(shapes) > 1
    with pytest.raises(ValueError, match="tile=0"):
        list(tiles(8, 8, 0, 1))


@requires_shared
def test_tiling_needs_the_full_margin(shared_data):
    """float64, so round-off (~1e-15) cannot hide a one-pixel-too-small margin. (Long paths
    through the attention contribute little: with the trained weights a 20-pixel margin is off
    by ~5e-10, a random init hides it entirely; the exact margin is still 21.)"""
    model = load_span(shared_data / "weights" / "span_tiny_ch26.pth").double()
    lr = read_image(shared_data / "sr_bench" / "Set14" / "LR_bicubic" / "X4" / "comicx4.png")
    x = torch.from_numpy(lr[:24, :72].copy()).permute(2, 0, 1)[None].double() / 255
    with torch.no_grad():
        full = model(x)
    exact = upscale_tensor(model, x, tile=24)  # three tiles side by side
    torch.testing.assert_close(exact, full, rtol=0, atol=1e-12)
    # --fast's windows of one shape (shifted inward at the border) are just as exact
    for tile in (24, 20):
        same = upscale_tensor(model, x, tile=tile, same_shape=True)
        torch.testing.assert_close(same, full, rtol=0, atol=1e-12)
    short = upscale_tensor(model, x, tile=24, pad=SPAN_RF_RADIUS - 1)
    assert (short - full).abs().max().item() > 1e-11


@requires_shared
@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize("same_shape", [False, True], ids=["tiles", "same_shape_tiles"])
def test_tiling_guarantee_on_set5_and_set14(shared_data, same_shape):
    """The guarantee stated in docs/span_sr.md ("Tiling"), on every Set5 and Set14 LR image at
    three tile sizes (all smaller than the smallest image side, 57, so every image is tiled).

    Tiled and untiled float32 outputs are the same sums in a different floating-point order
    (PyTorch picks the convolution backend by tensor size, oneDNN its blocking by shape and ISA,
    and vectorised pointwise ops switch to scalar code at a tensor's tail), so they agree to
    ``TILE_FP32_TOL``, not bit for bit. Rounding to uint8 then moves a value by at most one level,
    only where the untiled value lies within ``255 * max|diff|`` of a rounding boundary, and in
    at most ``TILE_U8_MAX_FRACTION`` of an image's values."""
    model = load_span(shared_data / "weights" / "span_tiny_ch26.pth")
    files = sorted((shared_data / "sr_bench" / "Set5" / "LR_bicubic" / "X4").glob("*.png"))
    files += sorted((shared_data / "sr_bench" / "Set14" / "LR_bicubic" / "X4").glob("*.png"))
    assert len(files) == 19
    with torch.no_grad():
        for f in files:
            lr = read_image(f)
            assert min(lr.shape[:2]) > max(TILE_SIZES)  # so every image is really cut into tiles
            x = torch.from_numpy(lr.copy()).permute(2, 0, 1)[None].float() / 255
            full = upscale_tensor(model, x)
            full_u8 = to_uint8(full).astype(np.int16)
            level = (full[0].clamp(0, 1) * 255.0).permute(1, 2, 0).double().numpy()  # as to_uint8
            to_boundary = np.abs(level - np.floor(level) - 0.5)
            for tile in TILE_SIZES:
                tiled = upscale_tensor(model, x, tile=tile, same_shape=same_shape)
                assert tiled.shape == full.shape
                diff = (tiled - full).abs().max().item()
                assert diff <= TILE_FP32_TOL, f"{f.name} tile={tile}: max |diff| {diff:.2e}"
                moved = to_uint8(tiled).astype(np.int16) - full_u8
                assert np.abs(moved).max() <= 1, f"{f.name} tile={tile}"
                # a value moves only if a rounding boundary lies between the two float values
                # (1e-4: the float32 product's own rounding, ulp(255) = 1.5e-5)
                assert (to_boundary[moved != 0] <= 255 * diff + 1e-4).all(), f"{f.name} tile={tile}"
                fraction = np.count_nonzero(moved) / moved.size
                assert fraction <= TILE_U8_MAX_FRACTION, f"{f.name} tile={tile}: {fraction:.1e}"
    # upscale_image's uint8 tiles are the same arithmetic as upscale_tensor's float tiles
    assert np.array_equal(upscale_image(model, lr, tile=40, same_shape=same_shape),
                          to_uint8(upscale_tensor(model, x, tile=40, same_shape=same_shape)))


def test_cli_folder_and_onnx(tmp_path):
    model = build_student(SPAN(feature_channels=8))
    with torch.no_grad():  # non-zero adapters, so the export must merge them
        for p in convlora.lora_parameters(model):
            p.normal_(0, 0.05)
    base_keys = set(SPAN(feature_channels=8).state_dict())
    weights = tmp_path / "w.pth"
    torch.save(convlora.unload(model, merge=True).state_dict(), weights)
    reference = load_span(weights)
    assert set(reference.state_dict()) == base_keys

    rng = np.random.default_rng(0)
    src = tmp_path / "in"
    for name in ("a", "b"):
        write_image(src / f"{name}.png", rng.integers(0, 256, (18, 22, 3), dtype=np.uint8))
    assert main(["--weights", str(weights), "--input", str(src), "--output", str(tmp_path / "out"),
                 "--tile", "8", "--onnx", str(tmp_path / "m.onnx")]) == 0
    for name in ("a", "b"):
        out = read_image(tmp_path / "out" / f"{name}.png")
        assert np.array_equal(out, upscale_image(reference, read_image(src / f"{name}.png")))

    graph = onnx.load(str(tmp_path / "m.onnx")).graph
    assert sum(node.op_type == "Conv" for node in graph.node) == 22
    assert check_onnx(tmp_path / "m.onnx", reference, torch.rand(2, 3, 21, 13)) < 1e-4


def test_onnx_export_merges_lora(tmp_path):
    model = build_student(SPAN(feature_channels=8))
    with torch.no_grad():
        for p in convlora.lora_parameters(model):
            p.normal_(0, 0.05)
    path = export_onnx(model, tmp_path / "student.onnx")
    x = torch.rand(1, 3, 16, 20)
    assert check_onnx(path, model, x) < 1e-4
    with torch.no_grad():  # the merged export equals the *adapted* student, not the base
        with convlora.disabled(model):
            base_out = model(x)
        assert (model(x) - base_out).abs().max().item() > 1e-3


def test_bad_inputs():
    model = SPAN(feature_channels=4)
    with pytest.raises(ValueError, match="uint8 HxWx3"):
        upscale_image(model, np.zeros((4, 4), np.uint8))


@requires_shared
def test_onnx_of_released_checkpoint_on_a_real_image(shared_data, tmp_path):
    model = load_span(shared_data / "weights" / "dsclora_ch26.pth")
    path = export_onnx(model, tmp_path / "dsclora.onnx")
    lr = read_image(shared_data / "sr_bench" / "Set5" / "LR_bicubic" / "X4" / "butterflyx4.png")
    x = torch.from_numpy(lr.copy()).permute(2, 0, 1)[None].float() / 255
    assert check_onnx(path, model, x) < 5e-5  # measured 4.8e-6


def test_onnx_without_onnx_installed_is_one_line(tmp_path, monkeypatch):
    """--onnx without the [onnx] extra names the extra, before anything is loaded or written."""
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # makes `import onnxruntime` fail
    with pytest.raises(SystemExit, match=r"--onnx needs onnx and onnxruntime \(onnxruntime is missing\): "
                                         r'pip install -e "\.\[onnx\]"'):
        main(["--weights", str(tmp_path / "absent.pth"), "--onnx", str(tmp_path / "m.onnx")])
    assert not (tmp_path / "m.onnx").exists()


def test_missing_weights_or_input_is_one_line(tmp_path):
    torch.save(SPAN(feature_channels=4).state_dict(), tmp_path / "w.pth")
    with pytest.raises(SystemExit, match=r"^upscale.py: weights file .*missing.pth.* docs/data.md"):
        main(["--weights", str(tmp_path / "missing.pth"), "--input", str(tmp_path / "w.pth"), "--output", "o"])
    with pytest.raises(SystemExit, match=r"^upscale.py: input image .*nowhere.png.* does not exist"):
        main(["--weights", str(tmp_path / "w.pth"), "--input", str(tmp_path / "nowhere.png"), "--output", "o"])
    assert not (tmp_path / "o").exists()


def test_help_is_short_and_names_both_weight_formats(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    text = capsys.readouterr().out
    assert ".pth or .safetensors" in text and len(text.splitlines()) < 40
