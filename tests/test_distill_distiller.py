"""Distiller: loss composition, teacher isolation, warm-up, tap weights, errors."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import convlora
from convlora.distill import Distiller, FeatureTaps, affinity_loss


class Block(nn.Module):
    """Returns a tuple like SPAN blocks: (out, pre-activation)."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, padding=1)

    def forward(self, x):
        y = self.conv(x)
        return F.relu(y) + x, y


class SR(nn.Module):
    """Tiny x2 super-resolution net: head, two tuple blocks, pixel-shuffle tail."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.head = nn.Conv2d(3, c, 3, padding=1)
        self.b1, self.b2 = Block(c), Block(c)
        self.drop = nn.Dropout(0.5)  # makes train/eval observable
        self.tail = nn.Sequential(nn.Conv2d(c, 12, 3, padding=1), nn.PixelShuffle(2))

    def forward(self, x):
        h = self.head(x)
        h, _ = self.b1(h)
        h, _ = self.b2(h)
        return self.tail(self.drop(h))


TAPS = {"b1": "b1", "b2": "b2"}


@pytest.fixture
def models():
    torch.manual_seed(0)
    student, teacher = SR(4), SR(8)  # channel mismatch between student and teacher taps
    for p in teacher.parameters():
        p.requires_grad_(False)
    return student.eval(), teacher.train()


def batch():
    gen = torch.Generator().manual_seed(1)
    return torch.rand(2, 3, 6, 5, generator=gen), torch.rand(2, 3, 12, 10, generator=gen)


def manual(student, teacher, lr, hr, select=0, p=1, weights=(1.0, 1.0)):
    """The loss written out by hand with FeatureTaps."""
    teacher.eval()
    with torch.no_grad(), FeatureTaps(teacher, TAPS, select=select, detach=True) as t:
        t_sr = teacher(lr)
        tf = t.pop()
    with FeatureTaps(student, TAPS, select=select) as s:
        sr = student(lr)
        sf = s.pop()
    aff = sum(w * affinity_loss(sf[k], tf[k], p=p) for k, w in zip(TAPS, weights)) / sum(weights)
    return F.l1_loss(sr, hr), F.l1_loss(sr, t_sr), aff


@pytest.mark.parametrize("p", [1, 2])
def test_total_and_parts_match_hand_written_loss(models, p):
    student, teacher = models
    lr, hr = batch()
    dist = Distiller(student, teacher, TAPS, w_rec=0.3, w_out=0.5, w_aff=2.0, p=p, select=0,
                     tap_weights={"b2": 3.0})
    total, parts, sr = dist(lr, hr)
    rec, out, aff = manual(student, teacher.train(), lr, hr, p=p, weights=(1.0, 3.0))
    assert set(parts) == {"rec", "out", "aff"}
    for key, ref in zip(("rec", "out", "aff"), (rec, out, aff)):
        assert parts[key].dtype == torch.float32 and not parts[key].requires_grad
        torch.testing.assert_close(parts[key], ref.detach())
    torch.testing.assert_close(total, 0.3 * rec + 0.5 * out + 2.0 * aff)
    assert aff > 0 and sr.shape == hr.shape


def test_mse_pixel_loss_is_the_squared_error_of_both_output_terms(models):
    student, teacher = models
    lr, hr = batch()
    total, parts, sr = Distiller(student, teacher, w_rec=0.3, w_out=0.7, pixel="mse")(lr, hr)
    with torch.no_grad():
        t_sr = teacher.eval()(lr)
    rec, out = ((sr - hr) ** 2).mean(), ((sr - t_sr) ** 2).mean()
    torch.testing.assert_close(parts["rec"], rec.detach())
    torch.testing.assert_close(parts["out"], out.detach())
    torch.testing.assert_close(total, 0.3 * rec + 0.7 * out)
    assert not torch.allclose(parts["rec"], F.l1_loss(sr, hr).detach())  # not the L1 default


def test_teacher_is_isolated(models):
    student, teacher = models
    teacher.b1.eval()  # a mixed train/eval state must survive the call
    flags = [m.training for m in teacher.modules()]
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    dist = Distiller(student, teacher, TAPS, w_aff=1.0, select=(0, 1))
    assert not isinstance(dist, nn.Module)
    lr, hr = batch()
    total, _, _ = dist(lr, hr)
    total.backward()
    assert [m.training for m in teacher.modules()] == flags
    assert all(p.grad is None for p in teacher.parameters())
    assert all(p.grad is not None for p in student.parameters())
    assert all(torch.equal(v, before[k]) for k, v in teacher.state_dict().items())
    for model in (student, teacher):
        assert sum(len(m._forward_hooks) for m in model.modules()) == 0
    # Two calls give the same teacher term: dropout was off (eval) in the teacher.
    assert torch.equal(dist(lr, hr)[1]["out"], dist(lr, hr)[1]["out"])


def test_select_pair_uses_different_outputs(models):
    student, teacher = models
    lr, hr = batch()
    a = Distiller(student, teacher, TAPS, w_aff=1.0, select=0)(lr, hr)[1]["aff"]
    b = Distiller(student, teacher, TAPS, w_aff=1.0, select=(0, 1))(lr, hr)[1]["aff"]
    assert not torch.equal(a, b)


def test_warmup_and_unused_terms(models):
    student, teacher = models
    lr, hr = batch()
    dist = Distiller(student, teacher, TAPS, w_rec=0.0, w_out=0.0, w_aff=4.0,
                     aff_warmup_steps=10, select=0)
    assert [dist.aff_weight(s) for s in (0, 5, 10, 50)] == [0.0, 2.0, 4.0, 4.0]
    total, parts, _ = dist(lr, None, step=5)
    torch.testing.assert_close(total.detach(), 2.0 * parts["aff"])
    assert parts["rec"] == 0
    with pytest.raises(ValueError, match="step"):
        dist(lr, hr)
    # No affinity and no output term: the teacher is not run at all.
    calls = []
    handle = teacher.register_forward_hook(lambda *a: calls.append(1))
    total, parts, sr = Distiller(student, teacher, w_rec=1.0, w_out=0.0)(lr, hr)
    handle.remove()
    assert calls == [] and parts["out"] == 0 and parts["aff"] == 0
    torch.testing.assert_close(total, F.l1_loss(sr, hr))


def test_training_lora_student_lowers_the_loss(models):
    _, teacher = models
    torch.manual_seed(2)
    student = SR(8).eval()  # dropout off so the loss curve is deterministic
    student.load_state_dict(teacher.state_dict())
    with torch.no_grad():
        for p in student.parameters():
            p.add_(0.1 * torch.randn_like(p))  # a perturbed copy: the adapters must fix it
    convlora.inject(student, rank=2)
    dist = Distiller(student, teacher, {"b1": "b1", "b2.conv": "b2.conv"}, w_rec=0.0,
                     w_out=1.0, w_aff=1.0, select=0)  # tensor outputs pass through
    opt = torch.optim.Adam(convlora.lora_parameters(student), lr=1e-2)
    lr, hr = batch()
    losses = []
    for _ in range(15):
        total, _, _ = dist(lr, hr)
        opt.zero_grad()
        total.backward()
        opt.step()
        losses.append(total.item())
    assert losses[-1] < 0.7 * losses[0]


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"taps": None, "w_aff": 1.0}, "needs taps"),
        ({"taps": {"b9": "b1"}}, "b9"),
        ({"taps": {"b1": "nope"}}, "nope"),
        ({"w_rec": -1.0}, "w_rec"),
        ({"p": 3}, "p=3"),
        ({"tap_weights": [1.0]}, "one weight per tap"),
        ({"tap_weights": {"zz": 1.0}}, "zz"),
        ({"aff_warmup_steps": -1}, "aff_warmup_steps"),
        ({"pixel": "l2"}, "pixel='l2' is not a known pixel loss"),
    ],
)
def test_constructor_errors(models, kwargs, match):
    student, teacher = models
    kwargs = {"taps": TAPS, **kwargs}
    with pytest.raises(ValueError, match=match):
        Distiller(student, teacher, **kwargs)


def test_call_errors(models):
    student, teacher = models
    lr, hr = batch()
    with pytest.raises(ValueError, match="hr is None"):
        Distiller(student, teacher)(lr, None)
    # Tapping layers of different resolution: the error names the tap.
    with pytest.raises(ValueError, match="'head' -> 'tail'"):
        Distiller(student, teacher, {"head": "tail"}, w_aff=1.0)(lr, hr)
