"""Module-surgery blind spots: code that bypasses a layer, tied/aliased weights, train/eval mode.

Property tests (hypothesis) build random models out of blocks whose behaviour the test knows --
a conv called normally or twice, a parent that reads ``conv.weight`` instead of calling it, a conv
never called, attention and transformer layers, tied parameters, modules registered twice,
storage-sharing views -- and check that every configuration is either refused (with the model
unchanged) or adapted exactly: merged and unmerged outputs agree, gradients reach every adapter
and unmerge restores every weight bit for bit. Each runs for every adapter method: the property
tests draw it with the model, the others are parametrised over it.
"""

from __future__ import annotations

import copy
import re

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from torch import nn

import convlora
from convlora import UnsupportedLayerError
from tests._core_helpers import module_types, randomize_adapters

pytestmark = pytest.mark.usefixtures("one_thread")

SETTINGS = settings(max_examples=40, deadline=None, derandomize=True,
                    suppress_health_check=[HealthCheck.too_slow])
C = 4
METHODS = ["lora", "dora", "loha", "lokr"]


def _state(model: nn.Module) -> tuple[list, list, dict[str, torch.Tensor]]:
    sd = {k: v.detach().clone() for k, v in model.state_dict().items()}
    return module_types(model), [n for n, _ in model.named_parameters()], sd


def _assert_unchanged(model: nn.Module, before: tuple[list, list, dict[str, torch.Tensor]]) -> None:
    types, params, sd = _state(model)
    assert types == before[0] and params == before[1] and list(sd) == list(before[2])
    assert all(torch.equal(sd[k], before[2][k]) for k in sd)


# -- blocks whose use of their layers the test knows ----------------------------------------------
class Call(nn.Module):
    """Calls its conv (the normal case)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(C, C, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv(x)


class Twice(Call):
    """Calls its conv twice."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(torch.tanh(self.conv(x)))


class Read(Call):
    """Reads ``conv.weight`` and runs the conv function itself (as nn.MultiheadAttention does)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + F.conv2d(x, self.conv.weight, self.conv.bias, padding=1)


class Mixed(Call):
    """Calls its conv, and also uses the weight's values elsewhere."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x) + self.conv.weight.mean()


