"""Every config value of both examples is checked before any work (issue 14, section 2): a
property test feeds wrong types and out-of-range values to every key, enumerated from the
dataclasses (span_sr) and from DEFAULTS/SCHEMA (restoration), so a new key is covered by itself;
each gets a one-line error naming the key, and no run folder is made. Then the named cases:
``1e-3`` is a number, ``train.steps -5``, batch/patch 0, a NaN kernel, ``skimage:download_all``."""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from examples.restoration import config as rconfig
from examples.restoration import restore
from examples.restoration import train as rtrain
from examples.restoration.data import sample_photos
from examples.restoration.kernels import load_kernel
from examples.span_sr import config as sconfig
from examples.span_sr import train as strain
from examples.span_sr.config import Range
from examples.span_sr.data import image_refs
from examples.span_sr.images import SKIMAGE_PHOTOS, read_image, write_image


def _span_keys() -> dict[str, Any]:
    """Every dotted key of the span_sr Config and its type, read from the dataclasses."""
    keys: dict[str, Any] = {}
    top = typing.get_type_hints(sconfig.Config)
    for f in dataclasses.fields(sconfig.Config):
        if dataclasses.is_dataclass(top[f.name]):
            for name, hint in typing.get_type_hints(top[f.name]).items():
                keys[f"{f.name}.{name}"] = hint
        else:
            keys[f.name] = top[f.name]
    return keys


def _restoration_keys() -> list[str]:
    keys = []
    for k, v in rconfig.DEFAULTS.items():
        keys += [f"{k}.{leaf}" for leaf in v] if isinstance(v, dict) else [k]
    return keys


SPAN_KEYS = _span_keys()


