"""Adapter composition: several active adapters, the strength knob, mixed batches, combining.

Property tests over small conv models with distinct, non-zero adapters of every method.
"""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

import convlora
from convlora.errors import ConvLoRAError, MergeStateError
from convlora.state_dict import merge_state_dict
from tests._core_helpers import randomize_adapters

SETTINGS = settings(max_examples=6, deadline=None, derandomize=True,
                    suppress_health_check=[HealthCheck.too_slow,
                                           HealthCheck.function_scoped_fixture])
METHODS = ["lora", "dora", "loha", "lokr", "loha+tucker", "lokr+tucker"]  # Tucker: on the 3x3 convs
NAMES = ["a", "b", "c"]


def _base(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(4, 6, 3, padding=1), nn.ReLU(),
                         nn.Conv2d(6, 6, 3, padding=1, groups=2, padding_mode="reflect"), nn.ReLU(),
                         nn.ConvTranspose2d(6, 4, 2, stride=2)).eval()


def _model(seed: int, methods: list[str], ranks: list[int], rslora: bool = False,
           factorization: str = "kernel") -> tuple[nn.Module, nn.Module, torch.Tensor]:
    base = _base(seed)
    model = copy.deepcopy(base)
    for i, (name, variant, rank) in enumerate(zip(NAMES, methods, ranks)):
        method, tucker = variant.removesuffix("+tucker"), variant.endswith("+tucker")
        convlora.inject(model, rank, 2.0 * rank, adapter_name=name, method=method, rslora=rslora,
                        factorization=factorization if method == "lora" else "kernel", tucker=tucker,
                        factorization_pattern={"2": "kernel", "4": "kernel"})
        gen = torch.Generator().manual_seed(seed * 10 + i)
        with torch.no_grad():
            for p in convlora.lora_parameters(model, name):
                if p.dim() == 1:  # a DoRA magnitude: keep it near ||W|| so the adapter is sane
                    p.mul_(1 + 0.3 * torch.randn(p.shape, generator=gen))
                else:
                    p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
    x = torch.randn(5, 4, 7, 7, generator=torch.Generator().manual_seed(seed))
    return base, model, x


def _reference(base: nn.Module, model: nn.Module, terms: dict[str, float]) -> nn.Module:
    """A plain copy of ``base`` with weights ``W + sum w_i (W'_i - W)``, in float64."""
    ref = copy.deepcopy(base).double()
    layers = convlora.lora_layers(model)
    with torch.no_grad():
        for lname, layer in layers.items():
            w = layer.weight.detach().double()
            total = w.clone()
            for n, wt in terms.items():
                if n in layer.rank:
                    total += wt * (layer.effective_weight(n).detach().double() - w)
            dict(ref.named_modules())[lname].weight.copy_(total)
    return ref


weights_st = st.lists(st.floats(0.2, 1.5) | st.floats(-1.5, -0.2), min_size=3, max_size=3)


@SETTINGS
@given(seed=st.integers(0, 10_000), methods=st.lists(st.sampled_from(METHODS), min_size=3, max_size=3),
       ranks=st.lists(st.integers(1, 3), min_size=3, max_size=3), rslora=st.booleans(),
       weights=weights_st)
def test_several_active_equal_merge_of_weighted_sum(seed, methods, ranks, rslora, weights) -> None:
    base, model, x = _model(seed, methods, ranks, rslora)
    convlora.set_adapter(model, NAMES, weights=weights)
    y = model(x)
    ref = _reference(base, model, dict(zip(NAMES, weights)))
    torch.testing.assert_close(y.double(), ref(x.double()), atol=1e-4, rtol=1e-4)
    for n in NAMES:  # every adapter matters
        convlora.set_adapter(model, [m for m in NAMES if m != n],
                             weights=[w for m, w in zip(NAMES, weights) if m != n])
        assert not torch.equal(model(x), y)
    convlora.set_adapter(model, NAMES, weights=weights)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    w_before = [layer.weight.detach().clone() for layer in convlora.lora_layers(model).values()]
    convlora.merge(model)
    assert torch.equal(model(x), y), "merged composition must equal the unmerged one bit for bit"
    assert all(torch.equal(a, b) for a, b in zip(before.values(), model.state_dict().values()))
    convlora.unmerge(model)
    for layer, w in zip(convlora.lora_layers(model).values(), w_before):
        assert torch.equal(layer.weight, w)
    assert torch.equal(model(x), y)


@SETTINGS
@given(seed=st.integers(0, 10_000), methods=st.lists(st.sampled_from(METHODS), min_size=3, max_size=3),
       names=st.lists(st.sampled_from([*NAMES, None]), min_size=5, max_size=5))