class Meta(Call):
    """Reads only the weight's dtype and shape (not a bypass)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        assert self.conv.weight.shape[0] == C
        return self.conv(x.to(self.conv.weight.dtype))


class Spare(Call):
    """Holds a second conv it never calls."""

    def __init__(self) -> None:
        super().__init__()
        self.spare = nn.Conv2d(C, C, 1)


class Attn(nn.Module):
    """nn.MultiheadAttention over the pixels."""

    def __init__(self) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(C, 2, batch_first=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, c, h, w = x.shape
        t = x.flatten(2).transpose(1, 2)
        return x + self.attn(t, t, t, need_weights=False)[0].transpose(1, 2).reshape(n, c, h, w)


class Encoder(nn.Module):
    """nn.TransformerEncoderLayer over the pixels (it has an inference fast path)."""

    def __init__(self) -> None:
        super().__init__()
        self.enc = nn.TransformerEncoderLayer(C, 2, 8, dropout=0.0, batch_first=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, c, h, w = x.shape
        return self.enc(x.flatten(2).transpose(1, 2)).transpose(1, 2).reshape(n, c, h, w)


BLOCKS = {"call": Call, "twice": Twice, "read": Read, "mixed": Mixed, "meta": Meta, "spare": Spare,
          "attn": Attn, "encoder": Encoder}
# Which of a block's layers the model's code bypasses, and which inject must refuse by name.
BYPASSED = {"read": {"conv"}, "mixed": {"conv"}, "spare": {"spare"}}
REFUSED = {"attn": {"attn.out_proj"}, "encoder": {"enc.linear1", "enc.linear2", "enc.self_attn.out_proj"}}


def _layer_names(block: nn.Module) -> list[str]:
    return [n for n, m in block.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]


@st.composite
def block_models(draw: st.DrawFn) -> tuple[nn.Module, list[str], list[str], bool, int]:
    kinds = draw(st.lists(st.sampled_from(sorted(BLOCKS)), min_size=1, max_size=4))
    seed = draw(st.integers(0, 2**16))
    torch.manual_seed(seed)
    model = nn.Sequential(*(BLOCKS[k]() for k in kinds))
    targets: list[str] = []
    for i, block in enumerate(model):
        names = _layer_names(block)
        targets += [f"{i}.{n}" for n in draw(st.lists(st.sampled_from(names), unique=True, max_size=len(names)))]
    if not targets:
        targets = [f"0.{_layer_names(model[0])[0]}"]
    return model, kinds, targets, draw(st.booleans()), seed


@SETTINGS
@given(case=block_models(), method=st.sampled_from(METHODS))
def test_bypassed_layers_are_refused_or_reported_and_accepted_ones_are_exact(case, method: str) -> None:
    model, kinds, targets, training, seed = case
    model.train(training)
    x = torch.randn(2, C, 5, 5, generator=torch.Generator().manual_seed(seed))
    refused = {f"{i}.{n}" for i, k in enumerate(kinds) for n in REFUSED.get(k, ())} & set(targets)
    bypassed = {f"{i}.{n}" for i, k in enumerate(kinds) for n in BYPASSED.get(k, ())} & set(targets)
    before = _state(model)
    try:
        names = convlora.inject(model, rank=1, targets=targets, method=method)
    except UnsupportedLayerError as err:
        event("refused by inject")
        assert refused, f"refused without a known reason: {err}"
        assert re.search(r"layer '([^']+)'", str(err))[1] in refused  # type: ignore[index]
        _assert_unchanged(model, before)
        return
    assert not refused, f"inject accepted layers whose parent reads their weight: {sorted(refused)}"
    randomize_adapters(model, seed)
    try:
        convlora.verify(model, x)
        reported: set[str] = set()
    except UnsupportedLayerError as err:
        reported = set(re.findall(r"'([^']+)': its ", str(err)))
    if not reported:  # accepted and verified: merged == unmerged, and every adapter trains
        event("accepted and exact")
        y = model(x)
        y.square().sum().backward()
        for name in names:
            for factor, p in convlora.lora_layers(model)[name].factors("default").items():
                assert p.grad is not None and p.grad.abs().sum() > 0, f"no gradient reaches {name}.{factor}"
        with torch.no_grad(), convlora.merged(model):
            torch.testing.assert_close(model(x), y.detach(), atol=1e-5, rtol=1e-5)
    else:
        event("reported by verify")
    assert reported == bypassed


def test_transformer_encoder_layer_from_the_issue_is_refused_by_name() -> None:
    model = nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=True)
    before = _state(model)
    with pytest.raises(UnsupportedLayerError, match=r"layer 'linear1'.*fast path.*exclude=\['linear1'\]"):
        convlora.inject(model, targets="*")
    with pytest.raises(UnsupportedLayerError, match=r"layer 'self_attn.out_proj'.*never calls out_proj"):
        convlora.inject(model, targets="self_attn.out_proj")
    _assert_unchanged(model, before)


@pytest.mark.parametrize("method", METHODS)
def test_verify_leaves_the_model_as_it_was_and_runs_the_current_mode(method: str) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Dropout(0.5), nn.Conv2d(4, 4, 1))
    convlora.inject(model, rank=1, method=method)
    randomize_adapters(model)
    model.train()
    before = _state(model)
    x = torch.randn(2, 3, 6, 6)
    rng = torch.get_rng_state()
    convlora.verify(model, x)
    _assert_unchanged(model, before)
    assert torch.equal(torch.get_rng_state(), rng) and model.training
    with pytest.raises(convlora.MergeStateError, match="no LoRA layers"):
        convlora.verify(nn.Conv2d(1, 1, 1), torch.randn(1, 1, 2, 2))


def test_verify_looks_through_compile_and_data_parallel() -> None:
    model = nn.Sequential(Read())
    convlora.inject(model, rank=1)
    for wrapped in (torch.compile(model), nn.DataParallel(model)):
        with pytest.raises(UnsupportedLayerError, match=r"'0.conv': its forward was never called and its "
                                                        r"weight was read by conv2d\(\)"):
            convlora.verify(wrapped, torch.randn(1, C, 4, 4))


# -- tied and aliased weights ---------------------------------------------------------------------
class Holder(nn.Module):
    """Passes its input through; holds a buffer (which a tie may point at another weight)."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("kept", torch.zeros(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


