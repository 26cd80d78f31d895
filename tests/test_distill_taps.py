"""FeatureTaps: name/pattern resolution, selection, hook lifetime, gradients, LoRA layers."""

from __future__ import annotations

import gc
import weakref

import pytest
import torch
from torch import nn

import convlora
from convlora.distill import FeatureTaps


class TupleBlock(nn.Module):
    """Returns (features, extra) like SPAN's attention blocks."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, padding=1)

    def forward(self, x):
        y = self.conv(x)
        return y, x


class DictBlock(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(c, c, 1)

    def forward(self, x):
        return {"feat": self.conv(x), "skip": x}


class Net(nn.Module):
    def __init__(self, c: int = 4) -> None:
        super().__init__()
        self.head = nn.Conv2d(3, c, 3, padding=1)
        self.body = nn.Sequential(nn.Conv2d(c, c, 3, padding=1), nn.ReLU(),
                                  nn.Conv2d(c, c, 3, padding=1))
        self.block = TupleBlock(c)
        self.dblock = DictBlock(c)
        self.tail = nn.Conv2d(c, 3, 3, padding=1)

    def forward(self, x):
        x = self.body(self.head(x))
        x, _ = self.block(x)
        return self.tail(self.dblock(x)["feat"])


def hook_count(model: nn.Module) -> int:
    return sum(len(m._forward_hooks) for m in model.modules())


@pytest.fixture
def net():
    torch.manual_seed(0)
    return Net()


def test_names_patterns_and_mapping(net):
    x = torch.randn(1, 3, 8, 8)
    with FeatureTaps(net, ["head", "body.*"]) as taps:
        net(x)
        feats = taps.pop()
    assert list(feats) == ["head", "body.0", "body.1", "body.2"]
    torch.testing.assert_close(feats["head"], net.head(x))
    torch.testing.assert_close(feats["body.2"], net.body(net.head(x)))
    with FeatureTaps(net, {"early": "head", "late": "body.2"}) as taps:
        net(x)
        assert list(taps.pop()) == ["early", "late"]
    assert hook_count(net) == 0


def test_select_index_key_callable_and_per_tap(net):
    x = torch.randn(2, 3, 8, 8)
    expected = net.block.conv(net.body(net.head(x)))
    for select in (0, lambda out: out[0]):
        with FeatureTaps(net, "block", select=select) as taps:
            net(x)
            torch.testing.assert_close(taps.pop()["block"], expected)
    with FeatureTaps(net, {"t": "block", "d": "dblock"}, select={"t": 1, "d": "skip"}) as taps:
        net(x)
        feats = taps.pop()
    torch.testing.assert_close(feats["t"], net.body(net.head(x)))
    torch.testing.assert_close(feats["d"], expected)


def test_tuple_output_without_select_is_a_clear_error(net):
    with FeatureTaps(net, "block") as taps, pytest.raises(TypeError, match="select="):
        net(torch.randn(1, 3, 8, 8))
    assert not taps.attached
    with FeatureTaps(net, "dblock", select="nope"), pytest.raises(ValueError, match="nope"):
        net(torch.randn(1, 3, 8, 8))


def test_unknown_name_lists_candidates(net):
    with pytest.raises(ValueError, match=r"'body\.7'.*body\.0"):
        FeatureTaps(net, "body.7")
    with pytest.raises(ValueError, match="matches no submodule"):
        FeatureTaps(net, "encoder.*")
    with pytest.raises(ValueError, match="exactly one module per key"):
        FeatureTaps(net, {"k": "body.*"})
    with pytest.raises(ValueError, match="not taps"):
        FeatureTaps(net, "head", select={"tail": 0})
    assert hook_count(net) == 0


def test_hooks_removed_on_exit_and_exception(net):
    with FeatureTaps(net, ["head", "tail"]) as taps:
        assert hook_count(net) == 2
    assert hook_count(net) == 0 and not taps.attached
    with pytest.raises(RuntimeError, match="boom"), FeatureTaps(net, "head"):
        raise RuntimeError("boom")
    assert hook_count(net) == 0
    taps = FeatureTaps(net, "head")  # attached by the constructor, re-usable after remove()
    taps.remove()
    with taps:
        net(torch.randn(1, 3, 4, 4))
        assert list(taps.pop()) == ["head"]
    assert hook_count(net) == 0


def test_pop_clears_and_releases_tensors(net):
    with FeatureTaps(net, "body.2") as taps:
        net(torch.randn(1, 3, 8, 8))
        feats = taps.pop()
        ref = weakref.ref(feats["body.2"])
        assert taps.pop() == {}
        del feats
        gc.collect()
        assert ref() is None  # taps keep no reference after pop()
        net(torch.randn(1, 3, 8, 8))  # a second forward overwrites, it does not accumulate
        net(torch.randn(1, 3, 8, 8))
        assert len(taps.pop()) == 1


def test_gradients_flow_through_student_taps_not_teacher_taps(net):
    x = torch.randn(1, 3, 8, 8)
    with FeatureTaps(net, "body.2") as taps:
        net(x)
        feat = taps.pop()["body.2"]
    assert feat.requires_grad
    feat.square().mean().backward()
    assert net.head.weight.grad is not None and net.tail.weight.grad is None
    with torch.no_grad(), FeatureTaps(net, "body.2", detach=True) as taps:
        net(x)
        feat = taps.pop()["body.2"]
    assert not feat.requires_grad and feat.grad_fn is None
    with FeatureTaps(net, "body.2", detach=True) as taps:  # detach also works with grad on
        net(x)
        assert taps.pop()["body.2"].grad_fn is None


def test_data_parallel_wrapper_names(net):
    wrapped = nn.DataParallel(net)  # on CPU this just calls the module
    with FeatureTaps(wrapped, "head") as taps:
        wrapped(torch.randn(1, 3, 4, 4))
        assert list(taps.pop()) == ["head"]


def test_taps_on_lora_layers_see_adapted_output(net):
    convlora.inject(net, rank=2, targets=["body.*"])
    torch.manual_seed(1)
    with torch.no_grad():
        for p in convlora.lora_parameters(net):
            p.normal_(std=0.2)  # non-zero B so the adapter changes the output
    layer = net.body[0]
    assert isinstance(layer, convlora.LoRALayer)
    x = torch.randn(1, 3, 8, 8)
    with FeatureTaps(net, "body.0") as taps:
        net(x)
        adapted = taps.pop()["body.0"]
        with convlora.disabled(net):
            net(x)
            base = taps.pop()["body.0"]
    h = net.head(x)
    torch.testing.assert_close(adapted, layer(h))
    torch.testing.assert_close(base, nn.functional.conv2d(h, layer.weight, layer.bias, padding=1))
    assert (adapted - base).abs().max() > 1e-3
    adapted.sum().backward()  # student taps reach the adapter parameters of the tapped layer
    assert all(p.grad is not None for p in convlora.lora_parameters(layer))
    assert all(p.grad is None for p in convlora.lora_parameters(net.body[2]))
    assert hook_count(net) == 0
