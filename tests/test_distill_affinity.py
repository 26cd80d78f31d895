"""affinity_loss against the naive N x N formula: values, gradients, dtypes, memory bound."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from convlora.distill import affinity_loss, spatial_affinity

EPS = 1e-7
TOL64 = {"rtol": 1e-9, "atol": 1e-13}  # fp64 in, fp64 reference: only summation order differs
TOL32 = {"rtol": 2e-4, "atol": 1e-7}  # fp32 in, fp64 reference


def naive_loss(s: torch.Tensor, t: torch.Tensor, p: int) -> torch.Tensor:
    """The FAKD reference: full affinity matrices, then mean |A_s - A_t|^p."""

    def aff(f: torch.Tensor) -> torch.Tensor:
        f = f.flatten(2)
        f = f / (torch.linalg.vector_norm(f, dim=1, keepdim=True) + EPS)
        return torch.einsum("bci,bcj->bij", f, f)

    return ((aff(s) - aff(t)).abs() ** p).mean()


def value_and_grads(fn, s, t):
    s = s.detach().clone().requires_grad_(True)
    t = t.detach().clone().requires_grad_(True)
    loss = fn(s, t)
    loss.backward()
    return loss.detach(), s.grad, t.grad


SHAPES = [  # (B, Cs, Ct, H, W)
    (1, 4, 4, 5, 5),
    (3, 5, 2, 7, 9),  # channel mismatch, non-square, batch > 1
    (2, 3, 8, 6, 11),
    (2, 1, 1, 4, 4),  # single channel: affinities are all +-1
]


@pytest.mark.parametrize("p", [1, 2])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("block_size", [1, 7, None, 1000])
def test_matches_naive_fp64(p, shape, block_size):
    b, cs, ct, h, w = shape
    gen = torch.Generator().manual_seed(hash((p, shape, block_size)) % 2**31)
    s = torch.randn(b, cs, h, w, generator=gen, dtype=torch.float64)
    t = torch.randn(b, ct, h, w, generator=gen, dtype=torch.float64)
    got = value_and_grads(lambda a, c: affinity_loss(a, c, p=p, block_size=block_size), s, t)
    ref = value_and_grads(lambda a, c: naive_loss(a, c, p), s, t)
    assert got[0].dtype == torch.float64
    for g, r in zip(got, ref):
        torch.testing.assert_close(g, r, **TOL64)
    assert ref[1].abs().max() > 0  # the gradients compared are not trivially zero


@pytest.mark.parametrize("p", [1, 2])
def test_fp32_and_flat_input(p):
    gen = torch.Generator().manual_seed(1)
    s = torch.randn(2, 6, 9, 8, generator=gen)
    t = torch.randn(2, 10, 9, 8, generator=gen)
    got = value_and_grads(lambda a, c: affinity_loss(a.flatten(2), c.flatten(2), p=p), s, t)
    ref = value_and_grads(lambda a, c: naive_loss(a.double(), c.double(), p), s, t)
    assert got[0].dtype == torch.float32
    for g, r in zip(got, ref):
        torch.testing.assert_close(g, r.float(), **TOL32)


def test_fp32_value_accurate_on_larger_map():
    """4M affinity entries: the fp32 sum must not drift (a single fp32 reduction did, by 1e-3)."""
    gen = torch.Generator().manual_seed(8)
    s = torch.randn(4, 8, 32, 32, generator=gen).relu()
    t = s + 0.1 * torch.randn(s.shape, generator=gen)
    ref = naive_loss(s.double(), t.double(), 1)
    for block in (None, 100):
        torch.testing.assert_close(affinity_loss(s, t, block_size=block), ref.float(),
                                   rtol=1e-6, atol=0)


@pytest.mark.parametrize("p", [1, 2])
def test_zero_vectors_give_no_nan(p):
    gen = torch.Generator().manual_seed(2)
    s = torch.randn(2, 4, 6, 6, generator=gen, dtype=torch.float64)
    t = torch.randn(2, 3, 6, 6, generator=gen, dtype=torch.float64)
    s[:, :, 1, 2] = 0  # ReLU features can vanish at a position
    s[1, :, 4] = 0
    t[:, :, 0, 0] = 0
    got = value_and_grads(lambda a, c: affinity_loss(a, c, p=p, block_size=5), s, t)
    ref = value_and_grads(lambda a, c: naive_loss(a, c, p), s, t)
    for g, r in zip(got, ref):
        assert torch.isfinite(g).all()
        torch.testing.assert_close(g, r, **TOL64)
    # A zero vector has zero affinity with everything, including itself.
    assert spatial_affinity(s)[0, 8].abs().max() == 0


@pytest.mark.parametrize("p", [1, 2])
def test_bf16_inputs_accumulate_in_fp32(p):
    gen = torch.Generator().manual_seed(3)
    s = torch.randn(2, 8, 8, 8, generator=gen).bfloat16()
    t = torch.randn(2, 5, 8, 8, generator=gen).bfloat16()
    got = value_and_grads(lambda a, c: affinity_loss(a, c, p=p), s, t)
    # Reference on the same bf16 values, computed exactly in fp64.
    ref = value_and_grads(lambda a, c: naive_loss(a.double(), c.double(), p), s, t)
    assert got[0].dtype == torch.float32
    torch.testing.assert_close(got[0], ref[0].float(), rtol=1e-5, atol=1e-7)
    for g, r in zip(got[1:], ref[1:]):
        assert g.dtype == torch.bfloat16  # autograd returns grads in the input dtype
        torch.testing.assert_close(g.float(), r.float(), rtol=2e-2, atol=1e-5)


def test_p2_close_teacher_keeps_precision():
    """The Gram terms are O(N²) and cancel; the loss here is ~1e-7 of them."""
    gen = torch.Generator().manual_seed(4)
    s = torch.randn(2, 16, 32, 32, generator=gen).relu()
    t = s + 1e-3 * torch.randn(s.shape, generator=gen)
    got = value_and_grads(lambda a, c: affinity_loss(a, c, p=2), s, t)
    ref = value_and_grads(lambda a, c: naive_loss(a.double(), c.double(), 2), s, t)
    assert 0 < ref[0] < 1e-5
    torch.testing.assert_close(got[0], ref[0].float(), rtol=1e-4, atol=0)
    for g, r in zip(got[1:], ref[1:]):
        torch.testing.assert_close(g, r.float(), rtol=1e-3, atol=1e-3 * r.abs().max().item())


def test_pool_equals_naive_on_pooled_maps():
    gen = torch.Generator().manual_seed(5)
    s = torch.randn(2, 4, 8, 12, generator=gen, dtype=torch.float64)
    t = torch.randn(2, 6, 8, 12, generator=gen, dtype=torch.float64)
    for p in (1, 2):
        got = affinity_loss(s, t, p=p, pool=2)
        ref = naive_loss(F.avg_pool2d(s, 2), F.avg_pool2d(t, 2), p)
        torch.testing.assert_close(got, ref, **TOL64)
    assert spatial_affinity(s, pool=4).shape == (2, 6, 6)


def test_teacher_without_grad_and_identical_inputs():
    gen = torch.Generator().manual_seed(6)
    s = torch.randn(2, 4, 5, 5, generator=gen, dtype=torch.float64, requires_grad=True)
    t = torch.randn(2, 7, 5, 5, generator=gen, dtype=torch.float64)
    affinity_loss(s, t, block_size=3).backward()
    s_ref = s.detach().clone().requires_grad_(True)
    naive_loss(s_ref, t, 1).backward()
    torch.testing.assert_close(s.grad, s_ref.grad, **TOL64)
    # A map compared with itself scaled per position (same directions) has zero loss
    # up to the eps in the norm.
    scale = torch.rand(2, 1, 5, 5, generator=gen, dtype=torch.float64) + 0.5
    for p in (1, 2):
        assert affinity_loss(s.detach(), s.detach() * scale, p=p).abs() < 1e-6
        assert affinity_loss(s.detach(), -s.detach(), p=p).abs() < 1e-14  # sign-invariant


def test_autocast_is_disabled_inside_and_flags_restored():
    gen = torch.Generator().manual_seed(7)
    s = torch.randn(2, 8, 6, 6, generator=gen)
    t = torch.randn(2, 8, 6, 6, generator=gen)
    before = torch.backends.cuda.matmul.fp32_precision
    plain = [affinity_loss(s, t, p=p) for p in (1, 2)]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        under = [affinity_loss(s, t, p=p) for p in (1, 2)]
    assert torch.backends.cuda.matmul.fp32_precision == before
    for a, b in zip(plain, under):
        assert b.dtype == torch.float32
        torch.testing.assert_close(a, b, rtol=1e-6, atol=0)


class _LargestOutput(TorchDispatchMode):
    """Records the largest tensor any aten op produces."""

    def __init__(self) -> None:
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for o in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(o, torch.Tensor):
                self.largest = max(self.largest, o.numel())
        return out


def test_p1_memory_is_bounded_by_block():
    b, c, n_side, block = 2, 3, 16, 8
    n = n_side * n_side
    s = torch.randn(b, c, n_side, n_side, requires_grad=True)
    t = torch.randn(b, c + 2, n_side, n_side, requires_grad=True)
    with _LargestOutput() as spy:
        affinity_loss(s, t, p=1, block_size=block).backward()
    assert spy.largest <= b * block * n  # one block, never b * n * n
    with _LargestOutput() as spy:
        affinity_loss(s, t, p=2).backward()
    assert spy.largest <= b * (2 * c + 2) * n
    with _LargestOutput() as spy:
        naive_loss(s, t, 1).backward()
    assert spy.largest == b * n * n  # the spy does see N x N matrices


@pytest.mark.parametrize(
    ("kwargs", "shapes", "match"),
    [
        ({}, ((2, 3, 4, 4), (2, 3, 4, 5)), "same batch size and number of spatial"),
        ({}, ((2, 3, 4, 4), (3, 3, 4, 4)), "same batch size"),
        ({"p": 3}, ((1, 3, 4, 4), (1, 3, 4, 4)), "p=3"),
        ({"block_size": 0}, ((1, 3, 4, 4), (1, 3, 4, 4)), "block_size=0"),
        ({"pool": 0}, ((1, 3, 4, 4), (1, 3, 4, 4)), "pool=0"),
        ({"pool": 2}, ((1, 3, 16), (1, 3, 16)), r"needs a \(B, C, H, W\)"),
        ({}, ((3, 16), (3, 16)), "expected"),
    ],
)
def test_errors_are_clear(kwargs, shapes, match):
    s, t = (torch.randn(shape) for shape in shapes)
    with pytest.raises(ValueError, match=match):
        affinity_loss(s, t, **kwargs)


def test_integer_input_is_rejected():
    with pytest.raises(TypeError, match="floating-point"):
        affinity_loss(torch.ones(1, 2, 3, 3, dtype=torch.int64), torch.ones(1, 2, 3, 3))
