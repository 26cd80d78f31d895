"""Crafted and damaged adapter files: every field is validated before the model is touched.

The property tests start from a valid adapter file and damage it at random -- metadata fields
replaced or removed, per-layer fields set to bad values, bias entries naming weights, buffers or
modules the adapter does not cover, tensors of other dtypes, shapes or with NaN, broken headers --
and check that ``load_adapter`` either loads a model that is still exact, or raises a
``ConvLoRAError`` (a malformed file: ``AdapterFormatError`` naming what is wrong) and leaves the
model's module types, parameters and state-dict entries exactly as before; and that the command
line answers every such file with one line and exit status 2, never a traceback. Every test
that starts from a valid file runs it for each method (LoRA, LoRA with rsLoRA, DoRA, LoHa, LoKr):
the property tests draw the method with the damage, the others are parametrised over it.
"""

from __future__ import annotations

import copy
import json
import math
import struct
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file
from torch import nn

import convlora
from convlora import AdapterFormatError, ConvLoRAError, FingerprintMismatchError
from convlora.cli import main
from convlora.dora import channel_norm
from tests._core_helpers import module_types, randomize_adapters
from tests.conftest import requires_shared

pytestmark = pytest.mark.usefixtures("one_thread")

SETTINGS = settings(max_examples=100, deadline=None, derandomize=True,  # ~20 per adapter kind
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
X = torch.randn(2, 3, 6, 6, generator=torch.Generator().manual_seed(0))
VARIANTS = {"lora": ("lora", False, False), "lora_rs": ("lora", True, False), "dora": ("dora", False, False),
            "loha": ("loha", False, False), "lokr": ("lokr", False, False),
            "loha_tucker": ("loha", False, True)}
"""Adapter kinds the files are saved with: ``{id: (method, rslora, tucker)}`` (Tucker LoHa: on
the two 3x3 convs, not the 1x1)."""


def _base() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8),
                         nn.Conv2d(8, 8, 3, padding=1, groups=2), nn.ReLU(), nn.Conv2d(8, 4, 1)).eval()


def _state(model: nn.Module) -> tuple[list, list, dict[str, torch.Tensor]]:
    sd = {k: v.detach().clone() for k, v in model.state_dict().items()}
    return module_types(model), [(n, p.requires_grad) for n, p in model.named_parameters()], sd


def _assert_unchanged(model: nn.Module, before: tuple[list, list, dict[str, torch.Tensor]]) -> None:
    types, params, sd = _state(model)
    assert types == before[0], "module types changed"
    assert params == before[1], "parameters changed"
    assert list(sd) == list(before[2]), "state-dict keys changed"
    assert all(torch.equal(sd[k], before[2][k]) for k in sd), "state-dict values changed"


def _trained(model: nn.Module, variant: str, **kwargs: Any) -> nn.Module:
    """``model`` with a rank-2 adapter of ``variant`` on every conv, random non-zero factors."""
    method, rslora, tucker = VARIANTS[variant]
    convlora.inject(model, rank=2, method=method, rslora=rslora, tucker=tucker, **kwargs)
    randomize_adapters(model, 1, std=0.1)
    if method == "dora":  # the magnitude near ||W||, as after training, not 0.1 * noise
        with torch.no_grad():
            for layer in convlora.lora_layers(model).values():
                for m in layer.lora_magnitude.values():
                    m.copy_(channel_norm(layer.weight, layer.groups, layer.transposed) * (1 + m.abs()))
    return model


@pytest.fixture(scope="module")
def valid_files(tmp_path_factory: pytest.TempPathFactory) -> dict[tuple[str, str], Path]:
    """One valid adapter file per (bias mode, variant), saved from a trained copy of ``_base()``."""
    out = {}
    folder = tmp_path_factory.mktemp("valid")
    for variant in VARIANTS:
        for bias in ("none", "lora_only", "all"):
            model = _trained(_base(), variant)
            convlora.mark_only_lora_trainable(model, bias=bias)
            with torch.no_grad():
                for n, p in model.named_parameters():
                    if n.endswith("bias") and p.requires_grad:
                        p.add_(0.1)
            out[bias, variant] = convlora.save_adapter(model, folder / f"{variant}_{bias}.safetensors",
                                                       bias=bias, metadata={"run": bias})
    return out


# -- writing crafted files --------------------------------------------------------------------------
_CODES = {torch.float32: "F32", torch.float64: "F64", torch.float16: "F16", torch.bfloat16: "BF16",
          torch.int32: "I32", torch.int64: "I64"}