def _unwrap(hint: Any) -> tuple[Any, bool]:
    """``(hint without None, whether None is allowed)``."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        return args[0], True
    return hint, False


def _wrong_type(hint: Any) -> st.SearchStrategy[Any]:
    hint, _ = _unwrap(hint)
    mapping = st.just({"a": 1})
    if typing.get_origin(hint) is list:
        item = typing.get_args(hint)[0]
        bad_items = {int: ["x", 1.5, True, [1]], float: ["x", True, [1.0]], str: [{"a": 1}, [1]]}[item]
        return st.one_of(mapping, st.sampled_from(bad_items).map(lambda v: [v]))
    return {int: st.sampled_from(["abc", 1.5, True, [1, 2], {"a": 1}, "1..2"]),
            float: st.sampled_from(["abc", True, [1.0], {"a": 1}, float("nan"), float("inf"), -float("inf")]),
            bool: st.sampled_from(["maybe", 3, 0.5, [True], {"a": 1}]),
            str: st.sampled_from([["a", "b"], {"a": 1}])}[hint]


def _out_of_range(hint: Any, rule: Any) -> st.SearchStrategy[Any] | None:
    if rule is None:
        return None
    hint, _ = _unwrap(hint)
    listed = typing.get_origin(hint) is list
    item = typing.get_args(hint)[0] if listed else hint
    if isinstance(rule, tuple):
        strategy: st.SearchStrategy[Any] = st.text(min_size=1, max_size=8).filter(lambda s: s not in rule)
        if item is not str:
            return None
    else:
        parts = []
        if item is int:
            if rule.lo is not None:
                parts.append(st.integers(max_value=math.floor(rule.lo) - (0 if rule.lo_open else 1)))
            if rule.hi is not None:
                parts.append(st.integers(min_value=math.ceil(rule.hi) + (0 if rule.hi_open else 1)))
        else:
            if rule.lo is not None:
                parts.append(st.floats(max_value=rule.lo, exclude_max=not rule.lo_open, allow_nan=False))
            if rule.hi is not None:
                parts.append(st.floats(min_value=rule.hi, exclude_min=not rule.hi_open, allow_nan=False))
            parts.append(st.just(float("nan")))
        strategy = st.one_of(parts)
    return strategy.map(lambda v: [v]) if listed else strategy


def _bad(hint: Any, rule: Any) -> st.SearchStrategy[Any]:
    ranged = _out_of_range(hint, rule)
    return st.one_of(_wrong_type(hint), ranged) if ranged is not None else _wrong_type(hint)


def _nested(key: str, value: Any) -> dict[str, Any]:
    section, _, leaf = key.rpartition(".")
    return {section: {leaf: value}} if section else {key: value}


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_every_span_sr_key_refuses_wrong_types_and_ranges(data: st.DataObject, tmp_path: Path) -> None:
    key = data.draw(st.sampled_from(sorted(SPAN_KEYS)), label="key")
    value = data.draw(_bad(SPAN_KEYS[key], sconfig._CHOICES.get(key)), label="value")
    run = tmp_path / "run"
    cfg = {"out": str(run), **_nested(key, value)} if key != "out" else _nested(key, value)
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(cfg))
    with pytest.raises(ValueError) as err:
        strain.main(["--config", str(path)])
    message = str(err.value)
    assert "\n" not in message and repr(key) in message, message
    assert not run.exists()


def test_the_restoration_schema_covers_every_key() -> None:
    missing = [k for k in _restoration_keys() if k not in rconfig.SCHEMA]
    assert not missing, f"give these keys a type and range in examples/restoration/config.py SCHEMA: {missing}"


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_every_restoration_key_refuses_wrong_types_and_ranges(data: st.DataObject, tmp_path: Path) -> None:
    key = data.draw(st.sampled_from(sorted(rconfig.SCHEMA)), label="key")
    hint, rule = rconfig.SCHEMA[key]
    value = data.draw(_bad(hint, rule), label="value")
    run = tmp_path / "run"
    cfg: dict[str, Any] = {"out": str(run)}
    if key.startswith("model."):
        cfg["model"] = {"arch": "ResidualCNN", "channels": 8, "depth": 3, key.split(".")[1]: value}
    else:
        cfg = {**cfg, **_nested(key, value)}
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(cfg))
    with pytest.raises(SystemExit) as err:
        rtrain.main(["--config", str(path)])
    message = str(err.value.code)
    assert "\n" not in message and repr(key) in message, message
    assert not run.exists()


def test_numbers_written_1e_3_are_numbers(tmp_path: Path) -> None:
    (tmp_path / "c.yaml").write_text("base: {lr: 1e-3}\nadapter: {lr: 2e-2}\nfinetune: {lr: 5E-4}\n")
    cfg = rconfig.load_config(tmp_path / "c.yaml")  # PyYAML (YAML 1.1) reads these as strings
    assert (cfg["base"]["lr"], cfg["adapter"]["lr"], cfg["finetune"]["lr"]) == (1e-3, 2e-2, 5e-4)
    assert all(type(cfg[s]["lr"]) is float for s in ("base", "adapter", "finetune"))
    rconfig.apply_options(cfg, ["--adapter.lr", "1e-3"])
    assert type(cfg["adapter"]["lr"]) is float and cfg["adapter"]["lr"] == 1e-3
    (tmp_path / "s.yaml").write_text("train: {lr: 1e-3}\ndemo: {lr: 2e-3}\n")
    scfg = sconfig.load_config(tmp_path / "s.yaml", {"loss.w_aff": "1e-2"})
    assert (scfg.train.lr, scfg.demo.lr, scfg.loss.w_aff) == (1e-3, 2e-3, 1e-2)


@pytest.mark.parametrize("option", [("--train.steps", "-5"), ("--train.steps", "0"), ("--data.batch", "0"),
                                    ("--data.patch", "0"), ("--demo.batch", "0"), ("--train.log_every", "0")])
def test_span_sr_refuses_non_positive_counts_before_work(option: tuple[str, str], tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=f"config key '{option[0][2:]}': '{option[1]}' is out of range"):
        strain.main(["--out", str(tmp_path / "run"), *option])
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("option", [("--steps", "-5"), ("--adapter.steps", "-5"), ("--train.batch", "0"),
                                    ("--train.patch", "0"), ("--threads", "0"), ("--base.lr", "nan")])
def test_restoration_refuses_non_positive_counts_before_work(option: tuple[str, str], tmp_path: Path) -> None:
    with pytest.raises(SystemExit, match="config key '[a-z.]+': .* (out of range|not a finite)"):
        rtrain.main(["--out", str(tmp_path / "run"), *option])
    assert not (tmp_path / "run").exists()


def test_a_nan_kernel_is_refused(tmp_path: Path) -> None:
    k = np.ones((5, 5))
    k[2, 2] = np.nan
    np.save(tmp_path / "k.npy", k)
    with pytest.raises(ValueError, match="NaN/Inf"):
        load_kernel(tmp_path / "k.npy")
    np.save(tmp_path / "inf.npy", np.where(np.eye(5) > 0, np.inf, 1.0))
    with pytest.raises(ValueError, match="NaN/Inf"):
        load_kernel(tmp_path / "inf.npy")
    write_image(tmp_path / "in.png", np.zeros((16, 16, 3), np.uint8))
    with pytest.raises(ValueError, match="NaN/Inf"):  # restore.py stops before writing anything
        restore.main(["--weights", str(tmp_path / "absent.safetensors"), "--kernel", str(tmp_path / "k.npy"),
                      "--input", str(tmp_path / "in.png"), "--output", str(tmp_path / "out.png")])
    assert not (tmp_path / "out.png").exists()


def test_skimage_refs_are_the_bundled_photos_only(monkeypatch: pytest.MonkeyPatch) -> None:
    import skimage.data

    called = []
    monkeypatch.setattr(skimage.data, "download_all", lambda *a, **k: called.append(1))
    for name in ("download_all", "data_dir", "file_hash", "lbp_frontal_face_cascade_filename", "binary_blobs"):
        with pytest.raises(ValueError, match="no bundled image"):
            read_image(f"skimage:{name}")
        with pytest.raises(ValueError, match="no bundled image"):
            image_refs([f"skimage:{name}"])
        with pytest.raises(ValueError, match="not a scikit-image sample photo"):
            sample_photos([name])
    assert not called
    for name in SKIMAGE_PHOTOS:
        img = read_image(f"skimage:{name}")
        assert img.dtype == np.uint8 and img.ndim == 3 and img.shape[2] == 3


def test_ranges_read_as_documented() -> None:
    r = Range(0, 1, lo_open=True)
    assert [r.allows(v) for v in (0.0, 1e-9, 1.0, 1.5, math.nan, math.inf)] == [False, True, True, False, False, False]
    assert str(r) == "a finite number > 0 and <= 1"
