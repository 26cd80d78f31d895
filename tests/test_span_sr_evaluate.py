"""evaluate.py reproduces the reference PSNRs of ../shared/data/weights/MANIFEST.md."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import REPO, requires_shared

import convlora
from examples.span_sr.arch import SPAN, load_span
from examples.span_sr.dsclora import build_student, load_deployed
from examples.span_sr.evaluate import dataset_dirs, evaluate_folder, main
from examples.span_sr.images import write_image

# MANIFEST.md: Y-PSNR, MATLAB-uint8 bicubic LR from the HR, border 4, SR rounded to uint8
REFERENCE = {
    "span_tiny_ch26": {"Set5": 31.739, "Set14": 28.333, "B100": 27.398},
    "dsclora_ch26": {"Set5": 31.746, "Set14": 28.342, "B100": 27.404},
    "span_ch28": {"Set5": 31.740, "Set14": 28.401, "B100": 27.446},
}
PSNR_TOL = 0.005


def _check_reference(shared_data, weights: str, bench: str) -> None:
    model = load_span(shared_data / "weights" / f"{weights}.pth")
    result = evaluate_folder(model, shared_data / "sr_bench" / bench / "HR")  # LR made from HR
    assert result["mean"]["psnr_y"] == pytest.approx(REFERENCE[weights][bench], abs=PSNR_TOL)
    assert result["count"] == {"Set5": 5, "Set14": 14, "B100": 100}[bench]
    assert 0.5 < result["mean"]["ssim_y"] < 1
    assert result["mean"]["psnr_rgb"] < result["mean"]["psnr_y"]


@requires_shared
@pytest.mark.parametrize("weights", sorted(REFERENCE))
@pytest.mark.parametrize("bench", ["Set5", "Set14"])
def test_reference_psnr(shared_data, weights, bench):
    _check_reference(shared_data, weights, bench)


@requires_shared
@pytest.mark.slow
@pytest.mark.parametrize("weights", sorted(REFERENCE))
def test_reference_psnr_b100(shared_data, weights):
    _check_reference(shared_data, weights, "B100")


@requires_shared
def test_provided_lr_folder_is_used_and_agrees(shared_data):
    """LR read from LR_bicubic/X4 (``<name>x4.png``) equals our MATLAB bicubic: same metrics."""
    torch.manual_seed(0)
    model = SPAN(feature_channels=4)  # any model: this checks the data path, not the weights
    root = shared_data / "sr_bench" / "Set5"
    made = evaluate_folder(model, root / "HR")
    given = evaluate_folder(model, root / "HR", root / "LR_bicubic" / "X4")
    assert given["mean"] == made["mean"] and given["count"] == 5
    with pytest.raises(ValueError, match="expected"):
        evaluate_folder(model, root / "HR", root / "HR")  # HR-sized "LR" is rejected


def _tiny_dataset(root, n=2, size=(20, 26)):
    rng = np.random.default_rng(0)
    for i in range(n):
        write_image(root / "HR" / f"im{i}.png", rng.integers(0, 256, (*size, 3), dtype=np.uint8))
    return root


def test_cli_with_lora_adapter_writes_json(tmp_path):
    """--lora-adapter loads a convlora adapter onto the base and evaluates the merged model."""
    torch.manual_seed(0)
    base = SPAN(feature_channels=8)
    torch.save(base.state_dict(), tmp_path / "base.pth")
    student = build_student(load_span(tmp_path / "base.pth"))
    with torch.no_grad():
        for p in convlora.lora_parameters(student):
            p.normal_(0, 0.05)
    convlora.save_adapter(student, tmp_path / "a.safetensors")
    data = _tiny_dataset(tmp_path / "toy")

    assert main(["--weights", str(tmp_path / "base.pth"), "--lora-adapter",
                 str(tmp_path / "a.safetensors"), "--data", str(tmp_path), "--json",
                 str(tmp_path / "r.json")]) == 0
    out = json.loads((tmp_path / "r.json").read_text())
    merged = convlora.unload(student, merge=True)
    expected = evaluate_folder(merged, data / "HR")
    assert out["sets"]["toy"]["mean"] == pytest.approx(expected["mean"], abs=1e-9)
    assert [r["name"] for r in out["sets"]["toy"]["images"]] == ["im0", "im1"]
    plain = evaluate_folder(load_deployed(tmp_path / "base.pth"), data / "HR")
    assert plain["mean"]["psnr_y"] != pytest.approx(expected["mean"]["psnr_y"], abs=1e-6)


def test_script_runs_from_the_command_line(tmp_path):
    torch.save(SPAN(feature_channels=4).state_dict(), tmp_path / "w.pth")
    _tiny_dataset(tmp_path / "toy", n=1)
    proc = subprocess.run(
        [sys.executable, str(REPO / "examples" / "span_sr" / "evaluate.py"), "--weights",
         str(tmp_path / "w.pth"), "--data", str(tmp_path / "toy")],
        capture_output=True, text=True, timeout=300, cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr
    assert "Y-PSNR" in proc.stdout and "toy" in proc.stdout


def test_dataset_dirs_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no HR/ folder"):
        dataset_dirs([tmp_path])
    with pytest.raises(FileNotFoundError, match="does not exist.*docs/data.md"):
        dataset_dirs([tmp_path / "missing"])
    _tiny_dataset(tmp_path / "a", n=1)
    assert dataset_dirs([tmp_path]) == [tmp_path / "a"]


def test_missing_weights_or_data_is_one_line(tmp_path):
    torch.save(SPAN(feature_channels=4).state_dict(), tmp_path / "w.pth")
    _tiny_dataset(tmp_path / "toy", n=1)
    with pytest.raises(SystemExit, match=r"^evaluate.py: weights file .*missing.pth.* docs/data.md"):
        main(["--weights", str(tmp_path / "missing.pth"), "--data", str(tmp_path / "toy")])
    with pytest.raises(SystemExit, match=r"^evaluate.py: data folder .*nowhere.*does not exist.*docs/data.md"):
        main(["--weights", str(tmp_path / "w.pth"), "--data", str(tmp_path / "nowhere")])
