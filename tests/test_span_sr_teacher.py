"""Teachers of any architecture (examples/span_sr/teacher.py): SPAN files in our layout and spandrel's,
any checkpoint spandrel loads (CRAFT from ../shared/data), scale checks, the missing-extra message,
affinity taps on a spandrel teacher by its module names."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from examples.span_sr import dsclora
from examples.span_sr.arch import SPAN
from examples.span_sr.config import LossConfig
from examples.span_sr.spandrel_format import to_spandrel
from examples.span_sr.teacher import SpandrelTeacher, load_teacher, teacher_tap

pytestmark = pytest.mark.usefixtures("one_thread")


def _span(width: int, scale: int = 4, seed: int = 0) -> SPAN:
    torch.manual_seed(seed)
    return SPAN(feature_channels=width, upscale=scale).eval()


def test_span_files_in_both_layouts_load_as_our_span(tmp_path: Path) -> None:
    ours = _span(8)
    torch.save(ours.state_dict(), tmp_path / "deploy.pth")
    torch.save(to_spandrel(ours.state_dict()), tmp_path / "spandrel.pth")
    x = torch.rand(1, 3, 10, 9)
    for name in ("deploy.pth", "spandrel.pth"):
        teacher = load_teacher(tmp_path / name, scale=4)
        assert isinstance(teacher, SPAN) and not teacher.training
        assert not any(p.requires_grad for p in teacher.parameters())
        with torch.no_grad():
            torch.testing.assert_close(teacher(x), ours(x), atol=1e-6, rtol=1e-6)
    with pytest.raises(ValueError, match=r"x4 but the run is x2"):
        load_teacher(tmp_path / "deploy.pth", scale=2)
    with pytest.raises(FileNotFoundError, match="do not exist"):
        load_teacher(tmp_path / "missing.pth")


def test_scale_mismatch_between_base_and_teacher(tmp_path: Path) -> None:
    torch.save(_span(8, scale=4).state_dict(), tmp_path / "base.pth")
    torch.save(_span(8, scale=2).state_dict(), tmp_path / "teacher.pth")
    with pytest.raises(ValueError, match=r"scales differ: student base x4, teacher x2"):
        dsclora.load_pair(tmp_path / "base.pth", tmp_path / "teacher.pth", 4)


def test_missing_spandrel_is_one_line_naming_the_extra(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    torch.save({"conv_first.weight": torch.zeros(4, 3, 3, 3)}, tmp_path / "other.pth")
    monkeypatch.setitem(sys.modules, "spandrel", None)  # import spandrel now raises ImportError
    with pytest.raises(ImportError, match=r"\[spandrel\] extra") as err:
        load_teacher(tmp_path / "other.pth")
    assert "\n" not in str(err.value)


def test_unknown_architecture_is_refused(tmp_path: Path) -> None:
    pytest.importorskip("spandrel")
    torch.save({"not_a_model.weight": torch.zeros(2, 2)}, tmp_path / "junk.pth")
    with pytest.raises(ValueError, match="neither a SPAN nor an architecture spandrel"):
        load_teacher(tmp_path / "junk.pth")


def test_craft_loads_through_spandrel_and_runs_like_spandrel(shared_data: Path) -> None:
    spandrel = pytest.importorskip("spandrel")
    path = shared_data / "weights" / "craft_x4.pth"
    teacher = load_teacher(path, scale=4)
    assert isinstance(teacher, SpandrelTeacher) and teacher.architecture == "CRAFT" and teacher.upscale == 4
    with pytest.raises(ValueError, match=r"x4 but the run is x3"):
        load_teacher(path, scale=3)
    descriptor = spandrel.ModelLoader().load_from_file(str(path))
    x = torch.rand(1, 3, 20, 17)  # not a multiple of CRAFT's 16: padded and cropped like spandrel's call
    with torch.no_grad():
        ours = teacher(x)
        theirs = descriptor(x.clone())
    assert ours.shape == (1, 3, 80, 68)
    assert (ours.clamp(0, 1) - theirs).abs().max().item() == 0.0
    # affinity taps by the teacher's module names (looked up under net.)
    base = _span(8)
    student = dsclora.build_student(base)
    loss = LossConfig(w_aff=0.1, taps=["conv_2"], teacher_taps=["conv_after_body"])
    assert dsclora.tap_map(teacher, loss) == {"conv_2": teacher_tap(teacher, "conv_after_body")}
    lr = torch.rand(2, 3, 16, 16)
    weights, w_aff, start = dsclora.affinity_tap_weights(base, teacher, loss, lr)
    assert weights is not None and set(start) == {"conv_2"} and w_aff > 0
    total, parts, _ = dsclora.make_loss(student, teacher, loss, weights, w_aff)(lr, torch.rand(2, 3, 64, 64), step=0)
    total.backward()
    assert parts["aff"] > 0 and any(p.grad is not None for p in student.parameters() if p.requires_grad)
    with pytest.raises(ValueError, match="needs loss.teacher_taps"):
        dsclora.tap_map(teacher, LossConfig(w_aff=0.1))
    with pytest.raises(ValueError, match="1 names for 2 loss.taps"):
        dsclora.tap_map(teacher, LossConfig(w_aff=0.1, taps=["conv_2", "block_1"], teacher_taps=["conv_first"]))
