"""DoRA, LoHa and LoKr compute what PEFT computes, and stay exact where PEFT does not.

For the same factor values -- random and non-zero in every factor, the DoRA magnitude away from
``||W||`` -- convlora's outputs and gradients equal PEFT's (float64) on the configurations where
PEFT is correct (zero padding, dilation 1, groups 1). On reflect/circular padding and dilation
PEFT's unmerged output differs from its own merged model (or it fails), while convlora's merged
and unmerged outputs are equal bit for bit.
"""

from __future__ import annotations

import copy
import math
import warnings

import pytest
import torch
from torch import nn

import convlora
from convlora.lokr import kron_split
from convlora.methods import tucker_applies
from tests._method_refs import reference_weight

peft = pytest.importorskip("peft")

_PEFT_NAMES = {  # convlora factor -> PEFT parameter (under base_model.model.<layer>.)
    "lora_A": "lora_A.default.weight", "lora_B": "lora_B.default.weight",
    "lora_magnitude": "lora_magnitude_vector.default.weight",
}


def _peft_config(method: str, rank: int, alpha: float, rslora: bool, tucker: bool = False):
    if method == "dora":
        return peft.LoraConfig(r=rank, lora_alpha=alpha, target_modules=["0"], use_dora=True,
                               use_rslora=rslora)
    if method == "loha":
        return peft.LoHaConfig(r=rank, alpha=alpha, target_modules=["0"], use_effective_conv2d=tucker)
    return peft.LoKrConfig(r=rank, alpha=alpha, target_modules=["0"], use_effective_conv2d=tucker)


def _pair(base: nn.Module, method: str, rank: int, alpha: float, rslora: bool = False,
          seed: int = 0, tucker: bool = False) -> tuple[nn.Module, nn.Module]:
    """convlora and PEFT models with the same random non-zero factor values."""
    ours = copy.deepcopy(base)
    convlora.inject(ours, rank=rank, alpha=alpha, targets="0", method=method, rslora=rslora,
                    tucker=tucker)
    gen = torch.Generator().manual_seed(seed)
    layer = ours[0]
    with torch.no_grad():
        for name, p in layer.factors("default").items():
            p.copy_(torch.randn(p.shape, generator=gen, dtype=p.dtype) * 0.3)
            if name == "lora_magnitude":  # away from ||W||, positive
                p.copy_(layer.weight.flatten(1).norm(dim=1) * (1.5 + torch.rand(p.shape, generator=gen,
                                                                                 dtype=p.dtype)))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.get_peft_model(copy.deepcopy(base), _peft_config(method, rank, alpha, rslora, tucker))
    params = dict(theirs.named_parameters())
    adapter = {k for k in params if k.endswith(".default") or ".default." in k}
    assert len(adapter) == len(layer.factors("default")), f"PEFT has other factors: {sorted(adapter)}"
    with torch.no_grad():
        for name, p in layer.factors("default").items():
            key = f"base_model.model.0.{_PEFT_NAMES.get(name, name + '.default')}"
            assert key in params, f"PEFT has no {key}; it has {sorted(params)}"
            params[key].copy_(p.reshape(params[key].shape))
    return ours, theirs


def _grads(model: nn.Module, x: torch.Tensor, probe: torch.Tensor) -> tuple[torch.Tensor, dict]:
    x = x.clone().requires_grad_(True)
    y = model(x)
    (y * probe).sum().backward()
    grads = {n.rpartition(".default")[0].rpartition(".")[2] if "lora_" in n else n: p.grad
             for n, p in model.named_parameters() if p.requires_grad}
    return torch.cat([y.flatten(), x.grad.flatten()]), grads


CASES = {
    "conv2d": (lambda: nn.Conv2d(8, 16, 3, padding=1, stride=2), (2, 8, 9, 9)),
    "conv2d_1x1": (lambda: nn.Conv2d(12, 6, 1), (2, 12, 5, 5)),
    "conv1d": (lambda: nn.Conv1d(16, 12, 5, padding=2), (2, 16, 11)),
    "linear": (lambda: nn.Linear(18, 20), (3, 18)),
}


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("method,rank,rslora", [("dora", 3, False), ("dora", 2, True), ("loha", 3, False),
                                                ("lokr", 1, False), ("lokr", 4, False)])
