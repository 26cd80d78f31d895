"""convlora.extract: adapters from (base, tuned) pairs by truncated SVD of the weight difference."""

from __future__ import annotations

import copy
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

import convlora
from convlora.cli import main
from convlora.functional import lora_shapes

pytestmark = pytest.mark.usefixtures("one_thread")


class Mixed(nn.Module):
    """Conv1d, Conv3d and a Linear next to each other (not a Sequential)."""

    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv1d(4, 6, 5, padding=2)
        self.c3 = nn.Conv3d(2, 5, (3, 2, 1))
        self.fc = nn.Linear(7, 3)

    def forward(self, x1: torch.Tensor, x3: torch.Tensor, xf: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return self.c1(x1), self.c3(x3), self.fc(xf)


def _net2d() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1, groups=4), nn.ReLU(),   # grouped
        nn.Conv2d(8, 8, 3, padding=1, groups=8), nn.ReLU(),   # depthwise
        nn.Conv2d(8, 6, (3, 1), padding=(1, 0)), nn.ReLU(),   # non-square
        nn.Conv2d(6, 5, 1, bias=False),                       # 1x1 without bias
    )


def _square_net() -> nn.Module:
    torch.manual_seed(1)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 10, 5, padding=2),
                         nn.ReLU(), nn.Conv2d(10, 4, 1))


def _perturb(model: nn.Module, std: float = 0.05, seed: int = 1, only: str = "weight") -> nn.Module:
    """A copy whose conv/linear weights (``only="weight"``) or matching tensors got random changes."""
    tuned = copy.deepcopy(model)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in tuned.named_parameters():
            if (only == "weight" and name.endswith(".weight") and p.ndim > 1) or (only != "weight" and only in name):
                p.add_(torch.randn(p.shape, generator=gen) * std)
    return tuned


