"""The same exactness guarantees on CUDA (skipped on machines without a GPU)."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import convlora
from tests._core_helpers import randomize_adapters

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_cuda_merge_equals_unmerged(dtype: torch.dtype) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(8, 16, 3, padding=1, padding_mode="reflect"), nn.SiLU(),
                          nn.Conv2d(16, 16, 3, padding=1, groups=4), nn.SiLU(),
                          nn.Conv2d(16, 12, 3, padding=1), nn.PixelShuffle(2))
    base = copy.deepcopy(model).cuda().to(dtype)
    convlora.inject(model, rank=4)
    randomize_adapters(model, std=0.05)
    model = model.cuda().to(dtype)
    x = torch.randn(2, 8, 32, 32, device="cuda", dtype=dtype)
    y = model(x)
    w0 = [m.weight.detach().clone() for m in convlora.lora_layers(model).values()]
    with convlora.merged(model):
        assert torch.equal(model(x), y)
    for w, m in zip(w0, convlora.lora_layers(model).values()):
        assert torch.equal(m.weight, w)
    with convlora.disabled(model):
        assert torch.equal(model(x), base(x))
    torch.backends.cudnn.deterministic = True
    deployed = convlora.unload(model)
    assert torch.allclose(deployed(x).float(), y.float(), atol=1e-2 if dtype != torch.float32 else 1e-5)


def test_cuda_compile_fullgraph_matches_eager() -> None:
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.SiLU(), nn.Conv2d(16, 12, 3, padding=1),
                          nn.PixelShuffle(2))
    convlora.inject(model, rank=4)
    randomize_adapters(model)
    model = model.cuda()
    x = torch.randn(2, 3, 16, 16, device="cuda")
    ref = model(x)
    out = torch.compile(model, fullgraph=True)(x)
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("method", ["lora", "dora", "loha", "lokr"])
def test_cuda_activation_space_backward_same_forward_and_gradients(method: str) -> None:
    """On a conv large enough for convlora.lowrank_conv: merged forward bits and the weight-space
    backward's gradients (float64, so the two orders of summation agree closely)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(128, 128, 3, padding=1, padding_mode="reflect")).double()
    convlora.inject(model, rank=4, method=method)
    randomize_adapters(model, std=0.05)
    if method == "dora":
        with torch.no_grad():
            model[0].lora_magnitude["default"][3] = 0.0  # the zero-magnitude fallback too
    model = model.cuda()
    twin = copy.deepcopy(model)
    twin[0]._activation_backward_forward = lambda x, name: None  # the weight-space backward
    x = torch.randn(2, 128, 8, 8, device="cuda", dtype=torch.float64, requires_grad=True)
    x_twin = x.detach().clone().requires_grad_(True)
    y = model(x)
    probe = torch.randn_like(y)
    (y * probe).sum().backward()
    (twin(x_twin) * probe).sum().backward()
    with torch.no_grad(), convlora.merged(model):
        assert torch.equal(model(x), y)
    torch.testing.assert_close(x.grad, x_twin.grad, rtol=1e-9, atol=1e-11)
    for (name, p), q in zip(model[0].factors("default").items(), twin[0].factors("default").values()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-9, atol=1e-11, msg=name)