def _write(path: Path, tensors: dict[str, torch.Tensor], metadata: Any,
           header_edit: str | None = None) -> Path:
    """A safetensors file written by hand, so that any metadata (even non-strings) can go in."""
    header: dict[str, Any] = {}
    blobs = []
    offset = 0
    for key, t in tensors.items():
        raw = t.contiguous().flatten().view(torch.uint8).numpy().tobytes()
        header[key] = {"dtype": _CODES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + len(raw)]}
        blobs.append(raw)
        offset += len(raw)
    header["__metadata__"] = metadata
    if header_edit == "offsets" and len(header) > 1:
        first = next(iter(header))
        header[first]["data_offsets"] = ["0", 4]
    elif header_edit == "entry" and len(header) > 1:
        header[next(iter(header))] = [1, 2, 3]
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    data = struct.pack("<Q", len(text)) + text + b"".join(blobs)
    if header_edit == "truncate":
        data = data[: len(data) - 7]
    elif header_edit == "length":
        data = struct.pack("<Q", len(text) + 3) + data[8:]
    elif header_edit == "garbage":
        data = data[:8] + b"{\xff\xfe" + data[11:]
    path.write_bytes(data)
    return path


# -- the damage -------------------------------------------------------------------------------------
FIELDS = ["format", "format_version", "convlora_version", "adapter_name", "layers", "bias",
          "bias_keys", "base_fingerprint", "base_sketch", "user"]
LAYER_FIELDS = ["type", "weight_shape", "groups", "rank", "alpha", "factorization", "dropout",
                "base_dtype", "method", "rslora", "tucker", "stride", "padding", "dilation", "padding_mode"]
BAD_VALUES = st.sampled_from([0, -4, 1, 2, 3, 1e30, -1e-3, math.nan, math.inf, "svd", "", "7", True, None,
                              [8, "3"], [8, 3, 3, 3], [12, 8, 3, 3], [], {}, [1, 2], "same", "float8",
                              "Conv3d", "Linear", 0.5, 5, "lora", "dora", "loha", "lokr", "boft",
                              "loralib", False])
JSON_VALUES = st.recursive(st.none() | st.booleans() | st.integers(-3, 10) | st.floats(allow_nan=True)
                           | st.text(max_size=6), lambda inner: st.lists(inner, max_size=3)
                           | st.dictionaries(st.text(max_size=4), inner, max_size=3), max_leaves=6)
BIAS_NAMES = ["0.bias", "1.bias", "1.weight", "1.running_mean", "2.bias", "4.bias", "9.bias", "bias",
              "0.lora_A.bias", "0.weight", ".bias", "0..bias", "3.bias"]


@st.composite
def damaged(draw: st.DrawFn) -> dict[str, Any]:
    """A recipe for one damaged file: which valid file, and what to change in it."""
    recipe: dict[str, Any] = {"bias": draw(st.sampled_from(["none", "lora_only", "all"])),
                              "variant": draw(st.sampled_from(sorted(VARIANTS))), "ops": []}
    for _ in range(draw(st.integers(1, 3))):
        kind = draw(st.sampled_from(["field", "drop", "layer", "layer_drop", "layer_name", "bias_keys",
                                     "tensor", "header", "name"]))
        if kind == "field":
            op = (kind, draw(st.sampled_from(FIELDS)), draw(JSON_VALUES | BAD_VALUES),
                  draw(st.booleans()))  # last: store the value as JSON text (else raw)
        elif kind == "drop":
            op = (kind, draw(st.sampled_from(FIELDS)))
        elif kind == "layer":
            op = (kind, draw(st.sampled_from(["0", "2", "4"])), draw(st.sampled_from(LAYER_FIELDS)),
                  draw(BAD_VALUES))
        elif kind == "layer_drop":
            op = (kind, draw(st.sampled_from(["0", "2", "4"])), draw(st.sampled_from(LAYER_FIELDS)))
        elif kind == "layer_name":
            op = (kind, draw(st.sampled_from(["0", "2", "4"])),
                  draw(st.sampled_from(["", "1", "3", "9", "_orig_mod.0", "0.lora_A", "a..b", "2"])))
        elif kind == "bias_keys":
            op = (kind, draw(st.lists(st.sampled_from(BIAS_NAMES), max_size=3)),
                  draw(st.sampled_from(["match", "wrong_shape", "none"])))
        elif kind == "tensor":
            op = (kind, draw(st.integers(0, 11)),  # the i-th factor tensor of the file
                  draw(st.sampled_from(["int", "f64", "f16", "nan", "inf", "shape", "drop", "extra", "big"])))
        elif kind == "header":
            op = (kind, draw(st.sampled_from(["offsets", "entry", "truncate", "length", "garbage"])))
        else:
            op = (kind, draw(st.sampled_from(["v1.2", "", "a b", "ok", "default"])))
        recipe["ops"].append(op)
    return recipe