def test_outputs_and_gradients_match_peft(case: str, method: str, rank: int, rslora: bool) -> None:
    make, shape = CASES[case]
    torch.manual_seed(1)
    base = nn.Sequential(make()).double()
    if method == "lokr" and case == "conv1d" and rank >= 4:
        pytest.skip("PEFT's full-W2 Conv1d LoKr krons a 2-D W1 with a 3-D W2 (another layout)")
    # alpha / rank = 1.5 is exact in float32: PEFT's LoHa holds its scale as a float32 tensor
    ours, theirs = _pair(base, method, rank, 1.5 * rank, rslora)
    x = torch.randn(*shape, dtype=torch.float64)
    probe = torch.randn_like(ours(x))
    out_ours, g_ours = _grads(ours, x, probe)
    out_theirs, g_theirs = _grads(theirs, x, probe)
    torch.testing.assert_close(out_ours, out_theirs, rtol=1e-10, atol=1e-10)
    layer = ours[0]
    for name, p in layer.factors("default").items():
        peft_key = f"base_model.model.0.{_PEFT_NAMES.get(name, name + '.default')}"
        theirs_grad = dict(theirs.named_parameters())[peft_key].grad
        torch.testing.assert_close(p.grad, theirs_grad.reshape(p.grad.shape), rtol=1e-9, atol=1e-10,
                                   msg=f"gradient of {name}")
    assert g_ours and g_theirs


TUCKER_CASES = {
    **CASES,
    "conv2d_3x1": (lambda: nn.Conv2d(6, 8, (3, 1), padding=(1, 0)), (2, 6, 7, 5)),
    "conv2d_wide": (lambda: nn.Conv2d(32, 64, 3, padding=1), (1, 32, 6, 6)),
}


@pytest.mark.parametrize("case", sorted(TUCKER_CASES))
@pytest.mark.parametrize("method,rank", [("loha", 3), ("lokr", 1), ("lokr", 3), ("lokr", 8)])
def test_tucker_outputs_and_gradients_match_peft_use_effective_conv2d(case: str, method: str,
                                                                      rank: int) -> None:
    """``tucker=True`` is PEFT's ``use_effective_conv2d=True``: same factors (names, shapes up to
    PEFT's trailing 1 on a Conv1d core), same outputs and gradients; ignored where PEFT ignores it
    (Linear, 1x1 kernels, a full LoKr W2), so there the factors are the flattened ones."""
    make, shape = TUCKER_CASES[case]
    torch.manual_seed(4)
    base = nn.Sequential(make()).double()
    ours, theirs = _pair(base, method, rank, 1.5 * rank, seed=5, tucker=True)
    layer = ours[0]
    w = tuple(layer.weight.shape)
    if len(w) == 3 and "lokr_w2" in layer.factors("default"):
        pytest.skip("PEFT's full-W2 Conv1d LoKr krons a 2-D W1 with a 3-D W2 (another layout)")
    assert layer.tucker["default"] == tucker_applies(method, w, rank)
    assert layer.tucker["default"] == (len(w) > 2 and math.prod(w[2:]) > 1
                                       and (method == "loha" or "lokr_w2" not in layer.factors("default")))
    x = torch.randn(*shape, dtype=torch.float64)
    probe = torch.randn_like(ours(x))
    out_ours, _ = _grads(ours, x, probe)
    if method == "lokr" and layer.tucker["default"] and (len(w) == 3 or w[-1] == 1):
        # PEFT's Tucker LoKr fails in its forward when the core's last axis is 1 (a Conv1d, whose
        # core PEFT stores as r x r x k x 1, or a k x 1 kernel): torch.kron cannot view its
        # einsum-built W2. convlora's: the conv grid of tests/test_methods.py.
        with pytest.raises(RuntimeError, match="view size is not compatible"):
            theirs(x)
        return
    out_theirs, _ = _grads(theirs, x, probe)
    torch.testing.assert_close(out_ours, out_theirs, rtol=1e-10, atol=1e-10)
    params = dict(theirs.named_parameters())
    # PEFT 0.21.2's Tucker LoHa backward (HadaWeightCP, from LyCORIS) contracts the gradient of
    # hada_w1_a with the *second* product's core and factor (and hada_w2_a's with the first's):
    # those two gradients are wrong there. convlora's are autograd through the same forward.
    peft_wrong = {"hada_w1_a", "hada_w2_a"} if method == "loha" and layer.tucker["default"] else set()
    for name, p in layer.factors("default").items():
        theirs_grad = params[f"base_model.model.0.{name}.default"].grad.reshape(p.grad.shape)
        if name in peft_wrong:
            assert not torch.allclose(p.grad, theirs_grad, rtol=1e-3), f"PEFT's {name} gradient is right now"
            continue
        torch.testing.assert_close(p.grad, theirs_grad, rtol=1e-9, atol=1e-10, msg=f"gradient of {name}")
    if peft_wrong:  # those two against autograd through the formula (PEFT's forward, equal above)
        factors = {k: v.detach().clone().requires_grad_(True) for k, v in layer.factors("default").items()}
        w_eff = reference_weight(method, base[0].weight.detach(), factors, layer.scale("default"))
        y_ref = torch.func.functional_call(base[0], {"weight": w_eff, "bias": base[0].bias}, (x,))
        (y_ref * probe).sum().backward()
        for name in sorted(peft_wrong):
            torch.testing.assert_close(layer.factors("default")[name].grad, factors[name].grad,
                                       rtol=1e-9, atol=1e-10, msg=f"gradient of {name}")
    with torch.no_grad():
        y = ours(x)
        convlora.merge(ours)
        assert torch.equal(ours(x), y)
        torch.testing.assert_close(theirs.merge_and_unload()(x), y, rtol=1e-10, atol=1e-10)


