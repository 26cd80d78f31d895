"""efficiency.py: the DSCLoRA figures (0.131 M params, 8.54 G FLOPs, 22 convs) and zero added
cost after merge + unload."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import requires_shared

import convlora
from examples.span_sr.arch import SPAN, load_span
from examples.span_sr.dsclora import build_student
from examples.span_sr.efficiency import (
    complexity,
    count_convs,
    main,
    measure_runtime,
    runtime_inputs,
)


def _macs_by_hand(width: int, cat: int, hw: int = 256 * 256) -> int:
    k = 9
    return hw * (3 * width * k + 19 * width * width * k + 4 * width * cat + cat * 48 * k)


@requires_shared
def test_dsclora_ch26_figures_and_merged_student_is_identical(shared_data):
    released = complexity(load_span(shared_data / "weights" / "dsclora_ch26.pth"))
    assert round(released["params"] / 1e6, 3) == 0.131
    assert round(released["flops"] / 1e9, 2) == 8.54
    assert released["flops"] == _macs_by_hand(26, 26)
    assert released["convs"] == 22
    # activations: every conv output at 256x256: conv_1, 18 block convs, conv_2 and conv_cat
    # have 26 channels, the upsampler conv 48
    assert released["activations"] == 256 * 256 * (21 * 26 + 48)

    student = build_student(load_span(shared_data / "weights" / "span_tiny_ch26.pth"))
    with torch.no_grad():
        for p in convlora.lora_parameters(student):
            p.normal_(0, 0.01)
    assert count_convs(student) == 22
    assert complexity(student)["params"] == released["params"] + 25_920
    merged = convlora.unload(student, merge=True)
    assert complexity(merged) == released


def test_complexity_of_other_widths():
    fig = complexity(SPAN(feature_channels=28, conv_cat_channels=20), (64, 64))
    assert fig["flops"] == _macs_by_hand(28, 20, 64 * 64)
    assert fig["convs"] == 22 and fig["input"] == [1, 3, 64, 64]


def test_runtime_on_cpu_and_cli(tmp_path):
    model = SPAN(feature_channels=4)
    r = measure_runtime(model, runtime_inputs(None, (16, 16), 2), warmup=1, repeats=2)
    assert r["n"] == 4 and r["mean_ms"] > 0 and r["peak_mem_mb"] is None
    torch.save(model.state_dict(), tmp_path / "w.pth")
    assert main(["--weights", str(tmp_path / "w.pth"), "--runtime-size", "16", "16",
                 "--runtime-count", "1", "--json", str(tmp_path / "r.json")]) == 0
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["convs"] == 22 and report["runtime"][0]["n"] == 1
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="holds no images"):
        runtime_inputs(tmp_path / "empty", (8, 8), 1)
