"""Precision: deltas are computed in at least the weight's precision, in every dtype.

Over random conv configurations (the grid of test_layer) and fp16/bf16/fp32/fp64: a fresh adapter
changes neither the output nor, after merge or unload, any weight; a trained adapter's merged
weight matches a float64 reference to the weight's own precision.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings

import convlora
from convlora.functional import delta_weight, merged_weight
from tests._core_helpers import randomize_adapters
from tests.test_layer import build, conv_configs, pick_factorization_and_rank

pytestmark = pytest.mark.usefixtures("one_thread")

SETTINGS = settings(max_examples=15, deadline=None, derandomize=True,
                    suppress_health_check=[HealthCheck.too_slow])
DTYPES = [torch.float16, torch.bfloat16, torch.float32, torch.float64]


def _build(cfg: dict, dtype: torch.dtype) -> tuple[torch.nn.Module, torch.Tensor]:
    """test_layer's model and input, with weights and input drawn in ``dtype``'s own precision
    (a float32 model cast to float64 would hold only float32-representable values)."""
    model, x = build({**cfg, "dtype": dtype})
    gen = torch.Generator().manual_seed(cfg["seed"])
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen, dtype=torch.float64) * 0.3)
    return model, torch.randn(x.shape, generator=gen, dtype=torch.float64).to(dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).removeprefix("torch."))
@SETTINGS
@given(cfg=conv_configs())
def test_a_fresh_adapter_changes_nothing_in_any_dtype(cfg: dict, dtype: torch.dtype) -> None:
    model, x = _build(cfg, dtype)
    weight = model[0].weight.detach().clone()
    try:
        with torch.no_grad():
            y0 = model(x)
    except RuntimeError:  # configuration invalid for this input (e.g. kernel larger than it)
        return
    fac, rank = pick_factorization_and_rank(model[0].weight, cfg)
    convlora.inject(model, rank=rank, factorization=fac)
    with torch.no_grad():
        assert torch.equal(model(x), y0), "a fresh adapter must not change the output"
        convlora.merge(model)
        assert torch.equal(model[0].weight, weight), "merging a fresh adapter must not move the weight"
        assert torch.equal(model(x), y0)
        convlora.unmerge(model)
    plain = convlora.unload(model, merge=True)
    assert torch.equal(plain[0].weight, weight), "unload of a fresh adapter must not move the weight"


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).removeprefix("torch."))
@SETTINGS
@given(cfg=conv_configs())
def test_merged_weight_is_as_precise_as_the_weight(cfg: dict, dtype: torch.dtype) -> None:
    model, _ = _build(cfg, dtype)
    weight = model[0].weight.detach().clone()
    fac, rank = pick_factorization_and_rank(weight, cfg)
    convlora.inject(model, rank=rank, factorization=fac, alpha=1.5 * rank)
    randomize_adapters(model, cfg["seed"])
    layer = convlora.lora_layers(model)["0"]
    a, b = layer.lora_A["default"], layer.lora_B["default"]
    reference = weight.double() + 1.5 * (b.double() @ a.double()).reshape(weight.shape)
    with torch.no_grad():
        convlora.merge(model)
    # The merged weight is the float64 reference rounded once to the weight's dtype, plus the
    # round-off of summing it in the compute dtype (at least float32): a few ulps of the terms.
    compute = torch.promote_types(dtype, torch.float32)
    terms = weight.double().abs() + 1.5 * (b.double().abs() @ a.double().abs()).reshape(weight.shape)
    bound = torch.finfo(dtype).eps * reference.abs() + (a.shape[0] + 2) * torch.finfo(compute).eps * terms
    err = (layer.weight.double() - reference).abs()
    assert torch.all(err <= bound), float((err / bound.clamp_min(1e-300)).max())
    assert delta_weight(a, b, weight.shape, 1.0).dtype == torch.promote_types(dtype, torch.float32)
    assert merged_weight(weight, a, b, 1.0).dtype == dtype


def test_compute_dtype_is_at_least_float32_and_the_widest_input() -> None:
    from convlora.functional import compute_dtype

    half, f64 = torch.zeros(1, dtype=torch.float16), torch.zeros(1, dtype=torch.float64)
    assert compute_dtype(half) == torch.float32
    assert compute_dtype(half, f64) == torch.float64
    assert compute_dtype() == torch.float32