def test_lokr_split_matches_peft_factorization() -> None:
    from peft.tuners.lokr.layer import factorization

    for n in list(range(1, 130)) + [192, 256, 320, 384, 512, 640, 768, 1000, 1024]:
        assert kron_split(n) == factorization(n, -1), n


def _peft_error_or_gap(theirs: nn.Module, x: torch.Tensor) -> float:
    """PEFT's max |unmerged - merged| (``inf`` when its forward fails)."""
    try:
        with torch.no_grad():
            y = theirs(x)
            merged = theirs.merge_and_unload()(x)
    except (RuntimeError, ValueError):
        return math.inf
    return float((y - merged).abs().max())


WRONG_FOR_PEFT = {
    "reflect": lambda: nn.Conv2d(6, 8, 3, padding=1, padding_mode="reflect"),
    "circular": lambda: nn.Conv2d(6, 8, 3, padding=2, padding_mode="circular", dilation=2),
    "dilation": lambda: nn.Conv2d(6, 8, 3, padding=2, dilation=2),
}


@pytest.mark.parametrize("case", sorted(WRONG_FOR_PEFT))
@pytest.mark.parametrize("method", ["dora", "loha", "lokr"])
def test_convlora_exact_where_peft_is_not(case: str, method: str) -> None:
    torch.manual_seed(2)
    base = nn.Sequential(WRONG_FOR_PEFT[case]()).double()
    ours, theirs = _pair(base, method, 2, 2.0)
    x = torch.randn(2, 6, 9, 9, dtype=torch.float64)
    gap = _peft_error_or_gap(theirs, x)
    with torch.no_grad():
        y = ours(x)
        convlora.merge(ours)
        assert torch.equal(ours(x), y), "convlora: merged must equal unmerged"
    if case == "dilation" and method != "dora":
        # PEFT's LoHa/LoKr pass the base conv's dilation to their delta conv: correct here
        assert gap < 1e-10
    else:
        assert gap > 1e-3, f"PEFT {method} on {case}: expected a wrong or failing forward, gap {gap}"
