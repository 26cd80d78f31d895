"""State across state-dict save/load and model wrappers (torch.compile, DataParallel, DDP).

The state dict of a model with LoRA layers holds the base weights and the factors whatever the
merge state; the property test saves and loads it across every pair of merge states, for every
adapter method (drawn with the rest of the example).
"""

from __future__ import annotations

import copy
import socket

import pytest
import torch
import torch.distributed as dist
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

import convlora
from tests._core_helpers import randomize_adapters

pytestmark = pytest.mark.usefixtures("one_thread")

SETTINGS = settings(max_examples=40, deadline=None, derandomize=True,
                    suppress_health_check=[HealthCheck.too_slow])
METHODS = ["lora", "dora", "loha", "lokr"]


def _model(seed: int, dtype: torch.dtype) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.ReLU(), nn.Conv2d(6, 6, 3, groups=2),
                         nn.Flatten(), nn.LazyLinear(4)).to(dtype)


@SETTINGS
@given(seed=st.integers(0, 2**16), saved_merged=st.booleans(), target_merged=st.booleans(),
       dtype=st.sampled_from([torch.float32, torch.float64, torch.bfloat16]),
       names=st.sampled_from([("default",), ("a", "b")]), method=st.sampled_from(METHODS),
       rslora=st.booleans())
def test_state_dict_loads_right_across_merge_states(seed: int, saved_merged: bool, target_merged: bool,
                                                    dtype: torch.dtype, names: tuple[str, ...], method: str,
                                                    rslora: bool) -> None:
    x = torch.randn(2, 3, 7, 7, generator=torch.Generator().manual_seed(seed)).to(dtype)
    plain = _model(seed, dtype)
    plain(x)  # materialise the lazy layer
    source, target = copy.deepcopy(plain), _model(seed + 1, dtype)
    target(x)
    for model, s in ((source, seed), (target, seed + 7)):
        for name in names:
            convlora.inject(model, rank=2, targets="*", adapter_name=name, method=method, rslora=rslora)
        randomize_adapters(model, s)
    with torch.no_grad():
        expected = source(x)
    base = {n: p.detach().clone() for n, p in source.named_parameters() if ".lora_" not in n}
    if saved_merged:
        convlora.merge(source)
    if target_merged:
        convlora.merge(target)
    sd = source.state_dict()
    target.load_state_dict(sd, strict=True)
    assert convlora.is_merged(target) == target_merged, "a load does not change the merge state"
    atol = {torch.float32: 1e-5, torch.float64: 1e-12, torch.bfloat16: 3e-2}[dtype]
    with torch.no_grad():
        torch.testing.assert_close(target(x), expected, atol=atol, rtol=atol)
        if target_merged:
            convlora.unmerge(target)
        torch.testing.assert_close(target(x), expected, atol=atol, rtol=atol)
    now = dict(target.named_parameters())
    assert all(torch.equal(now[n], w) for n, w in base.items()), "the base weights must load exactly"


@pytest.mark.parametrize("method", METHODS)
def test_state_dict_of_a_merged_model_holds_the_base_weights(method: str) -> None:
    model = _model(0, torch.float32)
    model(torch.randn(1, 3, 7, 7))
    w = model[0].weight.detach().clone()
    convlora.inject(model, rank=2, method=method)
    randomize_adapters(model)
    with convlora.merged(model):
        assert not torch.equal(model[0].weight, w)
        assert torch.equal(model.state_dict()["0.weight"], w)
        assert model.state_dict(keep_vars=True)["0.weight"] is model[0].unmerged_weight


# -- wrappers ---------------------------------------------------------------------------------------
def _convs() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.Conv2d(4, 4, 1))


def test_inject_through_compile_and_data_parallel_uses_the_unwrapped_names() -> None:
    for wrap in (torch.compile, nn.DataParallel, lambda m: torch.compile(nn.DataParallel(m))):
        model = _convs()
        wrapped = wrap(model)
        assert convlora.inject(wrapped, rank=1) == ["0", "1"]
        assert set(convlora.lora_layers(model)) == {"0", "1"}
        assert convlora.find_targets(wrapped) == ["0", "1"]
        convlora.unload(wrapped)
        assert type(model[0]) is nn.Conv2d


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_inject_into_a_ddp_wrapped_model_is_refused_with_the_fix() -> None:
    if not dist.is_available():
        pytest.skip("torch.distributed is not available")
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{_free_port()}", rank=0, world_size=1)
    try:
        model = _convs()
        ddp = nn.parallel.DistributedDataParallel(model)
        keys = list(model.state_dict())
        for holder in (ddp, nn.Sequential(ddp)):
            with pytest.raises(convlora.ConvLoRAError, match=r"DistributedDataParallel.*unsynchronised.*"
                                                             r"then wrap it"):
                convlora.inject(holder, rank=1)
        assert list(model.state_dict()) == keys and not convlora.lora_layers(model)
    finally:
        dist.destroy_process_group()