@st.composite
def tied_models(draw: st.DrawFn) -> tuple[nn.Module, list[set[str]], list[str], int]:
    k = draw(st.integers(2, 4))
    seed = draw(st.integers(0, 2**16))
    torch.manual_seed(seed)
    convs = [nn.Conv2d(C, C, 3, padding=1) for _ in range(k)]
    model = nn.Sequential()
    for i, conv in enumerate(convs):
        model.add_module(f"c{i}", conv)
        model.add_module(f"t{i}", nn.Tanh())
    model.add_module("holder", Holder())
    groups: list[set[str]] = []  # names of the places that share one weight's memory
    for _ in range(draw(st.integers(1, 3))):
        kind = draw(st.sampled_from(["parameter", "view", "buffer", "module"]))
        i, j = draw(st.integers(0, k - 1)), draw(st.integers(0, k - 1))
        if kind == "module":  # one module under two names: adapted exactly, not refused
            model.add_module(f"again{len(groups)}", convs[i])
            continue
        if i == j or kind == "buffer":
            j = -1
        if kind == "parameter" and j >= 0:
            convs[j].weight = convs[i].weight
        elif kind == "view" and j >= 0:
            convs[j].weight = nn.Parameter(convs[i].weight.data.view(convs[i].weight.shape))
        else:
            model.holder.kept = convs[i].weight.detach()
        groups.append({f"c{i}", f"c{j}" if j >= 0 else "holder.kept"})
    targets = draw(st.lists(st.sampled_from([f"c{i}" for i in range(k)]), min_size=1, unique=True))
    return model, groups, targets, seed


