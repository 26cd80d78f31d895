"""Geometric self-ensemble (examples/span_sr/ensemble.py): the group average, its equivariance, its refusals."""

from __future__ import annotations

import re

import pytest
import torch

from examples.span_sr.arch import SPAN
from examples.span_sr.ensemble import ENSEMBLE_SIZES, SelfEnsemble


@pytest.fixture
def span() -> SPAN:
    torch.manual_seed(0)
    return SPAN(feature_channels=8, upscale=2).eval()


def _dihedral(x: torch.Tensor) -> list[torch.Tensor]:
    """The eight images of ``x`` under the square's symmetries, written independently of ensemble.py."""
    out = []
    for flip in (False, True):
        y = torch.flip(x, (-1,)) if flip else x
        out.extend(torch.rot90(y, k, (-2, -1)) for k in range(4))
    return out


def test_size_one_is_the_model(span: SPAN) -> None:
    x = torch.rand(2, 3, 9, 7)
    with torch.no_grad():
        assert torch.equal(SelfEnsemble(span, 1)(x), span(x))


def test_size_eight_is_the_mean_over_the_group(span: SPAN) -> None:
    x = torch.rand(1, 3, 10, 7)  # not square: transposed members see 7 x 10
    with torch.no_grad():
        # each member undone by the inverse of the same symmetry: flip then rot k <- rot -k then flip
        members = []
        for i, g in enumerate(_dihedral(x)):
            flip, k = divmod(i, 4)
            y = torch.rot90(span(g), -k, (-2, -1))
            members.append(torch.flip(y, (-1,)) if flip else y)
        expected = torch.stack(members).mean(0)
        got = SelfEnsemble(span, 8)(x)
    assert got.shape == (1, 3, 20, 14)
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-5)


def test_size_eight_is_equivariant(span: SPAN) -> None:
    x = torch.rand(1, 3, 8, 8)
    ens = SelfEnsemble(span, 8)
    with torch.no_grad():
        ref = ens(x)
        for g, gx in zip(_dihedral(ref), _dihedral(x)):
            torch.testing.assert_close(ens(gx), g, atol=1e-6, rtol=1e-5)
        # the plain model is not equivariant, so the check above can fail
        assert (span(torch.rot90(x, 1, (-2, -1))) - torch.rot90(span(x), 1, (-2, -1))).abs().max() > 1e-4


def test_keeps_the_scale_and_names_its_size_in_the_architecture(span: SPAN) -> None:
    ens = SelfEnsemble(span, 4)
    assert ens.upscale == 2
    assert ens.architecture == "x4:SPAN" != SelfEnsemble(span, 8).architecture


@pytest.mark.parametrize("size", [0, 3, 16, True, 8.0])
def test_bad_size_is_refused(span: SPAN, size: object) -> None:
    with pytest.raises(ValueError, match=re.escape(f"size={size!r} is not one of {ENSEMBLE_SIZES}")):
        SelfEnsemble(span, size)  # type: ignore[arg-type]
