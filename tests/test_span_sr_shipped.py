"""The shipped DSCLoRA adapter (examples/span_sr/adapters/): it loads, merges, and beats the official weights.

Both models are scored in the same run with the same evaluator (MATLAB-uint8 bicubic LR made from
the HR, Y-PSNR, border 4, SR rounded to uint8); nothing is compared with a stored figure.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import REPO, requires_shared

import convlora
from convlora.cli import main as convlora_main
from examples.span_sr.arch import load_span
from examples.span_sr.dsclora import load_deployed
from examples.span_sr.evaluate import evaluate_folder
from examples.span_sr.evaluate import main as evaluate_main

ADAPTER = REPO / "examples" / "span_sr" / "adapters" / "dsclora_x4_craft.safetensors"
pytestmark = [requires_shared, pytest.mark.usefixtures("one_thread")]


def _psnr(model: torch.nn.Module, shared_data: Path, bench: str) -> float:
    return float(evaluate_folder(model, shared_data / "sr_bench" / bench / "HR")["mean"]["psnr_y"])


def test_adapter_is_a_small_lora_file_for_span_tiny_ch26(shared_data: Path) -> None:
    tensors, meta = convlora.read_adapter(ADAPTER)
    assert ADAPTER.stat().st_size < 400_000
    assert all(t.dtype == torch.float32 for t in tensors.values())
    base = load_span(shared_data / "weights" / "span_tiny_ch26.pth")
    convlora.load_adapter(base, ADAPTER)  # the fingerprint check passes on the official base file
    assert convlora.lora_parameters(base)
    assert meta  # the file carries its config (method, ranks, fingerprints)


def test_convlora_merge_onto_the_base_file_equals_the_loaded_adapter(shared_data: Path, tmp_path: Path) -> None:
    out = tmp_path / "merged.pth"
    assert convlora_main(["merge", "--adapter", str(ADAPTER), "--base",
                          str(shared_data / "weights" / "span_tiny_ch26.pth"), "--out", str(out)]) == 0
    merged, loaded = load_span(out), load_deployed(shared_data / "weights" / "span_tiny_ch26.pth", ADAPTER)
    base = load_span(shared_data / "weights" / "span_tiny_ch26.pth")
    assert sum(p.numel() for p in merged.parameters()) == sum(p.numel() for p in base.parameters())
    x = torch.rand(1, 3, 24, 20, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(merged(x), loaded(x), atol=1e-6, rtol=1e-5)
        assert (merged(x) - base(x)).abs().max() > 1e-4  # the adapter changes the model


def test_evaluate_cli_loads_the_adapter(shared_data: Path, tmp_path: Path) -> None:
    report = tmp_path / "set5.json"
    assert evaluate_main(["--weights", str(shared_data / "weights" / "span_tiny_ch26.pth"), "--lora-adapter",
                          str(ADAPTER), "--data", str(shared_data / "sr_bench" / "Set5"), "--regenerate-lr",
                          "--json", str(report)]) == 0
    got = json.loads(report.read_text())["sets"]["Set5"]["mean"]["psnr_y"]
    merged = load_deployed(shared_data / "weights" / "span_tiny_ch26.pth", ADAPTER)
    assert got == pytest.approx(_psnr(merged, shared_data, "Set5"), abs=1e-9)


def _beats_official(shared_data: Path, bench: str) -> None:
    ours = load_deployed(shared_data / "weights" / "span_tiny_ch26.pth", ADAPTER)
    official = load_span(shared_data / "weights" / "dsclora_ch26.pth")
    a, b = _psnr(ours, shared_data, bench), _psnr(official, shared_data, bench)
    assert a > b, f"{bench}: shipped adapter {a:.4f} dB is not above the official dsclora_ch26 {b:.4f} dB"


@pytest.mark.parametrize("bench", ["Set5", "Set14"])
def test_shipped_adapter_beats_the_official_weights(shared_data: Path, bench: str) -> None:
    _beats_official(shared_data, bench)


@pytest.mark.slow
def test_shipped_adapter_beats_the_official_weights_on_b100(shared_data: Path) -> None:
    _beats_official(shared_data, "B100")
