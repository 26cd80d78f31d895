"""Precision: deltas are computed in at least the weight's precision, in every dtype.

Over random conv configurations (the grid of test_layer) and fp16/bf16/fp32/fp64, for every
method (drawn with the configuration): a fresh adapter changes neither the output nor, after
merge or unload, any weight (DoRA in fp16/bf16: within the rounding of its magnitude, stored in
the weight's dtype); a trained adapter's merged weight matches a float64 reference of the
method's formula to the weight's own precision.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import convlora
from convlora.dora import channel_norm
from convlora.functional import delta_weight, merged_weight
from tests._core_helpers import randomize_adapters
from tests._method_refs import reference_weight
from tests.test_layer import build, conv_configs, pick_factorization_and_rank

pytestmark = pytest.mark.usefixtures("one_thread")

SETTINGS = settings(max_examples=15, deadline=None, derandomize=True,
                    suppress_health_check=[HealthCheck.too_slow])
DTYPES = [torch.float16, torch.bfloat16, torch.float32, torch.float64]
METHODS = ["lora", "dora", "loha", "lokr", "loha+tucker", "lokr+tucker"]  # Tucker where it applies


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
@given(cfg=conv_configs(), method=st.sampled_from(METHODS))
def test_a_fresh_adapter_changes_nothing_in_any_dtype(cfg: dict, dtype: torch.dtype, method: str) -> None:
    model, x = _build(cfg, dtype)
    weight = model[0].weight.detach().clone()
    try:
        with torch.no_grad():
            y0 = model(x)
    except RuntimeError:  # configuration invalid for this input (e.g. kernel larger than it)
        return
    method, tucker = method.removesuffix("+tucker"), method.endswith("+tucker")
    fac, rank = pick_factorization_and_rank(model[0].weight, cfg, method)
    convlora.inject(model, rank=rank, factorization=fac, method=method, tucker=tucker)
    if method == "dora" and dtype in (torch.float16, torch.bfloat16):
        # m = ||W|| is stored in the weight's dtype: m / ||W|| is 1 within its rounding (one ulp)
        tol = torch.finfo(dtype).eps
        with torch.no_grad():
            torch.testing.assert_close(model[0].effective_weight("default"), weight, rtol=tol, atol=0)
        return
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
@given(cfg=conv_configs(), method=st.sampled_from(METHODS))
def test_merged_weight_is_as_precise_as_the_weight(cfg: dict, dtype: torch.dtype, method: str) -> None:
    model, _ = _build(cfg, dtype)
    weight = model[0].weight.detach().clone()
    method, tucker = method.removesuffix("+tucker"), method.endswith("+tucker")
    fac, rank = pick_factorization_and_rank(weight, cfg, method)
    convlora.inject(model, rank=rank, factorization=fac, alpha=1.5 * rank, method=method, tucker=tucker)
    randomize_adapters(model, cfg["seed"])
    layer = convlora.lora_layers(model)["0"]
    if method == "dora":  # the magnitude near ||W|| (randomize_adapters drew it around 0)
        with torch.no_grad():
            m = layer.lora_magnitude["default"]
            m.copy_(channel_norm(weight.to(m.dtype)) * (1 + m.abs()))
    factors = {k: v.detach() for k, v in layer.factors("default").items()}
    scale = layer.scale("default")
    reference = reference_weight(method, weight, factors, scale)
    with torch.no_grad():
        convlora.merge(model)
    # The merged weight is the float64 reference rounded once to the weight's dtype, plus the
    # round-off of computing it in the compute dtype (at least float32): a few ulps of the terms,
    # the terms being the formula evaluated on absolute values (no cancellation).
    compute = torch.promote_types(dtype, torch.float32)
    eps = torch.finfo(compute).eps
    absolute = {k: v.abs() for k, v in factors.items()}
    if method == "dora":  # V = W + s*B@A as LoRA, then m / ||V|| per output channel (n terms each)
        v = reference_weight("lora", weight, factors, scale).reshape(weight.shape[0], -1)
        ratio = (factors["lora_magnitude"].double() / v.norm(dim=1)).abs()
        ratio = ratio.reshape(-1, *[1] * (weight.dim() - 1))
        v_terms = reference_weight("lora", weight.abs(), absolute, scale)
        round_off = eps * ((rank + 2) * ratio * v_terms + (v.shape[1] + 4) * reference.abs())
    else:
        terms = reference_weight(method, weight.abs(), absolute, scale, layer.groups, layer.transposed)
        round_off = (rank * rank + 3) * eps * terms
    bound = torch.finfo(dtype).eps * reference.abs() + round_off
    err = (layer.weight.double() - reference).abs()
    assert torch.all(err <= bound), float((err / bound.clamp_min(1e-300)).max())
    if method == "lora":
        a, b = factors["lora_A"], factors["lora_B"]
        assert delta_weight(a, b, weight.shape, 1.0).dtype == torch.promote_types(dtype, torch.float32)
        assert merged_weight(weight, a, b, 1.0).dtype == dtype


def test_compute_dtype_is_at_least_float32_and_the_widest_input() -> None:
    from convlora.functional import compute_dtype

    half, f64 = torch.zeros(1, dtype=torch.float16), torch.zeros(1, dtype=torch.float64)
    assert compute_dtype(half) == torch.float32
    assert compute_dtype(half, f64) == torch.float64
    assert compute_dtype() == torch.float32