def _state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def _assert_same_state(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    now = model.state_dict()
    assert set(now) == set(state)
    for k, v in state.items():
        assert torch.equal(now[k], v), k


def _assert_reproduces(extraction: convlora.Extraction, tuned: nn.Module) -> None:
    merged = convlora.unload(copy.deepcopy(extraction.model)).state_dict()
    for k, v in tuned.state_dict().items():
        torch.testing.assert_close(merged[k], v, rtol=2e-6, atol=1e-7, msg=k)


@pytest.mark.parametrize("factorization", ["kernel", "loralib"])
def test_full_rank_reproduces_tuned(factorization: str) -> None:
    base = _net2d() if factorization == "kernel" else _square_net()
    tuned = _perturb(base)
    before_b, before_t = _state(base), _state(tuned)
    x = torch.randn(2, 3, 9, 9)
    r = convlora.extract(base, tuned, factorization=factorization, probe=x)
    r.check_exact()
    assert r.exact and r.differences == [] and r.bias_mode == "none"
    assert set(r.layers) == {n for n, m in base.named_modules() if isinstance(m, nn.Conv2d)}
    for lyr in r.layers.values():
        assert lyr.rank == lyr.max_rank and lyr.energy == pytest.approx(1.0)
        assert lyr.weight_error <= lyr.tolerance
    _assert_reproduces(r, tuned)
    assert r.output_error is not None and r.output_error["rel_to_tuned"] < 1e-5
    torch.testing.assert_close(r.model(x), tuned(x), rtol=1e-5, atol=1e-6)
    _assert_same_state(base, before_b)
    _assert_same_state(tuned, before_t)
    assert not convlora.lora_layers(base)


def test_full_rank_conv1d_conv3d_linear() -> None:
    torch.manual_seed(2)
    base = Mixed()
    tuned = _perturb(base)
    r = convlora.extract(base, tuned, targets=["c1", "c3", "fc"])
    assert r.exact, r.leftovers()
    _assert_reproduces(r, tuned)
    default = convlora.extract(base, tuned)  # default targets: the convolutions only
    assert set(default.layers) == {"c1", "c3"}
    assert [d.key for d in default.differences] == ["fc.weight"]
    assert "fc.weight" in " ".join(default.leftovers())


def _view(dw: torch.Tensor, factorization: str, rank: int) -> torch.Tensor:
    (_, a_cols), (b_rows, _) = lora_shapes(factorization, tuple(dw.shape), rank)
    return dw.reshape(b_rows, a_cols)


@pytest.mark.parametrize("factorization", ["kernel", "loralib"])
def test_truncation_is_the_best_approximation_in_the_factorization_view(factorization: str) -> None:
    base = _square_net()
    tuned = _perturb(base)
    r = convlora.extract(base, tuned, rank=2, factorization=factorization)
    assert not r.exact
    layers = convlora.lora_layers(r.model)
    for name, lyr in r.layers.items():
        w_b, w_t = base.get_submodule(name).weight.detach(), tuned.get_submodule(name).weight.detach()
        dw = (w_t.double() - w_b.double())
        k = w_b.shape[-1] if factorization == "loralib" else 1
        s = torch.linalg.svdvals(_view(dw, factorization, 1))
        keep = min(2, lyr.max_rank) * k
        assert lyr.rank == min(2, lyr.max_rank) and lyr.kept == keep
        shapes = lora_shapes(factorization, tuple(w_b.shape), lyr.rank)
        assert tuple(layers[name].lora_A["default"].shape) == shapes[0]
        assert tuple(layers[name].lora_B["default"].shape) == shapes[1]
        # Eckart-Young: the error of the best rank-`keep` approximation is the spectrum's tail
        tail = math.sqrt(float((s[keep:] ** 2).sum() / (s**2).sum()))
        assert lyr.rel_error == pytest.approx(tail, rel=1e-4, abs=1e-6)
        torch.testing.assert_close(lyr.singular_values, s)
        got = layers[name].delta("default").double()
        assert int(torch.linalg.matrix_rank(_view(got, factorization, 1), rtol=1e-5)) <= keep


def test_energy_picks_the_smallest_rank_that_keeps_it() -> None:
    base = _square_net()
    tuned = _perturb(base)
    r = convlora.extract(base, tuned, energy=0.8, factorization="loralib")
    for lyr in r.layers.values():
        e = torch.cumsum(lyr.singular_values**2, 0) / (lyr.singular_values**2).sum()
        k = lyr.kept // lyr.rank
        assert lyr.energy >= 0.8 - 1e-12
        if lyr.rank > 1:
            assert float(e[(lyr.rank - 1) * k - 1]) < 0.8
    capped = convlora.extract(base, tuned, energy=0.8, rank=1, factorization="loralib")
    assert {lyr.rank for lyr in capped.layers.values()} == {1}


def test_rank_pattern_and_cap() -> None:
    base = _square_net()
    tuned = _perturb(base)
    r = convlora.extract(base, tuned, rank=1000, rank_pattern={"2": 3})
    assert r.layers["2"].rank == 3 and r.layers["2"].requested == 3
    assert r.layers["4"].rank == r.layers["4"].max_rank  # 1000 capped at the full rank
    assert "capped" in r.summary()
    e = convlora.extract(base, tuned, energy=0.01, rank_pattern={"2": 3})
    assert e.layers["2"].rank == 3 and e.layers["4"].rank == 1  # the pattern overrides energy


def test_biases_are_reported_and_stored_on_request() -> None:
    base = _square_net()
    tuned = _perturb(_perturb(base), only="2.bias", seed=3)
    r = convlora.extract(base, tuned, targets=["2", "4"])
    kinds = {d.key: d.kind for d in r.differences}
    assert kinds == {"0.weight": "Conv2d weight (layer not targeted)", "2.bias": "bias of an adapted layer"}
    assert not any(d.stored for d in r.differences)
    with pytest.raises(convlora.ConvLoRAError, match=r"2\.bias.*store_biases=True"):
        r.check_exact()
    assert "0.weight" in " ".join(r.leftovers())  # conv 0 changed but was not targeted
    s = convlora.extract(base, tuned, store_biases=True)
    assert s.exact and s.bias_mode == "lora_only" and [(d.key, d.stored) for d in s.differences] == [
        ("2.bias", True)]
    _assert_reproduces(s, tuned)
    tuned.get_submodule("0").bias.data.add_(1.0)
    a = convlora.extract(base, tuned, targets=["2", "4"], store_biases=True)
    assert a.bias_mode == "all" and {d.key for d in a.differences if d.stored} == {"0.bias", "2.bias"}


def test_norm_statistics_and_missing_keys_are_left_over() -> None:
    torch.manual_seed(0)
    base = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
    tuned = _perturb(base)
    tuned[1].running_mean.add_(0.5)
    r = convlora.extract(base, tuned, store_biases=True)
    kinds = {d.key: d.kind for d in r.differences}
    assert kinds == {"1.running_mean": "BatchNorm2d running_mean"}
    assert not r.exact and "1.running_mean" in r.leftovers()[0]
    sd_t = tuned.state_dict()
    sd_t["extra.weight"] = torch.ones(2)
    m = convlora.extract(base.state_dict(), sd_t)
    assert {d.key: d.kind for d in m.differences}["extra.weight"] == "only in tuned"


def test_state_dicts_give_the_same_adapter_and_a_file(tmp_path: Path) -> None:
    base = _square_net()
    tuned = _perturb(_perturb(base), only="bias", seed=4)
    from_modules = convlora.extract(base, tuned, rank=2, factorization="loralib", store_biases=True)
    from_dicts = convlora.extract(base.state_dict(), tuned.state_dict(), rank=2, factorization="loralib",
                                  store_biases=True)
    assert from_dicts.bias_mode == from_modules.bias_mode == "lora_only"
    ref = convlora.lora_state_dict(from_modules.model, bias=from_modules.bias_mode)
    got = convlora.lora_state_dict(from_dicts.model, bias=from_dicts.bias_mode)
    assert set(ref) == set(got)
    for k in ref:
        assert torch.equal(ref[k], got[k]), k
    path = convlora.save_adapter(from_dicts.model, tmp_path / "x.safetensors", bias=from_dicts.bias_mode)
    model = copy.deepcopy(base)
    convlora.load_adapter(model, path)
    x = torch.randn(1, 3, 8, 8)
    torch.testing.assert_close(model(x), from_modules.model(x), rtol=0, atol=0)


def test_bad_input_is_refused_and_changes_nothing() -> None:
    base = _net2d()
    tuned = _perturb(base)
    before = _state(base)
    for kwargs, msg in [({"rank": 0}, "rank=0"), ({"energy": 0.0}, "energy=0.0"), ({"energy": 1.5}, "energy=1.5"),
                        ({"factorization": "svd"}, "factorization='svd'"), ({"tol": -1.0}, "tol=-1.0"),
                        ({"rank_pattern": {"0": 2.5}}, r"rank_pattern\['0'\]"),
                        ({"adapter_name": "a b"}, "adapter_name")]:
        with pytest.raises(convlora.ConvLoRAError, match=msg):
            convlora.extract(base, tuned, **kwargs)
    with pytest.raises(convlora.UnsupportedLayerError, match=r"layer '2'.*groups=4"):
        convlora.extract(base, tuned, factorization="loralib")
    with pytest.raises(convlora.TargetError, match="nothing to extract"):
        convlora.extract(base, copy.deepcopy(base))
    with pytest.raises(convlora.TargetError, match="needs the model"):
        convlora.extract(base.state_dict(), tuned.state_dict(), targets="pixel_shuffle")
    with pytest.raises(convlora.ConvLoRAError, match="probe= needs base as an nn.Module"):
        convlora.extract(base.state_dict(), tuned, probe=torch.randn(1, 3, 4, 4))
    other = tuned.state_dict()
    other["0.weight"] = torch.randn(8, 3, 5, 5)
    with pytest.raises(convlora.ConvLoRAError, match="differ in shape"):
        convlora.extract(base.state_dict(), other)
    nan = tuned.state_dict()
    nan["2.weight"] = nan["2.weight"].clone()
    nan["2.weight"][0, 0, 0, 0] = float("nan")
    with pytest.raises(convlora.ConvLoRAError, match="layer '2'.*NaN"):
        convlora.extract(base, nan)
    adapted = copy.deepcopy(tuned)
    convlora.inject(adapted, rank=2)
    with pytest.raises(convlora.ConvLoRAError, match="unload"):
        convlora.extract(base, adapted)
    _assert_same_state(base, before)


@pytest.mark.slow
def test_timm_resnet18_full_rank() -> None:
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    base = timm.create_model("resnet18", pretrained=False, num_classes=10).eval()
    tuned = _perturb(_perturb(base, std=1e-3), std=1e-2, only="bn1", seed=5)  # convs, fc and a norm
    x = torch.randn(1, 3, 32, 32)
    r = convlora.extract(base, tuned, targets=lambda n, m: isinstance(m, (nn.Conv2d, nn.Linear)), probe=x,
                         store_biases=True)
    assert len(r.layers) == 21 and r.bias_mode == "all"  # fc.bias is not perturbed; bn1.bias is
    norms = [n for n, m in base.named_modules() if n.endswith("bn1")]
    left = r.leftovers()  # the norm scales: the adapter cannot carry them (their biases it does)
    assert sorted(s.partition(":")[0] for s in left) == sorted(f"{n}.weight" for n in norms)
    assert all("BatchNorm2d weight" in s for s in left)
    with torch.no_grad():
        for n in norms:
            r.model.get_parameter(f"{n}.weight").copy_(tuned.get_parameter(f"{n}.weight"))
        torch.testing.assert_close(r.model(x), tuned(x), rtol=1e-4, atol=1e-5)
    for lyr in r.layers.values():
        assert lyr.weight_error <= lyr.tolerance, lyr.name


def test_dsclora_full_rank_reproduces_the_adapted_layers(shared_data: Path) -> None:
    from examples.span_sr.arch import load_span

    base = load_span(shared_data / "weights" / "span_tiny_ch26.pth")
    tuned = load_span(shared_data / "weights" / "dsclora_ch26.pth")
    r = convlora.extract(base, tuned, factorization="loralib", targets=["block_*", "conv_2", "pixel_shuffle"])
    assert len(r.layers) == 20
    merged = convlora.unload(copy.deepcopy(r.model))
    for name, lyr in r.layers.items():
        assert lyr.weight_error <= lyr.tolerance, name
        w = tuned.get_submodule(name).weight
        torch.testing.assert_close(merged.get_submodule(name).weight, w, rtol=1e-6, atol=1e-8)
    # what is left over are the tiny differences outside the paper's placement
    left = " ".join(r.leftovers())
    assert "conv_1.eval_conv.weight" in left and "conv_cat.weight" in left
    everything = convlora.extract(base, tuned, factorization="loralib", store_biases=True)
    assert everything.exact, everything.leftovers()


@pytest.mark.slow
def test_dsclora_benchmark_script_runs(shared_data: Path, capsys) -> None:
    from benchmarks.extract_dsclora import main

    assert main(["--sets", "Set5", "--quick", "--weights", str(shared_data / "weights"),
                 "--bench", str(shared_data / "sr_bench")]) == 0
    out = capsys.readouterr().out
    def size(shape: tuple[int, ...], r: int) -> int:
        return sum(math.prod(s) for s in lora_shapes("loralib", shape, r))

    params = 18 * size((26, 26, 3, 3), 2) + size((26, 26, 3, 3), 8) + size((48, 26, 3, 3), 8)
    assert f"| 2/8 (paper) | 2/8 | {params:,} |" in out
    assert "every conv + biases, full rank: exact=True" in out


def _files(tmp_path: Path) -> tuple[nn.Module, nn.Module, Path, Path]:
    base = _square_net()
    tuned = _perturb(_perturb(base), only="4.bias", seed=6)
    torch.save({"params": base.state_dict()}, tmp_path / "base.pth")  # nested, as training checkpoints are
    save_file(tuned.state_dict(), str(tmp_path / "tuned.safetensors"))
    return base, tuned, tmp_path / "base.pth", tmp_path / "tuned.safetensors"


def test_cli_extract_then_merge_reproduces_tuned(tmp_path: Path, capsys) -> None:
    base, tuned, b, t = _files(tmp_path)
    out = tmp_path / "adapter.safetensors"
    assert main(["extract", "--base", str(b), "--tuned", str(t), "--store-biases", "--require-exact",
                 "--out", str(out)]) == 0
    assert "exact: yes" in capsys.readouterr().out
    tensors, meta = convlora.read_adapter(out)
    assert meta["bias"] == "lora_only"  # only 4.bias changed; the mode saves every adapted layer's bias
    assert sorted(meta["bias_keys"]) == sorted(f"{n}.bias" for n in meta["layers"])
    assert meta["user"]["extracted_from"]["exact"] is True
    merged_path = tmp_path / "merged.safetensors"
    assert main(["merge", "--adapter", str(out), "--base", str(b), "--out", str(merged_path)]) == 0
    merged = load_file(str(merged_path))
    for k, v in tuned.state_dict().items():
        torch.testing.assert_close(merged[k], v, rtol=2e-6, atol=1e-7, msg=k)
    model = copy.deepcopy(base)
    convlora.load_adapter(model, out)
    x = torch.randn(1, 3, 8, 8)
    torch.testing.assert_close(model(x), tuned(x), rtol=1e-5, atol=1e-6)


def test_cli_extract_options(tmp_path: Path, capsys) -> None:
    _, _, b, t = _files(tmp_path)
    out = tmp_path / "a.safetensors"
    assert main(["extract", "--base", str(b), "--tuned", str(t), "--rank", "1", "--factorization", "loralib",
                 "--targets", "2,4", "--rank-pattern", "4=3", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "exact: no" in printed and "left over: 0.weight" in printed and "left over: 4.bias" in printed
    _, meta = convlora.read_adapter(out)
    assert {n: (lm["rank"], lm["factorization"]) for n, lm in meta["layers"].items()} == {
        "2": (1, "loralib"), "4": (3, "loralib")}
    energy = tmp_path / "e.safetensors"
    assert main(["extract", "--base", str(b), "--tuned", str(t), "--energy", "0.5", "--exclude", "0",
                 "--out", str(energy)]) == 0
    assert set(convlora.read_adapter(energy)[1]["layers"]) == {"2", "4"}


def test_cli_extract_never_overwrites_an_input_and_leaves_no_partial_output(tmp_path: Path, capsys) -> None:
    _, _, b, t = _files(tmp_path)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    same = tmp_path / "sub" / ".." / "tuned.safetensors"  # the tuned input under another spelling
    for out, msg in [(t, "is the tuned input"), (same, "is the tuned input"), (tmp_path / "x.pth", ".safetensors suffix")]:
        assert main(["extract", "--base", str(b), "--tuned", str(t), "--out", str(out)]) == 2
        assert msg in capsys.readouterr().err
    out = tmp_path / "truncated.safetensors"
    assert main(["extract", "--base", str(b), "--tuned", str(t), "--rank", "1", "--require-exact",
                 "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "does not reproduce the tuned model" in err and "rank 1 of" in err
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before  # nothing written, nothing changed
    with pytest.raises(SystemExit):
        main(["extract", "--base", str(b), "--tuned", str(t), "--rank-pattern", "conv_2:8", "--out", str(out)])
    assert "is not PATTERN=RANK" in capsys.readouterr().err


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_modules_give_the_cpu_result() -> None:
    base = _square_net()
    tuned = _perturb(base)
    cpu = convlora.extract(base, tuned, rank=2, factorization="loralib")
    gpu = convlora.extract(copy.deepcopy(base).cuda(), copy.deepcopy(tuned).cuda(), rank=2, factorization="loralib",
                           probe=torch.randn(1, 3, 8, 8, device="cuda"))
    assert next(gpu.model.parameters()).is_cuda
    for name, lyr in cpu.layers.items():
        torch.testing.assert_close(gpu.layers[name].singular_values, lyr.singular_values, rtol=1e-9, atol=1e-12)
        torch.testing.assert_close(gpu.model.get_submodule(name).delta("default").cpu(),
                                   cpu.model.get_submodule(name).delta("default"), rtol=1e-5, atol=1e-7)