def _build(recipe: dict[str, Any], valid: Path, out: Path, model: nn.Module) -> tuple[Path, str | None, set[str]]:
    """Write the damaged file; returns it, the ``name=`` to load with, and the words an error
    about this damage should name."""
    tensors = load_file(str(valid))
    with valid.open("rb") as fh:
        (n,) = struct.unpack("<Q", fh.read(8))
        meta: dict[str, Any] = json.loads(fh.read(n))["__metadata__"]
    decoded = {k: json.loads(meta[k]) for k in ("layers", "bias_keys")}
    header_edit, name, words = None, None, set()
    params = dict(model.named_parameters()) | dict(model.named_buffers())
    factor_keys = sorted(k for k in tensors if k not in decoded["bias_keys"])
    for op in recipe["ops"]:
        kind = op[0]
        if kind == "field":
            _, field, value, as_json = op
            meta[field] = json.dumps(value) if as_json else value
            decoded.pop(field, None)
            words.add(field)
        elif kind == "drop":
            meta.pop(op[1], None)
            decoded.pop(op[1], None)
            words.add(op[1])
        elif kind in ("layer", "layer_drop", "layer_name") and "layers" in decoded:
            layers = decoded["layers"]
            if op[1] not in layers:
                continue
            if kind == "layer":
                layers[op[1]][op[2]] = op[3]
            elif kind == "layer_drop":
                layers[op[1]].pop(op[2], None)
            else:
                layers[op[2]] = layers.pop(op[1])
                words.add(op[2])
            words |= {op[1], "layers"}
        elif kind == "bias_keys" and "bias_keys" in decoded:
            _, keys, shape = op
            decoded["bias_keys"] = keys
            for key in keys:
                if shape != "none":
                    like = params.get(key)
                    size = like.shape if like is not None and shape == "match" else (5,)
                    tensors[key] = torch.full(size, 7.0)
            words |= {"bias_keys", "bias", *keys}
        elif kind == "tensor" and factor_keys[op[1] % len(factor_keys)] in tensors:
            key, how = factor_keys[op[1] % len(factor_keys)], op[2]
            t = tensors[key]
            damage = {"int": lambda v: v.to(torch.int32), "f64": lambda v: v.double(),
                      "f16": lambda v: v.half(), "nan": lambda v: v.clone().fill_(math.nan),
                      "inf": lambda v: v.clone().fill_(math.inf), "shape": lambda v: v[:1].clone(),
                      "big": lambda v: v * 1e30, "drop": lambda v: v, "extra": lambda v: v}
            tensors[key] = damage[how](t)
            if how == "drop":
                del tensors[key]
            if how == "extra":
                tensors[key + "_extra"] = t
            words |= {key, key.rpartition(".")[0]}
        elif kind == "header":
            header_edit = op[1]
        elif kind == "name":
            name = op[1]
    for field, value in decoded.items():
        meta[field] = json.dumps(value)
    return _write(out, tensors, meta, header_edit), name, words


@SETTINGS
@given(recipe=damaged())
def test_a_damaged_file_loads_exactly_or_fails_changing_nothing(recipe, valid_files, tmp_path_factory) -> None:
    model = _base()
    path, name, words = _build(recipe, valid_files[recipe["bias"], recipe["variant"]],
                               tmp_path_factory.mktemp("bad") / "a.safetensors", model)
    before = _state(model)
    event(f"variant {recipe['variant']}")
    try:
        loaded = convlora.load_adapter(model, path, name=name or None)
    except (ConvLoRAError, FileNotFoundError) as err:
        message = str(err)
        event(type(err).__name__)
        _assert_unchanged(model, before)
        assert "\n" not in message, "one line per error"
        if isinstance(err, AdapterFormatError) and words:
            assert any(w and w in message for w in words) or "safetensors" in message, (
                f"the error should name what is wrong ({sorted(words)}): {message}")
        return
    event("loaded")
    assert convlora.active_adapter(model) == loaded
    with torch.no_grad():
        y = model(X)
        convlora.merge(model)
        assert bool(torch.isfinite(model(X)).all())
        torch.testing.assert_close(model(X), y, atol=1e-4, rtol=1e-4)