def test_mixed_batch_sample_equals_its_own_forward(seed, methods, names) -> None:
    _, model, x = _model(seed, methods, [2, 1, 3])
    convlora.set_adapter(model, "a")
    with convlora.per_sample(model, names):
        y = model(x)
    assert all(layer.sample_adapters is None for layer in convlora.lora_layers(model).values())
    for name in set(names):
        idx = torch.tensor([i for i, n in enumerate(names) if n == name])
        if name is None:
            with convlora.disabled(model):
                own = model(x[idx])
        else:
            convlora.set_adapter(model, name)
            own = model(x[idx])
        assert torch.equal(y[idx], own), f"samples of {name!r} differ from their own forward"
        full = model(x) if name is not None else None
        if full is not None:  # and close to the full-batch forward (conv is not batch-invariant bitwise)
            torch.testing.assert_close(y[idx], full[idx], atol=1e-5, rtol=1e-5)


@SETTINGS
@given(seed=st.integers(0, 10_000), ranks=st.lists(st.integers(1, 2), min_size=3, max_size=3),
       rslora=st.booleans(), weights=weights_st, factorization=st.sampled_from(["kernel", "loralib"]))
def test_cat_combination_equals_weighted_sum(seed, ranks, rslora, weights, factorization) -> None:
    if factorization == "loralib":  # layer 0 allows loralib rank <= 4: the stacked rank must fit
        ranks = [1, 1, ranks[2]]
    _, model, x = _model(seed, ["lora"] * 3, ranks, rslora, factorization)
    convlora.set_adapter(model, NAMES, weights=weights)
    y_sum = model(x)
    report = convlora.combine_adapters(model, NAMES, weights, "abc", mode="cat")
    for lname, layer in convlora.lora_layers(model).items():
        target = sum(w * layer.delta(n) for n, w in zip(NAMES, weights))
        torch.testing.assert_close(layer.delta("abc"), target, atol=1e-6, rtol=1e-5)
        assert layer.rank["abc"] == sum(layer.rank[n] for n in NAMES)
        assert report[lname] < 1e-5
    convlora.set_adapter(model, "abc")
    torch.testing.assert_close(model(x), y_sum, atol=1e-5, rtol=1e-5)


@SETTINGS
@given(seed=st.integers(0, 10_000), methods=st.lists(st.sampled_from(METHODS), min_size=3, max_size=3),
       weights=weights_st, rank=st.integers(1, 6))
def test_svd_error_equals_reported(seed, methods, weights, rank) -> None:
    _, model, _x = _model(seed, methods, [2, 2, 3])
    report = convlora.combine_adapters(model, NAMES, weights, "svd", mode="svd", rank=rank)
    for lname, layer in convlora.lora_layers(model).items():
        target = sum(w * layer.delta(n).detach().double() for n, w in zip(NAMES, weights))
        err = float((layer.delta("svd").detach().double() - target).norm() / target.norm())
        assert err == pytest.approx(report[lname], rel=1e-3, abs=1e-6)
        assert layer.method["svd"] == "lora" and layer.rank["svd"] <= rank


def test_linear_combination_and_refusals() -> None:
    _, model, x = _model(1, ["lora", "lora", "dora"], [2, 2, 3])
    report = convlora.combine_adapters(model, ["a", "b"], [1.0, 0.5], "ab", mode="linear")
    layer = convlora.lora_layers(model)["0"]
    measured = float((layer.delta("ab") - layer.delta("a") - 0.5 * layer.delta("b")).norm()
                     / (layer.delta("a") + 0.5 * layer.delta("b")).norm())
    assert measured == pytest.approx(report["0"], rel=1e-4)
    # one adapter alone: linear is exact
    convlora.combine_adapters(model, ["a"], [0.7], "a7", mode="linear")
    torch.testing.assert_close(layer.delta("a7"), 0.7 * layer.delta("a"), atol=1e-6, rtol=1e-5)
    before = convlora.list_adapters(model)
    for kwargs, match in [({"names": ["a", "c"], "mode": "cat"}, "only 'lora'"),
                          ({"names": ["a", "c"], "mode": "linear"}, "only 'lora'"),
                          ({"names": ["a", "zz"], "mode": "cat"}, "no adapter named"),
                          ({"names": ["a", "b"], "mode": "svd"}, "rank"),
                          ({"names": ["a", "b"], "mode": "mean"}, "mode"),
                          ({"names": ["a", "b"], "mode": "cat", "name": "c"}, "exists")]:
        args = {"weights": [1.0, 1.0], "name": "new", **kwargs}
        with pytest.raises(ConvLoRAError, match=match):
            convlora.combine_adapters(model, **args)
        assert convlora.list_adapters(model) == before
    with pytest.raises(ConvLoRAError, match="weights"):
        convlora.set_adapter(model, ["a", "b"], weights=[1.0])
    with pytest.raises(ConvLoRAError, match="no adapter named"):
        convlora.per_sample(model, ["a", "nope", None, None, None]).__enter__()
    with pytest.raises(ConvLoRAError, match="5 samples"), convlora.per_sample(model, ["a", "b"]):
        model(x)
    convlora.set_adapter(model, "a")
    with convlora.merged(model), pytest.raises(MergeStateError, match="merged"):
        convlora.per_sample(model, ["a"] * 5).__enter__()


@SETTINGS
@given(seed=st.integers(0, 10_000), methods=st.lists(st.sampled_from(METHODS), min_size=3, max_size=3),
       strength=st.floats(-1.0, 2.0).filter(lambda s: abs(s - 1) > 1e-3))
