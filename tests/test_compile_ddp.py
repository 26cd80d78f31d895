"""torch.compile (unmerged forward, fullgraph) and DistributedDataParallel with adapters only."""

from __future__ import annotations

import copy
import os
import socket
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import convlora
import convlora.layer
from tests._core_helpers import randomize_adapters


def _model(wide: bool = False) -> nn.Module:
    """Small convs (the weight-space backward); ``wide``: a 128-channel middle conv with DoRA,
    large enough for the activation-space backward of convlora.lowrank_conv."""
    torch.manual_seed(0)
    mid = 128 if wide else 8
    model = nn.Sequential(nn.Conv2d(3, mid, 3, padding=1, padding_mode="reflect"), nn.SiLU(),
                          nn.Conv2d(mid, mid, 3, padding=2, dilation=2, groups=1 if wide else 2),
                          nn.SiLU(), nn.Conv2d(mid, 12, 3, padding=1), nn.PixelShuffle(2))
    convlora.inject(model, rank=2, rank_pattern={"4": 4},
                    method_pattern={"2": "dora"} if wide else None)
    randomize_adapters(model)
    return model


def _check_compiled(backend: str) -> None:
    torch._dynamo.reset()
    model = _model()
    x = torch.randn(2, 3, 12, 12)
    eager_out = model(x)
    eager_out.square().mean().backward()
    eager_grads = [p.grad.clone() for p in convlora.lora_parameters(model)]
    for p in convlora.lora_parameters(model):
        p.grad = None
    compiled = torch.compile(model, backend=backend, fullgraph=True)
    out = compiled(x)
    torch.testing.assert_close(out, eager_out, atol=1e-5, rtol=1e-5)
    out.square().mean().backward()
    for g, p in zip(eager_grads, convlora.lora_parameters(model)):
        torch.testing.assert_close(p.grad, g, atol=1e-5, rtol=1e-4)


def test_compile_fullgraph_aot_eager() -> None:
    _check_compiled("aot_eager")


@pytest.mark.slow
def test_compile_fullgraph_inductor() -> None:
    _check_compiled("inductor")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _ddp_worker(rank: int, world: int, port: int, out: str, wide: bool) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_num_threads(1)
    model = _model(wide)
    ddp = nn.parallel.DistributedDataParallel(model)
    opt = torch.optim.SGD(convlora.lora_parameters(model), lr=0.1)
    gen = torch.Generator().manual_seed(1)
    x, y = torch.randn(4, 3, 8, 8, generator=gen), torch.randn(4, 3, 16, 16, generator=gen)
    shard = slice(rank * 4 // world, (rank + 1) * 4 // world)
    for _ in range(2):
        loss = (ddp(x[shard]) - y[shard]).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    if rank == 0:
        convlora.save_adapter(model, out)
    dist.destroy_process_group()


@pytest.mark.parametrize("wide", [False, True], ids=["weight-space backward", "activation-space backward"])
def test_ddp_adapters_only_matches_single_process(wide: bool, tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    out = str(tmp_path / "ddp.safetensors")
    mp.spawn(_ddp_worker, args=(2, _free_port(), out, wide), nprocs=2, join=True)
    single = _model(wide)
    calls: list[int] = []
    real = convlora.layer.activation_backward_conv
    monkeypatch.setattr(convlora.layer, "activation_backward_conv",
                        lambda *a, **k: calls.append(1) or real(*a, **k))
    opt = torch.optim.SGD(convlora.lora_parameters(single), lr=0.1)
    gen = torch.Generator().manual_seed(1)
    x, y = torch.randn(4, 3, 8, 8, generator=gen), torch.randn(4, 3, 16, 16, generator=gen)
    for _ in range(2):
        loss = (single(x) - y).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert len(calls) == (2 if wide else 0), "the wide model's DoRA conv takes the activation-space path"
    from_ddp = copy.deepcopy(_model(wide))
    convlora.delete_adapter(from_ddp, "default")
    convlora.load_adapter(from_ddp, out)
    for (k, a), (_, b) in zip(convlora.lora_state_dict(single).items(),
                              convlora.lora_state_dict(from_ddp).items()):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5, msg=k)