@SETTINGS
@given(case=tied_models(), method=st.sampled_from(METHODS))
def test_tied_weights_are_refused_naming_both_places_or_adapted_exactly(case, method: str) -> None:
    model, groups, targets, seed = case
    x = torch.randn(2, C, 6, 6, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        y0 = model(x)
    weights = {n: p.detach().clone() for n, p in model.named_parameters(remove_duplicate=False)}
    # Places whose memory some other module also uses (later ties may have replaced earlier ones).
    ptr = {n: (p.untyped_storage().data_ptr(), m) for n, m in model.named_children()
           for p in ([m.weight] if isinstance(m, nn.Conv2d) else [])}
    kept = model.holder.kept.untyped_storage().data_ptr()
    tied = {n for n, (p, m) in ptr.items()
            if p == kept or any(q == p and o is not m for q, o in ptr.values())}
    before = _state(model)
    model_order = [n for n, _ in model.named_children()]
    try:
        names = convlora.inject(model, rank=1, targets=targets, method=method)
    except UnsupportedLayerError as err:
        event("tie refused")
        layer = re.search(r"layer '([^']+)'", str(err))[1]  # type: ignore[index]
        assert layer in tied & set(targets), str(err)
        others = re.search(r"shared with \[([^\]]+)\]", str(err))[1]  # type: ignore[index]
        assert others, "the error must name the other place"
        _assert_unchanged(model, before)
        return
    event("adapted exactly")
    randomize_adapters(model, seed)
    adapted = {id(layer.weight) for layer in convlora.lora_layers(model).values()}
    with torch.no_grad():
        y = model(x)
        everything = {**dict(model.named_parameters(remove_duplicate=False)),
                      **dict(model.named_buffers(remove_duplicate=False))}
        others = {n: t.clone() for n, t in everything.items() if id(t) not in adapted and ".lora_" not in n}
        convlora.merge(model)
        torch.testing.assert_close(model(x), y, atol=1e-5, rtol=1e-5)
        now = {**dict(model.named_parameters(remove_duplicate=False)),
               **dict(model.named_buffers(remove_duplicate=False))}
        changed = [n for n, t in others.items() if not torch.equal(now[n], t)]
        assert not changed, f"merge() changed tensors it did not adapt: {changed}"
        convlora.unmerge(model)
        after = dict(model.named_parameters(remove_duplicate=False))
        assert all(torch.equal(after[n], w) for n, w in weights.items()), "unmerge must restore"
        convlora.unload(model, merge=False)
        assert torch.equal(model(x), y0)
    assert not tied & set(targets), f"tied layers {sorted(tied & set(targets))} were adapted"
    assert names == [t for t in model_order if t in targets]


@pytest.mark.parametrize("method", METHODS)
def test_module_registered_twice_is_one_layer_under_both_names(tmp_path, method: str) -> None:
    torch.manual_seed(0)
    conv = nn.Conv2d(C, C, 3, padding=1)
    model = nn.Sequential()
    model.add_module("a", conv)
    model.add_module("b", conv)
    plain = copy.deepcopy(model)
    assert convlora.inject(model, rank=2, targets="b", method=method) == ["a"]
    assert model.a is model.b
    randomize_adapters(model)
    x = torch.randn(1, C, 5, 5)
    y = model(x)
    path = convlora.save_adapter(model, tmp_path / "a.safetensors")
    convlora.load_adapter(plain, path)
    assert plain.a is plain.b and torch.equal(plain(x), y)
    with pytest.raises(convlora.TargetError, match="no target layer matched"):
        convlora.inject(copy.deepcopy(model), rank=1, targets="a", exclude="b", adapter_name="x")
    convlora.unload(model)
    assert type(model.a) is nn.Conv2d and model.a is model.b


# -- train/eval mode --------------------------------------------------------------------------------
SHAPES = {"conv1d": (1, 2, 6), "conv2d": (1, 2, 6, 6), "conv3d": (1, 2, 3, 3, 3), "linear": (1, 2)}
LAYERS = {"conv1d": lambda: nn.Conv1d(2, 3, 3), "conv2d": lambda: nn.Conv2d(2, 3, 3),
          "conv3d": lambda: nn.Conv3d(2, 3, 1), "linear": lambda: nn.Linear(2, 3)}


@st.composite
def mode_models(draw: st.DrawFn) -> tuple[nn.Module, dict[str, tuple[str, bool]], float]:
    torch.manual_seed(draw(st.integers(0, 2**16)))
    kinds = draw(st.lists(st.sampled_from(sorted(LAYERS)), min_size=1, max_size=4))
    model = nn.ModuleDict({f"b{i}": nn.Sequential(LAYERS[kind]()) for i, kind in enumerate(kinds)})
    model.train(draw(st.booleans()))
    modes = {}
    for kind, (name, block) in zip(kinds, model.items()):
        block.train(draw(st.booleans()))
        modes[f"{name}.0"] = (kind, block.training)
    return model, modes, draw(st.sampled_from([0.0, 0.3, 0.9]))


@SETTINGS
@given(case=mode_models(), method=st.sampled_from(METHODS))
def test_new_lora_layers_take_the_mode_of_the_layer_they_replace(case, method: str, tmp_path_factory) -> None:
    model, modes, dropout = case
    dropout = 0.0 if method == "dora" else dropout  # DoRA refuses dropout (no additive branch)
    expected = {n: training for n, (_, training) in modes.items()}
    saved = copy.deepcopy(model)
    convlora.inject(model, rank=1, targets="*", dropout=dropout, method=method)
    layers = convlora.lora_layers(model)
    assert {n: layer.training for n, layer in layers.items()} == expected
    assert all(m.training == layer.training for layer in layers.values() for m in layer.modules())
    randomize_adapters(model)
    for name, layer in layers.items():
        kind, training = modes[name]
        if not training:
            x = torch.randn(SHAPES[kind])
            assert torch.equal(layer(x), layer(x)), f"{name} in eval mode must be deterministic"
    # The same through an adapter file: load_adapter injects the layers too.
    path = convlora.save_adapter(model, tmp_path_factory.mktemp("mode") / "a.safetensors")
    convlora.load_adapter(saved, path)
    assert {n: layer.training for n, layer in convlora.lora_layers(saved).items()} == expected