@SETTINGS
@given(recipe=damaged())
def test_the_cli_answers_a_damaged_file_with_one_line(recipe, valid_files, tmp_path_factory, capsys) -> None:
    folder = tmp_path_factory.mktemp("cli")
    model = _base()
    path, _, _ = _build(recipe, valid_files[recipe["bias"], recipe["variant"]], folder / "a.safetensors", model)
    base = folder / "base.safetensors"
    convlora.save_state_dict(model.state_dict(), base)
    for argv in (["inspect", str(path)], ["merge", "--adapter", str(path), "--base", str(base),
                                          "--out", str(folder / "m.safetensors")]):
        capsys.readouterr()
        status = main(argv)
        err = capsys.readouterr().err
        assert status in (0, 2)
        if status == 2:
            assert len(err.strip().splitlines()) == 1 and err.startswith("convlora "), err


# -- named cases of the issue -------------------------------------------------------------------------
def _meta_of(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    with path.open("rb") as fh:
        (n,) = struct.unpack("<Q", fh.read(8))
        return load_file(str(path)), json.loads(fh.read(n))["__metadata__"]


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_bias_entries_must_name_a_bias_the_file_may_carry(valid_files, tmp_path: Path, variant: str) -> None:
    tensors, meta = _meta_of(valid_files["all", variant])
    for key, value, message in (("1.weight", torch.full((8,), 7.0), "bias_keys"),
                                ("1.running_mean", torch.full((8,), 7.0), "bias_keys"),
                                ("9.bias", torch.full((8,), 7.0), r"9.bias: not a bias parameter")):
        bad = _write(tmp_path / "bad.safetensors", {**tensors, key: value},
                     {**meta, "bias_keys": json.dumps(json.loads(meta["bias_keys"]) + [key])})
        model = _base()
        before = _state(model)
        with pytest.raises(ConvLoRAError, match=message):
            convlora.load_adapter(model, bad)
        _assert_unchanged(model, before)

    class WithBuffer(nn.Module):  # a buffer called 'bias': not a parameter
        def __init__(self) -> None:
            super().__init__()
            self.register_buffer("bias", torch.zeros(8))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x + self.bias.view(1, -1, 1, 1)

    model = _base()
    model[3] = WithBuffer()
    bad = _write(tmp_path / "buf.safetensors", {**tensors, "3.bias": torch.ones(8)},
                 {**meta, "bias_keys": json.dumps(json.loads(meta["bias_keys"]) + ["3.bias"])})
    before = _state(model)
    with pytest.raises(convlora.AdapterMismatchError, match="3.bias: not a bias parameter"):
        convlora.load_adapter(model, bad, strict=False)
    _assert_unchanged(model, before)


@pytest.mark.parametrize("variant", sorted(VARIANTS))
@pytest.mark.parametrize(("field", "value"), [("rank", 0), ("factorization", "svd"), ("alpha", math.nan),
                                              ("alpha", -4), ("dropout", 5), ("alpha", 1e30),
                                              ("method", "boft"), ("rslora", "yes")])
def test_bad_layer_values_are_format_errors_naming_field_and_value(valid_files, tmp_path: Path, variant: str,
                                                                  field: str, value: object) -> None:
    tensors, meta = _meta_of(valid_files["none", variant])
    layers = json.loads(meta["layers"])
    layers["2"][field] = value
    bad = _write(tmp_path / "bad.safetensors", tensors, {**meta, "layers": json.dumps(layers)})
    model = _base()
    before = _state(model)
    with pytest.raises(AdapterFormatError, match=rf"layer '2'.*{field}"):
        convlora.load_adapter(model, bad)
    _assert_unchanged(model, before)


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_a_failure_while_loading_undoes_everything(valid_files, monkeypatch, variant: str) -> None:
    model = _base()
    before = _state(model)
    calls = []
    original = convlora.LoRALayer.add_adapter

    def flaky(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("out of memory (simulated)")
        return original(self, *args, **kwargs)

    monkeypatch.setattr(convlora.LoRALayer, "add_adapter", flaky)
    with pytest.raises(RuntimeError, match="simulated"):
        convlora.load_adapter(model, valid_files["all", variant])
    _assert_unchanged(model, before)


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_adapter_files_name_the_unwrapped_layers(tmp_path: Path, variant: str) -> None:
    x = torch.randn(1, 3, 6, 6)
    for wrap in (torch.compile, nn.DataParallel):
        model = _base()
        wrapped = wrap(model)
        _trained(wrapped, variant)
        path = convlora.save_adapter(wrapped, tmp_path / "w.safetensors")
        _, meta = convlora.read_adapter(path)
        assert sorted(meta["layers"]) == ["0", "2", "4"]
        plain = _base()
        convlora.load_adapter(plain, path, strict=True)
        assert torch.equal(plain(x), model(x))
    # A file an older convlora wrote through torch.compile (prefixed names) still loads.
    tensors, meta = _meta_of(path)
    old = _write(tmp_path / "old.safetensors", {f"_orig_mod.{k}": v for k, v in tensors.items()},
                 {**meta, **{f: json.dumps({f"_orig_mod.{k}": v for k, v in json.loads(meta[f]).items()})
                             for f in ("layers", "base_sketch")}})
    plain = _base()
    convlora.load_adapter(plain, old)
    assert torch.equal(plain(x), model(x))


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_load_adapter_refuses_tied_weights_and_reading_parents(valid_files, variant: str) -> None:
    model = _base()
    model[4].weight = nn.Parameter(model[4].weight.detach().clone())
    model.add_module("tied", nn.Conv2d(8, 4, 1))
    model.tied.weight = model[4].weight  # tied to conv 4
    before = _state(model)
    with pytest.raises(convlora.AdapterMismatchError, match=r"4: .*shared with \['tied.weight'\]"):
        convlora.load_adapter(model, valid_files["none", variant], strict=False)
    _assert_unchanged(model, before)


def _conv_tree(state: dict[str, torch.Tensor]) -> nn.Module:
    """Plain convs at the state dict's conv-weight names (enough to carry adapters)."""
    root = nn.Module()
    for key, w in state.items():
        if not key.endswith(".weight") or w.dim() != 4:
            continue
        *path, leaf = key[: -len(".weight")].split(".")
        node = root
        for part in path:
            if not hasattr(node, part):
                node.add_module(part, nn.Module())
            node = getattr(node, part)
        conv = nn.Conv2d(w.shape[1], w.shape[0], tuple(w.shape[2:]), bias=False)
        with torch.no_grad():
            conv.weight.copy_(w)
        node.add_module(leaf, conv)
    return root


@requires_shared
@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_fingerprint_tells_params_from_params_ema(shared_data: Path, tmp_path: Path, variant: str) -> None:
    sd = torch.load(shared_data / "weights" / "span_ch28_ema_trainckpt.pth", map_location="cpu",
                    weights_only=True)
    ema, raw = _conv_tree(sd["params_ema"]), _conv_tree(sd["params"])
    _trained(ema, variant)
    path = convlora.save_adapter(ema, tmp_path / "ema.safetensors")
    before = _state(raw)
    with pytest.raises(FingerprintMismatchError, match="base weights differ"):
        convlora.load_adapter(raw, path)
    _assert_unchanged(raw, before)
    # The same base in lower precision is still accepted.
    for dtype in (torch.bfloat16, torch.float16):
        convlora.load_adapter(copy.deepcopy(_conv_tree(sd["params_ema"])).to(dtype), path)


def test_fingerprint_threshold_script_runs(tmp_path: Path) -> None:
    import subprocess
    import sys

    from tests.conftest import REPO

    result = subprocess.run([sys.executable, str(REPO / "benchmarks" / "fingerprint_threshold.py"), "--quick"],
                            capture_output=True, text=True, timeout=300, cwd=REPO,
                            env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"})
    assert result.returncode == 0, result.stderr[-2000:]
    assert "| relative change eps |" in result.stdout and "float32 -> float32" in result.stdout


@pytest.mark.parametrize("alpha", [math.nan, math.inf, -4.0, 0.0, 1e30])
def test_inject_refuses_the_alphas_a_file_may_not_carry(alpha: float) -> None:
    model = _base()
    before = _state(model)
    with pytest.raises(ConvLoRAError, match=r"alpha must be a finite number in \(0, 1e\+06\]"):
        convlora.inject(model, rank=2, alpha=alpha)
    _assert_unchanged(model, before)


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_a_failed_write_leaves_the_old_file_and_no_temporary(valid_files, tmp_path: Path, monkeypatch,
                                                              variant: str) -> None:
    import convlora.adapters as adapters

    target = tmp_path / "a.safetensors"
    target.write_bytes(valid_files["none", variant].read_bytes())
    old = target.read_bytes()

    def half_then_fail(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"partial")
        raise OSError(28, "No space left on device (simulated)")

    monkeypatch.setattr(adapters, "save_file", half_then_fail)
    model = _trained(_base(), variant)
    with pytest.raises(OSError, match="No space left"):
        convlora.save_adapter(model, target)
    assert target.read_bytes() == old and [p.name for p in tmp_path.iterdir()] == ["a.safetensors"]
