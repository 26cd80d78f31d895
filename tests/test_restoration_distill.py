"""examples/restoration/distill.py at CPU size: the affinity taps really reach the adapter's
gradient, the base stays frozen, the script runs end to end, and bad teacher/student pairs fail
with clear errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import convlora
from convlora.distill import Distiller
from examples.restoration import distill
from examples.restoration.data import SAMPLE_TRAIN, PatchSampler, center_crop, sample_photos
from examples.restoration.degrade import get_task
from examples.restoration.evaluate import degraded_cases, score
from examples.restoration.model import ResidualCNN, SmallUNet, load_model, save_model

TAPS = {"body.0": "body.0", "body.1": "body.1"}
TINY_CONFIG = """
seed: 0
threads: 1
data: {source: sample, synthetic_kernels: 8}
model: {channels: 8, depth: 4}
train: {patch: 24, batch: 2, loss: l1}
adapter: {rank: 1, alpha: null, lr: 1.0e-2, steps: 2}
eval: {source: sample, crop: 48}
"""


pytestmark = pytest.mark.usefixtures("one_thread")


def _pair() -> tuple[torch.nn.Module, torch.nn.Module, list[torch.nn.Parameter]]:
    """A 4-layer 8-channel student (rank-1 adapter, base frozen) and a 16-channel teacher."""
    torch.manual_seed(0)
    student, teacher = ResidualCNN(8, 4), ResidualCNN(16, 4)
    convlora.inject(student, convlora.LoRAConfig(rank=1), adapter_name="t")
    return student, teacher, list(convlora.lora_parameters(student, "t"))


def _xy() -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(3)
    clean = torch.rand(2, 3, 20, 20, generator=gen)
    return clean + 0.2 * torch.randn(clean.shape, generator=gen), clean


def _distiller(student: torch.nn.Module, teacher: torch.nn.Module, taps: dict[str, str] | None,
               w: dict[str, float]) -> Distiller:
    return Distiller(student, teacher, taps, w_rec=w["w_rec"], w_out=w["w_out"], w_aff=w["w_aff"])


def _grads(d: Distiller, params: list[torch.nn.Parameter]) -> tuple[list[torch.Tensor], dict]:
    total, parts, _ = d(*_xy())
    grads = torch.autograd.grad(total, params, allow_unused=True)
    return [torch.zeros_like(p) if g is None else g for p, g in zip(params, grads)], parts


def test_affinity_taps_give_a_nonzero_loss_that_changes_the_adapter_gradient() -> None:
    student, teacher, params = _pair()
    w = distill.arm_weights("rec_aff", 0.5, 0.7)
    g_l1, parts_l1 = _grads(_distiller(student, teacher, None, distill.arm_weights("l1", 0.5, 0.7)), params)
    g_aff, parts = _grads(_distiller(student, teacher, TAPS, w), params)
    g_only, _ = _grads(Distiller(student, teacher, TAPS, w_rec=0, w_out=0, w_aff=1), params)
    assert parts_l1["aff"] == 0 and parts["aff"] > 1e-3
    assert parts["rec"] == parts_l1["rec"]  # same student output: only the affinity term differs
    diff = torch.cat([(a - b).flatten() for a, b in zip(g_aff, g_l1)])
    assert diff.norm() > 1e-2 * torch.cat([g.flatten() for g in g_l1]).norm()
    for a, b, c in zip(g_aff, g_l1, g_only):  # the change is exactly w_aff times the affinity gradient
        torch.testing.assert_close(a - b, w["w_aff"] * c, rtol=1e-4, atol=1e-7)
    # Layers head, body.0, body.1, tail; taps on body.0 and body.1: the affinity gradient reaches
    # the adapters up to the last tap, never the tail's after it.
    names = [n for n, _ in student.named_parameters() if ".lora_" in n]
    after = [g for n, g in zip(names, g_only) if n.startswith("tail")]
    before = [g for n, g in zip(names, g_only) if n.startswith(("head", "body.0", "body.1")) and "lora_B" in n]
    assert len(after) == 2 and all(g.abs().max() == 0 for g in after)
    assert len(before) == 3 and all(g.abs().max() > 0 for g in before)


def test_distill_steps_trains_only_the_adapter() -> None:
    student, teacher, params = _pair()
    frozen = {n: p.detach().clone() for n, p in student.named_parameters() if ".lora_" not in n}
    adapter = [p.detach().clone() for p in params]
    assert frozen and not any(p.requires_grad for n, p in student.named_parameters() if n in frozen)
    images = list(sample_photos(SAMPLE_TRAIN[:1]).values())
    sampler = PatchSampler(images, 24, torch.Generator().manual_seed(0))
    d = _distiller(student, teacher, TAPS, distill.arm_weights("out_aff", 0.5, 1.0))
    log = distill.distill_steps(d, params, sampler, get_task("noise50"), None, steps=3, lr=1e-2, batch=2,
                                generator=torch.Generator().manual_seed(1), log_every=0)
    assert len(log) == 3 and all(r["aff"] > 0 and r["out"] > 0 and r["rec"] > 0 for r in log)
    for n, p in student.named_parameters():
        if n in frozen:
            assert torch.equal(p, frozen[n]), n
    assert any(not torch.equal(p, q) for p, q in zip(params, adapter))


def test_main_runs_end_to_end_and_its_numbers_reproduce(tmp_path: Path) -> None:
    (tmp_path / "tiny.yaml").write_text(TINY_CONFIG)
    torch.manual_seed(0)
    save_model(ResidualCNN(8, 4), tmp_path / "base.safetensors")
    common = ["--config", str(tmp_path / "tiny.yaml"), "--base", str(tmp_path / "base.safetensors"),
              "--taps", "body.0", "body.1"]
    res = distill.main([*common, "--out", str(tmp_path / "run"), "--teacher-channels", "16",
                        "--teacher-steps", "3"])
    run = tmp_path / "run"
    saved = json.loads((run / "results.json").read_text())
    assert set(saved["arms"]) == set(distill.ARMS) and saved["arms"] == json.loads(json.dumps(res["arms"]))
    assert list(saved["rows"])[:3] == ["input (degraded)", "base", "teacher"]
    assert "| adapter: out_aff |" in (run / "results.md").read_text()
    sc = saved["scales"]
    assert saved["w_aff"] == pytest.approx(sc["rec"]["grad_norm"] / sc["aff"]["grad_norm"], rel=0.05)
    assert sc["aff"]["value"] > 0 and saved["arms"]["out_aff"]["loss_last10pct"]["aff"] > 0
    teacher = load_model(run / "teacher.safetensors")
    assert isinstance(teacher, ResidualCNN) and teacher.channels == 16
    # Each saved adapter, loaded onto a fresh base, scores what results.json says.
    image = {k: center_crop(v, 48) for k, v in sample_photos(("chelsea",)).items()}
    cases = degraded_cases(get_task("noise50"), image, [], 0)
    for arm in distill.ARMS:
        model = load_model(tmp_path / "base.safetensors")
        convlora.load_adapter(model, run / "adapters" / f"{arm}.safetensors")
        assert score(model, cases)["psnr"] == pytest.approx(saved["arms"][arm]["psnr"], abs=1e-9), arm
    # Reusing the teacher reruns an arm on the same seeded stream and init: the same numbers.
    again = distill.main([*common, "--out", str(tmp_path / "again"), "--teacher",
                          str(run / "teacher.safetensors"), "--arms", "out_aff"])
    assert again["arms"]["out_aff"]["per_case"] == res["arms"]["out_aff"]["per_case"]
    assert again["rows"]["teacher"]["psnr"] == res["rows"]["teacher"]["psnr"]
    assert again["scales"] == res["scales"] and again["w_aff"] == res["w_aff"]


def test_arm_and_pair_errors_are_clear() -> None:
    student, teacher, _ = _pair()
    distill.check_pair(student, teacher, TAPS)  # a matching pair passes
    with pytest.raises(ValueError, match="bogus"):
        distill.arm_weights("bogus", 0.5, 1.0)
    with pytest.raises(ValueError, match="body.99"):
        distill.check_pair(student, teacher, {"body.0": "body.99"})
    with pytest.raises(ValueError, match="spatial sizes"):  # U-Net enc1 runs at half resolution
        distill.check_pair(student, SmallUNet((8, 8, 8)), {"body.0": "enc1"})
    with pytest.raises(ValueError, match="teacher does not fit"):
        distill.check_pair(student, ResidualCNN(16, 4, in_channels=1), TAPS)

    class Cropped(ResidualCNN):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return super().forward(x)[..., 1:-1, 1:-1]

    with pytest.raises(ValueError, match=r"student output \(1, 3, 24, 24\) and teacher output \(1, 3, 22, 22\)"):
        distill.check_pair(student, Cropped(16, 4), TAPS)