def test_scaled_unmerged_and_merged(seed, methods, strength) -> None:
    base, model, x = _model(seed, methods, [1, 2, 2])
    convlora.set_adapter(model, ["a", "b"], weights=[1.0, 0.5])
    y = model(x)
    with convlora.scaled(model, strength):
        y_s = model(x)
    convlora.set_adapter(model, ["a", "b"], weights=[strength, 0.5 * strength])
    assert torch.equal(y_s, model(x))
    ref = _reference(base, model, {"a": strength, "b": 0.5 * strength})
    torch.testing.assert_close(y_s.double(), ref(x.double()), atol=1e-4, rtol=1e-4)
    convlora.set_adapter(model, ["a", "b"], weights=[1.0, 0.5])
    assert torch.equal(model(x), y)
    convlora.merge(model)
    weights = [layer.weight.detach().clone() for layer in convlora.lora_layers(model).values()]
    with convlora.scaled(model, strength):
        assert convlora.is_merged(model)
        assert torch.equal(model(x), y_s), "scaled while merged must re-merge exactly"
    assert all(torch.equal(layer.weight, w)
               for layer, w in zip(convlora.lora_layers(model).values(), weights))
    assert torch.equal(model(x), y)
    convlora.unmerge(model)
    convlora.set_adapter(model, "c")  # single adapter at strength s: W + s * delta
    with convlora.scaled(model, strength):
        y_c = model(x)
    convlora.set_adapter(model, ["c"], weights=[strength])
    assert torch.equal(y_c, model(x))


def test_combined_adapter_file_cli_merge_and_reload(tmp_path: Path) -> None:
    base, model, x = _model(3, ["lora", "loha", "lokr"], [2, 2, 2])
    convlora.combine_adapters(model, ["a", "b", "c"], [1.0, -0.5, 0.8], "mix", mode="svd", rank=4)
    convlora.set_adapter(model, "mix")
    y = model(x)
    path = convlora.save_adapter(model, tmp_path / "mix.safetensors", name="mix")
    fresh = copy.deepcopy(base)
    convlora.load_adapter(fresh, path)
    assert torch.equal(fresh(x), y)
    merged_sd = merge_state_dict(base.state_dict(), path)
    convlora.merge(model)
    for lname, layer in convlora.lora_layers(model).items():
        assert torch.equal(merged_sd[f"{lname}.weight"], layer.weight)
    assert torch.equal(model(x), y)


def test_training_with_dropout_composition_runs_per_adapter_branches() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1))
    convlora.inject(model, 2, adapter_name="a", dropout=0.5)
    convlora.inject(model, 2, adapter_name="b")
    randomize_adapters(model, 1, std=0.3)
    convlora.set_adapter(model, ["a", "b"], weights=[1.0, 0.5])
    x = torch.randn(2, 3, 5, 5)
    model.eval()
    y_eval = model(x)
    model.train()
    torch.manual_seed(5)
    y_train = model(x)
    assert not torch.equal(y_train, y_eval)
    y_train.sum().backward()
    layer = convlora.lora_layers(model)["0"]
    assert layer.factors("b")["lora_A"].grad is not None


def test_delete_adapter_of_a_composition() -> None:
    base, model, x = _model(2, ["lora", "loha", "lora"], [2, 2, 2])
    convlora.set_adapter(model, NAMES, weights=[1.0, 0.5, -0.3])
    with convlora.merged(model), pytest.raises(MergeStateError, match="merged"):
        convlora.delete_adapter(model, "b")
    assert convlora.list_adapters(model) == NAMES
    convlora.delete_adapter(model, "a")  # the rest of the mix stays active, with its weights
    y = model(x)
    ref = _reference(base, model, {"b": 0.5, "c": -0.3})
    torch.testing.assert_close(y.double(), ref(x.double()), atol=1e-4, rtol=1e-4)


def test_a_mix_applies_while_its_first_name_is_active() -> None:
    """The documented rule (LoRALayer, docs/composition.md): assigning a layer's ``active_adapter``
    by hand runs that adapter alone unless it is the mix's first name; set_adapter replaces the mix."""
    base, model, x = _model(3, ["lora", "lora", "loha"], [2, 2, 2])
    mix = {"a": 1.0, "b": 0.5, "c": -0.3}
    convlora.set_adapter(model, list(mix), weights=list(mix.values()))
    assert convlora.active_adapter(model) == "a"  # the mix's first name
    layers = convlora.lora_layers(model).values()
    for layer in layers:
        layer.active_adapter = "b"
    torch.testing.assert_close(model(x).double(), _reference(base, model, {"b": 1.0})(x.double()),
                               atol=1e-4, rtol=1e-4)
    for layer in layers:
        layer.active_adapter = "a"
    torch.testing.assert_close(model(x).double(), _reference(base, model, mix)(x.double()),
                               atol=1e-4, rtol=1e-4)
    convlora.set_adapter(model, "a")
    assert all(layer.composition() is None for layer in layers)
    torch.testing.assert_close(model(x).double(), _reference(base, model, {"a": 1.0})(x.double()),
                               atol=1e-4, rtol=1e-4)
